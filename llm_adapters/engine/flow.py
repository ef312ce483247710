"""The prune engine's flow: :class:`PruneRun` owns one prune from its resolved description to the saved output,
whatever holds the model.

1. **preflight** — :func:`~..description.resolve` checks every option, file and folder and resolves the settings
   (protocol, calibration, evaluation) before any model weight is read; the model source says what it cannot do;
   the checkpoint is opened (:mod:`..checkpoint`);
2. the **stages** (:mod:`.stages`) — load, calibrate, allocate, prune the blocks, evaluate, save — each adding its
   part to the record.

Where the model lives is a :class:`~.source.ModelSource`, not a fork of the flow: :class:`~.in_memory.InMemorySource`
(the whole model) or :class:`~.sharded.ShardedSource` (one block at a time from the safetensors shards,
``--low-memory``); either runs block-parallel (:mod:`.parallel`) with ``--nproc N`` or under torchrun.
"""
from __future__ import annotations

import time

from ..checkpoint import WriteError, as_write_error
from ..description import RunDescription, resolve
from ..report import print_prune_header, print_prune_summary
from ..settings import RunError
from . import stages
from .in_memory import InMemorySource
from .sharded import ShardedSource

__all__ = ["PruneRun"]


class PruneRun:
    """One prune, from the options of ``optprune prune`` (the parameters of
    :func:`~optprune.llm_adapters.run.prune`, same names) to the saved output and its record.

    ``PruneRun(**options).run()`` returns the record (``(model, tokenizer, record)`` with ``return_model``;
    ``None`` on the non-zero ranks of a block-parallel run). :meth:`preflight` runs every check that needs no
    model weight; :meth:`run` calls it first."""

    def __init__(self, *args, **options):
        self.t_total = time.perf_counter()
        given = args[0] if len(args) == 1 and not options and isinstance(args[0], RunDescription) else None
        self.d = given
        self._options = (args, options) if given is None else None
        self.source = None
        self.checkpoint = None
        self.selection = None  # --allocation auto: the candidates' scores, plotted into the output

    # ------------------------------------------------------------------------------------ 1. preflight
    def preflight(self) -> "PruneRun":
        """The run description (:func:`~.description.resolve`: every option, combination, file and folder checked
        before any weight is read), what the model source cannot do, and the checkpoint (idempotent)."""
        if self.source is not None:
            return self
        if self.d is None:
            args, options = self._options
            self.d = resolve(*args, **options)
        d = self.d
        self.verbose = d.verbose
        self.sparsity = d.sparsity  # (a speed budget settles it after the load)
        self.protocol = dict(d.protocol)  # the working settings: clipped to the model's context after the load
        source = ShardedSource() if d.execution.low_memory else InMemorySource()
        source.check(self)  # what this source cannot do, still before any weight is read
        from .. import preflight
        self.checkpoint = None if d.depth else preflight.open_checkpoint(  # per-block checkpoints, resume
            d.out_dir, d.output.checkpoint_dir, d.output.resume, single=d.world == 1 and not d.execution.low_memory,
            settings=d.resume_key())
        self.source = source
        return self

    # ------------------------------------------------------------------------------------ 2.–5. the run
    def run(self):
        self.preflight()
        d, s = self.d, self.protocol
        if self.verbose:  # what is about to run, after every check, before any heavy work
            print_prune_header(d.model_label, d.spec, self.sparsity, "hidden" if d.hidden else d.method.pattern, s,
                          evaluate=d.evaluation.evaluate, kl=d.evaluation.kl, out_dir=d.out_dir,
                          speedup=d.method.speedup, flops=d.method.flops)
        try:
            with self.source.staging(self) as write_dir:  # sharded: shards are written while pruning
                self.write_dir = write_dir
                return self._run()
        except RunError:  # settings that cannot succeed (e.g. a missed sparsity target): resuming them would fail
            if self.checkpoint is not None and not d.output.resume:  # the same way; the checkpoint would block a rerun
                self.checkpoint.remove()
            raise
        except Exception as e:  # noqa: BLE001 - the disk (full, read-only) while writing: one line, file and remedy
            err = as_write_error(e, self.d.out_dir or "the output")
            if err is None:
                raise
            raise RunError(self._write_failure(err)) from None

    def _run(self):
        """The stages in order, each adding its part to the record (:mod:`.stages`)."""
        self.timings, self.selection, self.calib, self.result = {}, None, None, None
        record = self.record = {"command": "prune", "status": "running"}
        record.update(stages.load(self))
        record.update(stages.calibrate(self))
        record.update(stages.allocate(self))
        part = stages.prune_blocks(self)
        if part is None:  # a non-zero rank of a block-parallel run: rank 0 evaluates, saves and records
            return None
        record.update(part)
        record.update(stages.evaluate(self))
        record = stages.save(self, record)
        if self.checkpoint is not None:
            self.checkpoint.remove()
        if self.verbose:
            print_prune_summary(record, self.d.out_dir)
            self.source.print_summary(record)
        if self.d.output.return_model:
            return self.source.model, self.source.tok, record
        return record

    def _write_failure(self, e: WriteError) -> str:
        """One line for a write that failed late (output or checkpoint): the file, the reason, the remedy —
        ``--resume`` when a checkpoint of the pruned blocks is kept."""
        import errno
        f = getattr(e, "filename", None) or (self.d.out_dir or "the output")
        why = e.strerror or str(e) or type(e).__name__
        fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else "make it writable"
        kept = self.checkpoint is not None and self.checkpoint.usable()
        nxt = (f"the checkpoint in {self.checkpoint.path} is kept: run the same command with --resume to continue"
               if kept
               else "run the command again")
        return f"writing {f} failed ({why}); nothing was replaced — {fix}, then {nxt}"
