"""The whole model in memory: :class:`InMemorySource` (a model loaded from its name/folder/file, or the model
object the caller passed, pruned in place), and the in-memory entry points of the pipeline on one process or
block-parallel ranks (:func:`prune_model_parallel`, :func:`prune_model_distributed`)."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..distributed import DistContext, DistributedError, recv_into, send_tensor, world_for
from ..pipeline import forward_batch_size
from ..report import HELDOUT_SEQLEN, count_prunable, in_memory_meta, perplexities
from ..saving import save_pruned_model
from ..settings import RunError
from .parallel import prune_rank, run_blocks_parallel

__all__ = ["InMemorySource", "prune_model_parallel", "prune_model_distributed"]


def _call(fn, *a, **kw):
    return fn(*a, **kw)


class InMemorySource:
    """The whole model in memory: loaded from its name/folder/file (built-in, HF directory, ``.gguf``, hub id),
    or the model object the caller passed (pruned in place)."""

    whole = True  # the model object is whole: dense evaluation, self-calibration, allocation, KL work on it

    def __init__(self, model=None, recipe=None):
        self.model, self.tok, self.meta, self.arch = model, None, None, None
        self.recipe = recipe  # how a spawned worker gets its own copy: (name_or_path, model_dir) or a callable

    # ---------------------------------------------------------------- the engine's calls
    def check(self, run) -> None:
        self.recipe = (run.d.model.model, run.d.model.model_dir)

    def staging(self, run):
        return contextlib.nullcontext(run.d.out_dir)  # the output is written as a whole at the end (output())

    def load(self, run) -> None:
        from .. import export, preflight
        from ..architectures import get_arch
        from ..loading import load_model
        d = run.d
        if isinstance(d.model.model, torch.nn.Module):
            self.model, self.tok = d.model.model, d.model.tokenizer
            self.meta = in_memory_meta(d.model.model, run.d.model_label)
        else:
            self.model, tok, self.meta = preflight.load_checked(load_model, d.model.model, model_dir=d.model.model_dir,
                                                                require_arch=True)
            self.tok = d.model.tokenizer if d.model.tokenizer is not None else tok
        self.meta["source_dtype"] = str(export.source_dtype(self.model, None if isinstance(d.model.model, nn.Module)
                                                            else self.meta)).replace("torch.", "")
        self.arch = get_arch(self.model)
        if self.tok is None and (d.evaluation.evaluate or run.d.out_dir is not None
                                 or not torch.is_tensor(run.d.calib_given)):
            raise RunError("an in-memory model needs its tokenizer (tokenizer=) for text calibration, evaluation "
                           "and saving")
        if run.d.out_dir is not None:  # what the save format needs of the loaded model, before any pruning
            export.check_loaded(self.model, self.tok, d.output.save_format, gguf_type=d.output.gguf_type)

    def config_record(self, run, rec: dict) -> dict:
        return rec

    def before_prune(self, run) -> None:
        self.counts_before = count_prunable(self.model, self.arch)
        self.dense_copy = None
        if run.d.evaluation.kl and run.d.evaluation.evaluate:  # kept on the CPU for the data-free KL after pruning
            import copy
            self.dense_copy = copy.deepcopy(self.model).to("cpu")

    def prune(self, run, calib) -> Optional[dict]:
        d = run.d
        if run.d.hidden:  # the residual stream as a whole: statistics, its program, the rewrite (hidden.py)
            from ..hidden import prune_hidden
            res = prune_hidden(self.model, calib, method=run.d.spec.name, sparsity=run.sparsity,
                               method_options=run.d.method_options,
                               batch_size=forward_batch_size(run.config.batch_size, *calib.shape),
                               device=run.d.device, progress=d.execution.progress)
            run.record["hidden"] = res["hidden"]
            self.model.to("cpu")
            return res
        # with a checkpoint: saved after every block, resumed from the saved ones
        return (run.checkpoint.run_pipeline if run.checkpoint is not None else _call)(
            prune_model_parallel, self.model, calib, run.config, progress=d.execution.progress, nproc=run.d.nproc,
            source=self.recipe)

    def weight_counts(self, res: dict) -> tuple:
        tot, before = self.counts_before
        return tot, before, count_prunable(self.model, self.arch)[1]

    def evaluate(self, run) -> dict:
        d, s, record, timings = run.d, run.protocol, {}, run.timings
        t0 = time.perf_counter()
        record["perplexity"] = perplexities(self.model, self.tok, s, d.calibration.data_dir, run.d.device,
                                             d.execution.progress, None)
        timings["eval_s"] = time.perf_counter() - t0
        if self.dense_copy is not None:  # data-free KL / top-1 against the dense model, held-out sequences
            from ..divergence import heldout_divergence
            t0 = time.perf_counter()
            self.model.to(run.d.device)
            self.dense_copy.to(run.d.device)
            record["divergence_self"] = heldout_divergence(self.model, self.dense_copy, self.tok, seed=s["seed"],
                                                           seqlen=HELDOUT_SEQLEN, progress=d.execution.progress)
            record["divergence_self"]["reference"] = "the dense model before pruning"
            self.dense_copy = None
            timings["divergence_self_s"] = time.perf_counter() - t0
        return record

    def output(self, run):
        from ..checkpoint import atomic_output
        return atomic_output(run.d.out_dir, overwrite=run.d.output.overwrite) if run.d.out_dir is not None \
            else contextlib.nullcontext()

    def save(self, run, stage: Path) -> dict:
        from .. import export
        d = run.d
        if run.d.hidden:
            from ..hidden import save_sliced
            return save_sliced(self.model, self.tok, stage,
                               dtype=export.resolve_dtype(d.output.dtype, getattr(torch, self.meta["source_dtype"])))
        return save_pruned_model(self.model, self.tok, stage, self.arch, run.d.spec, save_format=d.output.save_format,
                     dtype=export.resolve_dtype(d.output.dtype, getattr(torch, self.meta["source_dtype"])),
                     layers=[r["name"] for r in run.record["layers"]], pattern=d.method.pattern,
                     format_options={"gguf_type": d.output.gguf_type})

    def print_summary(self, record: dict) -> None:
        h = record.get("hidden")
        if h:
            print(f"  hidden: {h['hidden_before']} → {h['hidden_after']} ({h['form']}, {h['method']}); parameters "
                  f"{h['params_before'] / 1e6:.3f}M → {h['params_after'] / 1e6:.3f}M; residual energy lost "
                  f"{h['lost_energy']:.4f} (no rank-{h['hidden_after']} map loses less than "
                  f"{h['lost_energy_rank_bound']:.4f})")

    # ---------------------------------------------------------------- block-parallel ranks
    def spawnable(self) -> bool:
        return self.recipe is not None

    def worker_recipe(self) -> tuple:
        return (InMemorySource, (self.recipe,))

    @staticmethod
    def for_worker(recipe) -> "InMemorySource":
        if callable(recipe):
            return InMemorySource(model=recipe())
        from ..loading import load_model
        name, model_dir = recipe if isinstance(recipe, (tuple, list)) else (recipe, None)
        model, _, _ = load_model(name, model_dir=model_dir)
        return InMemorySource(model=model)

    def prune_rank(self, calib_ids, config, mine: list, progress: bool) -> dict:
        from ..pipeline import prune_model
        if not mine:
            return {"layers": [], "blocks": []}
        res = prune_model(self.model, calib_ids, dataclasses.replace(config, blocks=mine), progress=progress)
        return {k: res.get(k) for k in ("layers", "blocks", "time_s", "peak_rss_mb", "device", "peak_cuda_mb")}

    def gather(self, ctx: DistContext, plan, owners: list) -> int:
        """The pruned blocks to rank 0, block by block and tensor by tensor (a structured method's shrunk block
        as one pickled module); returns the bytes moved."""
        import torch.distributed as dist

        from ..architectures import get_module
        blocks_mod = get_module(self.model, plan.arch.blocks)
        owner_of = {b: r for r, bl in enumerate(owners) for b in bl}
        structured = bool(plan.spec.structured)
        sent = 0
        for b in plan.blocks:
            o = owner_of[b]
            if o == 0:
                continue
            if ctx.rank == o:
                if structured:
                    dist.send_object_list([blocks_mod[b].to("cpu")], dst=0)
                else:
                    for t in blocks_mod[b].state_dict().values():
                        send_tensor(t, 0, ctx)
                        sent += t.numel() * t.element_size()
            elif ctx.rank == 0:
                if structured:
                    box = [None]
                    dist.recv_object_list(box, src=o)
                    blocks_mod[b] = box[0].to(next(blocks_mod[0].parameters()).device)
                else:
                    for t in blocks_mod[b].state_dict().values():
                        recv_into(t, o, ctx)
                        sent += t.numel() * t.element_size()
        dist.barrier()
        return sent

    def finish_merge(self, res: dict, gathered: list, plan, t0: float, t_ready: float) -> None:
        res["distributed"]["startup_wait_s"] = t_ready - t0
        res["distributed"]["parallel_s"] = time.perf_counter() - t_ready  # broadcast done → gathered


def prune_model_parallel(model, calib_ids, config, *, progress: bool = True, nproc: int = 1, source=None,
                         assignment: Optional[str] = None, on_block=None) -> Optional[dict]:
    """The pipeline on an in-memory model: :func:`~.pipeline.prune_model` on one process, block-parallel on
    several (``nproc > 1``: workers load the model from ``source`` — ``(name_or_path, model_dir)`` as given to
    ``load_model``, or a picklable callable; under torchrun every rank calls this with its own model).

    Returns the pipeline's record (merged over ranks, plus ``"distributed"``) on rank 0, ``None`` on others."""
    from ..pipeline import prune_model
    if world_for(nproc) <= 1:
        return prune_model(model, calib_ids, config, progress=progress, on_block=on_block)
    if on_block is not None:
        raise DistributedError("per-block checkpoints (--checkpoint-dir/--resume) need a single process")
    return run_blocks_parallel(InMemorySource(model=model, recipe=source), calib_ids, config, nproc=nproc,
                               progress=progress, assignment=assignment)


def prune_model_distributed(ctx: DistContext, model, calib_ids, config, *, progress: bool = True,
                            assignment: Optional[str] = None, _error: Optional[BaseException] = None) -> Optional[dict]:
    """Every rank of ``ctx`` calls this with its own copy of the dense model. Rank 0 returns the merged record
    (its ``model`` then holds every pruned block); the other ranks return ``None``."""
    return prune_rank(ctx, InMemorySource(model=model), calib_ids, config, progress=progress,
                      assignment=assignment, error=_error)
