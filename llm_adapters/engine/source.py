"""What the engine asks of a model source — where the model lives (whole in memory, or block by block from its
shards) — in the order it asks (:class:`ModelSource`). A new kind of model storage is a new source class, not
a copy of the flow."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

__all__ = ["ModelSource"]


class ModelSource(Protocol):
    """A model source. ``run`` is the :class:`~.flow.PruneRun` (its description ``run.d`` and state)."""

    whole: bool  #: the model object is whole (dense evaluation, self-calibration, allocation, KL work on it)
    model: object
    tok: object
    meta: Optional[dict]
    arch: object

    # ---------------------------------------------------------------- the engine's calls, in order
    def check(self, run) -> None:
        """In the preflight: refuse what this source cannot do (one line), before any weight is read."""

    def staging(self, run):
        """A context manager giving the folder output is written to while pruning (or None)."""

    def load(self, run) -> None:
        """The model (or its skeleton), tokenizer and metadata (``meta``)."""

    def config_record(self, run, rec: dict) -> dict:
        """The recorded settings, with what this source adds or leaves out."""

    def before_prune(self, run) -> None:
        """Anything to keep or clean before the blocks are pruned."""

    def prune(self, run, calib) -> Optional[dict]:
        """The blocks pruned; the pipeline's record (None on the non-zero ranks of a block-parallel run)."""

    def weight_counts(self, res: dict) -> tuple:
        """``(prunable weights, nonzero before, nonzero after)``."""

    def evaluate(self, run) -> dict:
        """The record's evaluation parts (perplexity, KL against the dense model)."""

    def output(self, run):
        """A context manager giving the folder the output is written into as a whole."""

    def save(self, run, stage: Path) -> dict:
        """Write the pruned model into ``stage``; what was written."""

    def print_summary(self, record: dict) -> None:
        """The source's lines of the terminal summary."""

    # ---------------------------------------------------------------- block-parallel ranks (.parallel)
    def spawnable(self) -> bool:
        """Whether spawned workers can build their own copy (``worker_recipe``)."""

    def worker_recipe(self) -> tuple:
        """``(source class, args)``: a worker's own copy is ``cls.for_worker(*args)``."""

    def prune_rank(self, calib_ids, config, mine: list, progress: bool) -> dict:
        """This rank's blocks pruned; its part of the records."""

    def gather(self, ctx, plan, owners: list) -> int:
        """The pruned blocks to rank 0 (the source's way); bytes moved."""

    def finish_merge(self, res: dict, gathered: list, plan, t0: float, t_ready: float) -> None:
        """The source's part of the merged record."""
