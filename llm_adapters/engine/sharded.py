"""One block at a time from the safetensors shards (``--low-memory``): :class:`ShardedSource`, the model
source whose blocks are materialised, pruned (:func:`~.blockwise.prune_offloaded`), written to their own output
shard and released; evaluation streams the written shards. Storage mechanics live in :mod:`..offload`."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

from .. import data as D
from ..distributed import DistContext, env_world
from ..offload import OffloadError, OffloadedModel, hidden_size, write_rest_and_index
from .blockwise import prune_offloaded
from .parallel import run_blocks_parallel

__all__ = ["ShardedSource"]


class ShardedSource:
    """One block at a time from the safetensors shards (``--low-memory``; see :mod:`.offload`): the model is a
    skeleton on the meta device, blocks are materialised, pruned, written to their own output shard and
    released; evaluation streams the written shards. Unstructured/N:M methods, uniform allocation, a
    calibration text."""

    whole = False

    def __init__(self, om: Optional[OffloadedModel] = None, out_dir=None, act=None):
        self.om, self.out_dir, self.act = om, out_dir, act
        self.tok, self.meta = None, None
        self.directory = om.dir if om is not None else None

    @property
    def model(self):
        return self.om.model

    @property
    def arch(self):
        return self.om.arch

    # ---------------------------------------------------------------- the engine's calls
    def check(self, run) -> None:
        from ..offload import parse_dtype
        d, s = run.d, run.protocol
        if d.output.output is None:
            raise OffloadError("--low-memory writes the pruned model shard by shard: give --output DIR")
        if run.d.spec.structured:
            raise OffloadError(f"--low-memory prunes unstructured/N:M methods; {run.d.spec.name!r} is structured (it "
                               f"changes widths): use the in-memory path")
        if run.d.allocation != "uniform":
            raise OffloadError(f"--allocation {run.d.allocation} reads every weight matrix first; it is not available "
                               f"with --low-memory (use --allocation uniform)")
        if s["calibration"] == "self":
            raise OffloadError("--calibration self samples from the whole model; with --low-memory give a "
                               "calibration text (--calibration c4|wikitext2|ptb|FILE, --data-dir DIR)")
        if d.evaluation.reference:
            raise OffloadError("--reference is not available with --low-memory (it loads two whole models); run "
                               "optprune eval --model OUT --reference DENSE afterwards")
        if d.output.return_model:
            raise OffloadError("return_model is not available with low_memory (the model is never whole in "
                               "memory); load the output directory instead")
        self.act = parse_dtype(d.execution.activation_dtype)

    def staging(self, run):
        """The shards are written while pruning: one process writes beside the target and renames into place
        at the end; block-parallel ranks write into the output directory itself."""
        from ..checkpoint import atomic_output
        if run.d.world == 1:
            return atomic_output(run.d.out_dir, overwrite=run.d.output.overwrite)
        return contextlib.nullcontext(run.d.out_dir)

    def load(self, run) -> None:
        from transformers import AutoTokenizer

        from ..offload import safetensors_dir
        self.directory = safetensors_dir(run.d.model.model, run.d.model.model_dir)
        self.om = om = OffloadedModel(self.directory)
        self.tok = AutoTokenizer.from_pretrained(str(self.directory))
        self.out_dir = Path(run.write_dir)
        c = om.config
        self.meta = {"name": str(run.d.model.model), "source": str(Path(self.directory).resolve()),
                     "format": "safetensors (low-memory)", "model_type": getattr(c, "model_type", None),
                     "architecture": (getattr(c, "architectures", None) or [type(om.model).__name__])[0],
                     "n_params": om.n_params(), "dtype": str(om.dtype).replace("torch.", ""),
                     "num_layers": om.n_blocks, "hidden_size": hidden_size(om),
                     "max_position_embeddings": getattr(c, "max_position_embeddings", getattr(c, "n_positions", None)),
                     "vocab_size": getattr(c, "vocab_size", None)}

    def config_record(self, run, rec: dict) -> dict:
        for k in ("targets", "ignore", "save_format", "dtype", "certify"):
            rec.pop(k)
        rec.update(world_size=run.d.world, low_memory=True,
                   activation_dtype=str(self.act or self.om.dtype).replace("torch.", ""))
        return rec

    def before_prune(self, run) -> None:
        if env_world() is None or env_world()[0] == 0:  # (torchrun: rank 0 only; the others wait at a barrier)
            from ..offload import remove_previous_weights
            remove_previous_weights(self.out_dir)

    def prune(self, run, calib) -> Optional[dict]:
        if run.d.world > 1:
            return run_blocks_parallel(self, calib, run.config, nproc=run.d.nproc, progress=run.d.execution.progress)
        return prune_offloaded(self.om, calib, run.config, self.out_dir, activation_dtype=self.act,
                               progress=run.d.execution.progress)

    def weight_counts(self, res: dict) -> tuple:
        low = res.get("low_memory") or {}
        return low.get("prunable_weights", 0), low.get("nonzero_before"), low.get("nonzero_after", 0)

    def evaluate(self, run) -> dict:
        """Perplexity streamed block by block from the written shards."""
        from ..offload import perplexity_offloaded
        s, d = run.protocol, run.d
        if not s["eval_datasets"]:
            return {}
        t0 = time.perf_counter()
        ppl = {}
        for name in s["eval_datasets"]:
            ids = D.eval_tokens(self.tok, name, seqlen=s["eval_seqlen"], data_dir=d.calibration.data_dir)
            r = perplexity_offloaded(self.out_dir, ids, s["eval_seqlen"], max_windows=s["eval_windows"],
                                     device=run.d.device, dtype=self.om.dtype, progress=d.execution.progress,
                                     desc=f"eval {name} (streamed)")
            r["dataset"] = name
            r["all_windows"] = s["eval_windows"] is None or r["windows"] < s["eval_windows"]
            ppl[name] = r
        run.timings["eval_s"] = time.perf_counter() - t0
        return {"perplexity": ppl}

    def output(self, run):
        return contextlib.nullcontext(self.out_dir)  # (already staged around the whole run)

    def save(self, run, stage: Path) -> dict:
        self.tok.save_pretrained(str(stage))  # the weights: written block by block while pruning
        return {"format": "hf (safetensors shards, written block by block)", "stock_loadable": True}

    def print_summary(self, record: dict) -> None:
        low = (record.get("pipeline") or {}).get("low_memory") or {}
        print(f"  low memory: largest block {low.get('max_block_mb', 0):.1f} MB of a {low.get('model_mb', 0):.1f} MB "
              f"model; activations {low.get('activations_mb', 0):.1f} MB ({low.get('activation_dtype')})")

    # ---------------------------------------------------------------- block-parallel ranks
    def spawnable(self) -> bool:
        return self.directory is not None

    def worker_recipe(self) -> tuple:
        return (ShardedSource, (str(self.directory), self.om.dtype, str(self.out_dir), self.act))

    @staticmethod
    def for_worker(directory, dtype, out_dir, act) -> "ShardedSource":
        return ShardedSource(om=OffloadedModel(directory, dtype=dtype), out_dir=out_dir, act=act)

    def prune_rank(self, calib_ids, config, mine: list, progress: bool) -> dict:
        res = prune_offloaded(self.om, calib_ids, config, self.out_dir, blocks=mine, activation_dtype=self.act,
                              progress=progress, write_rest=False)
        return {k: res.get(k) for k in ("layers", "blocks", "time_s", "peak_cuda_mb", "low_memory")}

    def gather(self, ctx: DistContext, plan, owners: list) -> int:
        """Every rank has written its own block shards; rank 0 writes the rest and the index."""
        if ctx.rank == 0:
            write_rest_and_index(self.om, self.out_dir, skip=set(plan.blocks))
        return 0

    def finish_merge(self, res: dict, gathered: list, plan, t0: float, t_ready: float) -> None:
        lm = [g["low_memory"] for g in gathered if g.get("low_memory")]
        if lm:
            low = dict(lm[0])
            for k in ("prunable_weights", "nonzero_before", "nonzero_after"):
                low[k] = sum(x[k] for x in lm)
            low["capture_time_s"] = max(x["capture_time_s"] for x in lm)
            res["low_memory"] = low
        for r in res["distributed"]["ranks"]:
            r["shards_written_by_rank"] = True
