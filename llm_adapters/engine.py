"""The prune engine: one object owns a prune from settings to saved output, whatever holds the model.

:class:`PruneRun` (behind ``optprune prune``, :func:`optprune.llm_adapters.run.prune` and :func:`optprune.prune`):

1. **preflight** — every option, file and folder is checked, and the settings (protocol, calibration,
   evaluation) resolved, once and before any model weight is read: bad input raises a one-line ``ValueError``
   / ``FileNotFoundError`` and nothing is written;
2. **load** the model through its *source* (below), clip the protocol to the model's context and check the
   pattern against every prunable sub-layer;
3. **calibration** (protocol data, texts/ids given in memory, or sequences sampled from the model) and the
   per-layer **allocation**;
4. **prune**: the source walks the blocks and the pipeline (:func:`~.pipeline.prune_model`) solves the layers,
   on one process or on block-parallel ranks (:func:`run_blocks_parallel`), with per-block checkpoints and
   resume (:mod:`.checkpoint`);
5. **record** (``run.json``: config, versions, machine, protocol, per-layer records, timings, memory,
   perplexities) and **save** (atomic output: written beside the target, renamed into place at the end).

Where the model lives is a strategy, not a fork of the flow:

* :class:`InMemorySource` — the whole model in memory (loaded, or a model object given by the caller);
* :class:`ShardedSource` — one block at a time from the safetensors shards (``--low-memory``): the block walk
  :func:`prune_offloaded` materialises a block, prunes it through the pipeline on its stored inputs, writes its
  output shard and computes the next block's inputs; storage mechanics live in :mod:`.offload`.

A source answers the engine's calls in order: ``check`` (in the preflight: what it cannot do), ``staging``
(where output is written while pruning), ``load``, ``config_record``, ``before_prune``, ``prune``,
``weight_counts``, ``evaluate``, ``output`` and ``save``, ``print_summary``; and on block-parallel ranks
``spawnable``/``worker_recipe``/``for_worker`` (a worker's own copy), ``prune_rank`` (this rank's blocks),
``gather`` (the pruned blocks to rank 0) and ``finish_merge``.

Either source runs block-parallel with ``--nproc N`` or under torchrun (``mode="dense-input"``): every rank
prunes its own blocks (:func:`assign_blocks`), then the source gathers them — in memory, the pruned blocks
travel to rank 0; sharded, every rank has written its own shards and rank 0 writes the rest. Process and
communication mechanics live in :mod:`.distributed`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
import types
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import data as D
from .checkpoint import WriteError, as_write_error
from .distributed import (ENV_ASSIGNMENT, DistContext, DistributedError, _broadcast_inputs, _check_mode,
                          _device_for_rank, _recv_into, _send_tensor, _tcp_addresses, assign_blocks,
                          distributed_context, env_world, exchange, world_for)
from .offload import OffloadError, OffloadedModel, _forward_inplace, _hidden, _save_shard, write_rest_and_index
from .pipeline import _batch_size, _peak_rss_mb
from .report import (HELDOUT_SEQLEN, RUN_FILE, check_reference_hook, _count_prunable, _divergence, _jsonable,
                     _machine, _memory_meta, _perplexities, _print_header, _print_prune_summary, _save, _versions)
from .description import RunDescription, resolve
from .settings import RunError, clip_to_context, protocol_record

__all__ = ["PruneRun", "InMemorySource", "ShardedSource", "run_blocks_parallel", "prune_model_parallel",
           "prune_model_distributed", "prune_offloaded"]

log = logging.getLogger("optprune")
#: the plot of the ``--allocation auto`` candidates, written next to run.json
SELECTION_PLOT = "allocation_selection.png"


# ============================================================================================ the engine
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
        self.ck = None
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
        self.spec, self.method_options, self.sparsity = d.spec, d.method_options, d.sparsity
        self.structure, self.hidden, self.depth, self.alloc = d.structure, d.hidden, d.depth, d.allocation
        self.nproc, self.world, self.dev, self.out_dir = d.nproc, d.world, d.device, d.out_dir
        self.targets, self.ignore, self.model_label = d.targets, d.ignore, d.model_label
        self.calib_given, self.data_free, self.packing, self.file_rows = (d.calib_given, d.data_free, d.packing,
                                                                          d.file_rows)
        self.s = d.protocol
        source = ShardedSource() if d.execution.low_memory else InMemorySource()
        source.check(self)  # what this source cannot do, still before any weight is read
        from . import preflight
        self.ck = None if self.depth else preflight.open_checkpoint(  # per-block checkpoints + resume (checkpoint.py)
            self.out_dir, d.output.checkpoint_dir, d.output.resume, single=self.world == 1 and not d.execution.low_memory,
            settings=d.resume_key())
        self.source = source
        return self

    # ------------------------------------------------------------------------------------ 2.–5. the run
    def run(self):
        self.preflight()
        d, s = self.d, self.s
        if self.verbose:  # what is about to run, after every check, before any heavy work
            _print_header(self.model_label, self.spec, self.sparsity, "hidden" if self.hidden else d.method.pattern, s,
                          evaluate=d.evaluation.evaluate, kl=d.evaluation.kl, out_dir=self.out_dir, speedup=d.method.speedup,
                          flops=d.method.flops)
        try:
            with self.source.staging(self) as write_dir:  # sharded: shards are written while pruning
                self.write_dir = write_dir
                return self._run()
        except RunError:  # settings that cannot succeed (e.g. a missed sparsity target): resuming them would fail
            if self.ck is not None and not d.output.resume:  # the same way, and the checkpoint would block the next run
                self.ck.remove()
            raise
        except Exception as e:  # noqa: BLE001 - the disk (full, read-only) while writing: one line, file and remedy
            err = as_write_error(e, self.out_dir or "the output")
            if err is None:
                raise
            raise RunError(self._write_failure(err)) from None

    def _run(self):
        d, s, src = self.d, self.s, self.source
        timings = self.timings = {}
        t0 = time.perf_counter()
        src.load(self)  # the model (or its skeleton), tokenizer and metadata
        timings["load_s"] = time.perf_counter() - t0
        clip_to_context(s, src.model)
        speed_dense = None
        if not self.depth and d.method.speedup is not None:  # widths from the speed budget
            import copy
            from .depth import width_sparsity
            rec = width_sparsity(src.model, src.arch, float(d.method.speedup))
            self.sparsity = rec["sparsity"]
            self.width_budget = rec
            speed_dense = copy.deepcopy(src.model).to("cpu")
        config = self.config = self._prune_config()
        from .pipeline import validate_config
        if self.hidden:
            from .hidden import hidden_plan
            hidden_plan(src.model, src.arch)  # a model whose stream cannot be sliced fails before calibration
        elif not self.depth:
            validate_config(src.model, config)  # the pattern against every sub-layer shape (e.g. 4:8 on width 172)
        record = self.record = {"command": "prune", "status": "running",
                                "config": _jsonable(src.config_record(self, self.d.record(sparsity=self.sparsity, damp=self.config.damp))),
                                "versions": _versions(), "machine": _machine(self.dev), "model": src.meta}
        if speed_dense is not None:
            record["speed_budget"] = _jsonable(self.width_budget)
        if d.evaluation.eval_dense and d.evaluation.evaluate and src.whole:
            t0 = time.perf_counter()
            record["perplexity_dense"] = _perplexities(src.model, src.tok, s, d.calibration.data_dir, self.dev, d.execution.progress,
                                                       None)
            timings["eval_dense_s"] = time.perf_counter() - t0
            src.model.to("cpu")
        t0 = time.perf_counter()
        calib, calib_info = self._calibration()
        if "tokens" not in calib_info:  # how many calibration tokens the statistics saw
            calib_info["tokens"] = 0 if self.data_free else int(calib.numel())
        timings["calibration_s"] = time.perf_counter() - t0
        record["calibration"] = _jsonable(calib_info)
        if self.alloc != "uniform":
            self._allocation(calib)
        src.before_prune(self)
        res = self._prune_depth(calib) if self.depth else src.prune(self, calib)
        if res is None:  # a non-zero rank of a block-parallel run: rank 0 evaluates, saves and records
            return None
        timings["prune_s"] = res.get("time_s")
        self._summarize(res)
        if speed_dense is not None:  # the pruned model's measured speed-up (dense and pruned runs alternated)
            from .latency import measure_speedup
            src.model.to("cpu")
            record["speed"] = measure_speedup(speed_dense, src.model)
            speed_dense = None
        if d.evaluation.evaluate:
            src.evaluate(self)
        if d.evaluation.reference:
            t0 = time.perf_counter()
            record.update(_divergence(src.model, src.tok, d.evaluation.reference, s, model_dir=d.model.model_dir,
                                      data_dir=d.calibration.data_dir, device=self.dev, progress=d.execution.progress))
            timings["divergence_s"] = time.perf_counter() - t0
        record["protocol"] = protocol_record(s)
        with src.output(self) as stage:  # (in memory: written beside the target, renamed into place at the end)
            if self.out_dir is not None:
                t0 = time.perf_counter()
                try:
                    record["saved"] = {**src.save(self, stage), "path": str(self.out_dir.resolve())}
                except Exception as e:  # noqa: BLE001 - a full disk, in any library's words (SafetensorError...)
                    err = as_write_error(e, self.out_dir, writing=True)
                    if err is None:
                        raise
                    raise err from None
                if self.selection is not None:
                    from .allocation_select import plot_selection
                    plot_selection(self.selection, stage / SELECTION_PLOT)
                timings["save_s"] = time.perf_counter() - t0
            timings["total_s"] = time.perf_counter() - self.t_total
            record["timings"] = timings
            record["peak_rss_mb"] = _peak_rss_mb()
            if res.get("peak_cuda_mb") is not None:
                record["peak_cuda_mb"] = res["peak_cuda_mb"]
            record["status"] = "done"
            record = _jsonable(record)
            if self.out_dir is not None:
                (stage / RUN_FILE).write_text(json.dumps(record, indent=1))
        if self.ck is not None:
            self.ck.remove()
        if self.verbose:
            _print_prune_summary(record, self.out_dir)
            src.print_summary(record)
        if d.output.return_model:
            return src.model, src.tok, record
        return record

    def _write_failure(self, e: WriteError) -> str:
        """One line for a write that failed late (output or checkpoint): the file, the reason, the remedy —
        ``--resume`` when a checkpoint of the pruned blocks is kept."""
        import errno
        f = getattr(e, "filename", None) or (self.out_dir or "the output")
        why = e.strerror or str(e) or type(e).__name__
        fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else "make it writable"
        kept = self.ck is not None and self.ck.usable()
        nxt = (f"the checkpoint in {self.ck.path} is kept: run the same command with --resume to continue" if kept
               else "run the command again")
        return f"writing {f} failed ({why}); nothing was replaced — {fix}, then {nxt}"

    # ------------------------------------------------------------------------------------ pieces
    def _prune_config(self):
        from .pipeline import PruneConfig
        d = self.d
        kw = dict(method=self.spec.name, sparsity=self.sparsity, pattern=d.method.pattern, min_degree=d.method.min_degree,
                  quant=d.method.quant,
                  layer_sparsity=None, structure=self.structure, mode=d.method.mode,
                  error_correction=bool(d.method.error_correction), refit=bool(d.method.refit),
                  method_options=self.method_options, device=self.dev, certify=bool(d.method.certify))
        if d.method.damp is not None:
            kw["damp"] = float(d.method.damp)
        if d.execution.batch_size is not None:
            kw["batch_size"] = int(d.execution.batch_size)
        if self.targets or self.ignore:
            kw.update(targets=self.targets, ignore=self.ignore)
        return PruneConfig(**kw)

    def _prune_depth(self, calib) -> dict:
        """``--structure depth``: select and remove whole blocks (llm_adapters/depth.py); the selection, the
        budget and the measured speed-up go into the record."""
        from .depth import prune_depth
        d, src = self.d, self.source
        src.model.to("cpu")
        rec = prune_depth(src.model, src.arch, calib, rule=self.spec.name, options=self.method_options,
                          speedup=d.method.speedup, flops=d.method.flops, sparsity=None if (d.method.speedup or d.method.flops) else self.sparsity,
                          progress=self.verbose)
        if "speed" in rec:
            self.record["speed"] = rec.pop("speed")
        self.record["depth"] = _jsonable(rec)
        return {"layers": [], "blocks": [], "time_s": rec["time_s"]}

    def _calibration(self):
        """Token ids ``(nsamples, seqlen)`` and their description (run.json's ``calibration``)."""
        d, s, src, ck = self.d, self.s, self.source, self.ck
        if self.calib_given is not None or (self.packing == "rows" and not self.data_free):
            # texts, a datasets.Dataset or token ids in memory, or a text file's lines as rows (calib_inputs.py)
            from .calib_inputs import calibration_from
            given = self.calib_given if self.calib_given is not None else self.file_rows
            calib, info = calibration_from(
                src.tok, given, nsamples=s["nsamples"], seqlen=s["seqlen"], seed=s["seed"],
                explicit_nsamples=d.calibration.nsamples, explicit_seqlen=d.calibration.seqlen, text_column=d.calibration.text_column,
                vocab_size=getattr(src.model.get_input_embeddings(), "num_embeddings", None),
                packing=self.packing or "windows", kind=None if self.calib_given is not None else "text file")
            if self.calib_given is None:
                info["path"] = str(Path(s["calibration_path"]).resolve())
            lengths = info.pop("lengths", None)
            if lengths is not None:  # rows as samples: the pipeline cuts each batch to its rows' length
                self.config.calib_lengths = tuple(lengths)
            s["nsamples"], s["seqlen"] = int(calib.shape[0]), int(calib.shape[1])
            return calib, info
        if self.data_free:  # the pipeline walks the blocks on a 2-token stand-in; nothing is measured from it
            return torch.zeros((1, 2), dtype=torch.long), {"source": "none", "note": "data-free method"}
        if s["calibration"] == "self" and ck is not None and ck.calib is not None:  # resumed: saved sequences
            return ck.calib, ck.calib_info
        if s["calibration"] == "self":  # sequences sampled from the dense model itself
            from .selfcalib import self_calibration
            info: dict = {}
            src.model.to(self.dev)
            calib = self_calibration(src.model, src.tok, s["nsamples"], s["seqlen"], seed=s["seed"], info=info,
                                     progress=d.execution.progress, done_rows=ck and ck.calib_rows,
                                     on_batch=ck and ck.save_calib_rows)
            src.model.to("cpu")
            if ck is not None:
                ck.save_calib(calib, info)
            return calib, info
        return D.calibration_tokens(src.tok, s["calibration"], nsamples=s["nsamples"], seqlen=s["seqlen"],
                                    seed=s["seed"], data_dir=d.calibration.data_dir, return_info=True)

    def _allocation(self, calib) -> None:
        """Per-sub-layer sparsities (``--allocation``) into the pipeline's config."""
        d, src = self.d, self.source
        t0 = time.perf_counter()
        from .allocation_targets import layer_sparsities
        layer_s, info = layer_sparsities(src.model, src.arch, self.alloc, self.sparsity,
                                                        eps=d.method.allocation_eps, calib_ids=calib, data=None,
                                                        prune_config=self.config, progress=self.verbose)
        self.config.layer_sparsity = dict(layer_s)
        self.timings["allocation_s"] = time.perf_counter() - t0
        if self.out_dir is not None and info.get("candidates"):  # auto: candidates' scores, saved next to run.json
            self.selection = info
            info["plot"] = str(self.out_dir / SELECTION_PLOT)
        self.record["allocation"] = _jsonable(info)

    def _summarize(self, res: dict) -> None:
        """Per-layer and per-block records and the summary of the pruned weights into the record."""
        record = self.record
        layers = res.get("layers", [])
        if self.data_free:
            for r in layers:
                r["rel_error"] = None
        tot_w, nz_before, nz_after = self.source.weight_counts(res)
        record["layers"] = _jsonable(layers)
        record["blocks"] = _jsonable(res.get("blocks", []))
        record["pipeline"] = _jsonable({k: v for k, v in res.items() if k not in ("layers", "blocks")})
        rel = [r["rel_error"] for r in layers if r.get("rel_error") is not None]
        targets = [(r["sparsity_target"], math.prod(r["shape"])) for r in layers if "shape" in r]
        record["summary"] = {
            "prunable_weights": tot_w, "nonzero_before": nz_before, "nonzero_after": nz_after,
            "sparsity": 1.0 - (nz_after or 0) / tot_w if tot_w else 0.0,
            "sparsity_target": (sum(t * n for t, n in targets) / sum(n for _, n in targets)) if targets else None,
            "layers": len(layers),
            "mean_rel_error": (sum(rel) / len(rel)) if rel else None,
            "max_rel_error": max(rel) if rel else None,
        }
        if self.d.method.certify:
            from ..solvers.bounds import summarize_certificates
            record["summary"]["certificates"] = summarize_certificates(layers)


def _call(fn, *a, **kw):
    return fn(*a, **kw)


# ============================================================================================ model sources
class InMemorySource:
    """The whole model in memory: loaded from its name/folder/file (built-in, HF directory, ``.gguf``, hub id),
    or the model object the caller passed (pruned in place)."""

    whole = True  # the model object is whole: dense evaluation, self-calibration, allocation, KL work on it

    def __init__(self, model=None, recipe=None):
        self.model, self.tok, self.meta, self.arch = model, None, None, None
        self.recipe = recipe  # how a spawned worker gets its own copy: (name_or_path, model_dir) or a callable

    # ---------------------------------------------------------------- the engine's calls
    def check(self, run: PruneRun) -> None:
        self.recipe = (run.d.model.model, run.d.model.model_dir)

    def staging(self, run: PruneRun):
        return contextlib.nullcontext(run.out_dir)  # the output is written as a whole at the end (output())

    def load(self, run: PruneRun) -> None:
        from . import export, preflight
        from .architectures import get_arch
        from .loading import load_model
        d = run.d
        if isinstance(d.model.model, torch.nn.Module):
            self.model, self.tok, self.meta = d.model.model, d.model.tokenizer, _memory_meta(d.model.model, run.model_label)
        else:
            self.model, tok, self.meta = preflight.load_checked(load_model, d.model.model, model_dir=d.model.model_dir,
                                                                require_arch=True)
            self.tok = d.model.tokenizer if d.model.tokenizer is not None else tok
        self.meta["source_dtype"] = str(export.source_dtype(self.model, None if isinstance(d.model.model, nn.Module)
                                                            else self.meta)).replace("torch.", "")
        self.arch = get_arch(self.model)
        if self.tok is None and (d.evaluation.evaluate or run.out_dir is not None or not torch.is_tensor(run.calib_given)):
            raise RunError("an in-memory model needs its tokenizer (tokenizer=) for text calibration, evaluation "
                           "and saving")
        if run.out_dir is not None:  # what the save format needs of the loaded model, before any pruning
            export.check_loaded(self.model, self.tok, d.output.save_format, gguf_type=d.output.gguf_type)

    def config_record(self, run: PruneRun, rec: dict) -> dict:
        return rec

    def before_prune(self, run: PruneRun) -> None:
        self.counts_before = _count_prunable(self.model, self.arch)
        self.dense_copy = None
        if run.d.evaluation.kl and run.d.evaluation.evaluate:  # kept on the CPU for the data-free KL after pruning
            import copy
            self.dense_copy = copy.deepcopy(self.model).to("cpu")

    def prune(self, run: PruneRun, calib) -> Optional[dict]:
        d = run.d
        if run.hidden:  # the residual stream as a whole: statistics, its program, the rewrite (hidden.py)
            from .hidden import prune_hidden
            res = prune_hidden(self.model, calib, method=run.spec.name, sparsity=run.sparsity,
                               method_options=run.method_options,
                               batch_size=_batch_size(run.config.batch_size, *calib.shape),
                               device=run.dev, progress=d.execution.progress)
            run.record["hidden"] = res["hidden"]
            self.model.to("cpu")
            return res
        return (run.ck.run_pipeline if run.ck is not None else _call)(  # checkpoints after every block; resumes
            prune_model_parallel, self.model, calib, run.config, progress=d.execution.progress, nproc=run.nproc,
            source=self.recipe)

    def weight_counts(self, res: dict) -> tuple:
        tot, before = self.counts_before
        return tot, before, _count_prunable(self.model, self.arch)[1]

    def evaluate(self, run: PruneRun) -> None:
        d, s, record, timings = run.d, run.s, run.record, run.timings
        t0 = time.perf_counter()
        record["perplexity"] = _perplexities(self.model, self.tok, s, d.calibration.data_dir, run.dev, d.execution.progress, None)
        timings["eval_s"] = time.perf_counter() - t0
        if self.dense_copy is not None:  # data-free KL / top-1 against the dense model, held-out sequences
            from .divergence import heldout_divergence
            t0 = time.perf_counter()
            self.model.to(run.dev)
            self.dense_copy.to(run.dev)
            record["divergence_self"] = heldout_divergence(self.model, self.dense_copy, self.tok, seed=s["seed"],
                                                           seqlen=HELDOUT_SEQLEN, progress=d.execution.progress)
            record["divergence_self"]["reference"] = "the dense model before pruning"
            self.dense_copy = None
            timings["divergence_self_s"] = time.perf_counter() - t0

    def output(self, run: PruneRun):
        from .checkpoint import atomic_output
        return atomic_output(run.out_dir, overwrite=run.d.output.overwrite) if run.out_dir is not None \
            else contextlib.nullcontext()

    def save(self, run: PruneRun, stage: Path) -> dict:
        from . import export
        d = run.d
        if run.hidden:
            from .hidden import save_sliced
            return save_sliced(self.model, self.tok, stage,
                               dtype=export.resolve_dtype(d.output.dtype, getattr(torch, self.meta["source_dtype"])))
        return _save(self.model, self.tok, stage, self.arch, run.spec, save_format=d.output.save_format,
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
        return ("in-memory", (self.recipe,))

    @staticmethod
    def for_worker(recipe) -> "InMemorySource":
        if callable(recipe):
            return InMemorySource(model=recipe())
        from .loading import load_model
        name, model_dir = recipe if isinstance(recipe, (tuple, list)) else (recipe, None)
        model, _, _ = load_model(name, model_dir=model_dir)
        return InMemorySource(model=model)

    def prune_rank(self, calib_ids, config, mine: list, progress: bool) -> dict:
        from .pipeline import prune_model
        if not mine:
            return {"layers": [], "blocks": []}
        res = prune_model(self.model, calib_ids, dataclasses.replace(config, blocks=mine), progress=progress)
        return {k: res.get(k) for k in ("layers", "blocks", "time_s", "peak_rss_mb", "device", "peak_cuda_mb")}

    def gather(self, ctx: DistContext, plan, owners: list) -> int:
        """The pruned blocks to rank 0, block by block and tensor by tensor (a structured method's shrunk block
        as one pickled module); returns the bytes moved."""
        import torch.distributed as dist

        from .architectures import get_module
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
                        _send_tensor(t, 0, ctx)
                        sent += t.numel() * t.element_size()
            elif ctx.rank == 0:
                if structured:
                    box = [None]
                    dist.recv_object_list(box, src=o)
                    blocks_mod[b] = box[0].to(next(blocks_mod[0].parameters()).device)
                else:
                    for t in blocks_mod[b].state_dict().values():
                        _recv_into(t, o, ctx)
                        sent += t.numel() * t.element_size()
        dist.barrier()
        return sent

    def finish_merge(self, res: dict, gathered: list, plan, t0: float, t_ready: float) -> None:
        res["distributed"]["startup_wait_s"] = t_ready - t0
        res["distributed"]["parallel_s"] = time.perf_counter() - t_ready  # broadcast done → gathered


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
    def check(self, run: PruneRun) -> None:
        from .offload import parse_dtype
        d, s = run.d, run.s
        if d.output.output is None:
            raise OffloadError("--low-memory writes the pruned model shard by shard: give --output DIR")
        if run.spec.structured:
            raise OffloadError(f"--low-memory prunes unstructured/N:M methods; {run.spec.name!r} is structured (it "
                               f"changes widths): use the in-memory path")
        if run.alloc != "uniform":
            raise OffloadError(f"--allocation {run.alloc} reads every weight matrix first; it is not available "
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

    def staging(self, run: PruneRun):
        """The shards are written while pruning: one process writes beside the target and renames into place
        at the end; block-parallel ranks write into the output directory itself."""
        from .checkpoint import atomic_output
        if run.world == 1:
            return atomic_output(run.out_dir, overwrite=run.d.output.overwrite)
        return contextlib.nullcontext(run.out_dir)

    def load(self, run: PruneRun) -> None:
        from transformers import AutoTokenizer

        from .offload import _resolve_source
        self.directory = _resolve_source(run.d.model.model, run.d.model.model_dir)
        self.om = om = OffloadedModel(self.directory)
        self.tok = AutoTokenizer.from_pretrained(str(self.directory))
        self.out_dir = Path(run.write_dir)
        c = om.config
        self.meta = {"name": str(run.d.model.model), "source": str(Path(self.directory).resolve()),
                     "format": "safetensors (low-memory)", "model_type": getattr(c, "model_type", None),
                     "architecture": (getattr(c, "architectures", None) or [type(om.model).__name__])[0],
                     "n_params": om.n_params(), "dtype": str(om.dtype).replace("torch.", ""),
                     "num_layers": om.n_blocks, "hidden_size": _hidden(om),
                     "max_position_embeddings": getattr(c, "max_position_embeddings", getattr(c, "n_positions", None)),
                     "vocab_size": getattr(c, "vocab_size", None)}

    def config_record(self, run: PruneRun, rec: dict) -> dict:
        for k in ("targets", "ignore", "save_format", "dtype", "certify"):
            rec.pop(k)
        rec.update(world_size=run.world, low_memory=True,
                   activation_dtype=str(self.act or self.om.dtype).replace("torch.", ""))
        return rec

    def before_prune(self, run: PruneRun) -> None:
        if env_world() is None or env_world()[0] == 0:  # (torchrun: rank 0 only; the others wait at a barrier)
            from .offload import _clean_output
            _clean_output(self.out_dir)

    def prune(self, run: PruneRun, calib) -> Optional[dict]:
        if run.world > 1:
            return run_blocks_parallel(self, calib, run.config, nproc=run.nproc, progress=run.d.execution.progress)
        return prune_offloaded(self.om, calib, run.config, self.out_dir, activation_dtype=self.act,
                               progress=run.d.execution.progress)

    def weight_counts(self, res: dict) -> tuple:
        low = res.get("low_memory") or {}
        return low.get("prunable_weights", 0), low.get("nonzero_before"), low.get("nonzero_after", 0)

    def evaluate(self, run: PruneRun) -> None:
        """Perplexity streamed block by block from the written shards."""
        from .offload import perplexity_offloaded
        s, d = run.s, run.d
        if not s["eval_datasets"]:
            return
        t0 = time.perf_counter()
        ppl = {}
        for name in s["eval_datasets"]:
            ids = D.eval_tokens(self.tok, name, seqlen=s["eval_seqlen"], data_dir=d.calibration.data_dir)
            r = perplexity_offloaded(self.out_dir, ids, s["eval_seqlen"], max_windows=s["eval_windows"],
                                     device=run.dev, dtype=self.om.dtype, progress=d.execution.progress,
                                     desc=f"eval {name} (streamed)")
            r["dataset"] = name
            r["all_windows"] = s["eval_windows"] is None or r["windows"] < s["eval_windows"]
            ppl[name] = r
        run.record["perplexity"] = ppl
        run.timings["eval_s"] = time.perf_counter() - t0

    def output(self, run: PruneRun):
        return contextlib.nullcontext(self.out_dir)  # (already staged around the whole run)

    def save(self, run: PruneRun, stage: Path) -> dict:
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
        return ("sharded", (str(self.directory), self.om.dtype, str(self.out_dir), self.act))

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


_SOURCES = {"in-memory": InMemorySource, "sharded": ShardedSource}


# ============================================================================================ block-parallel
def run_blocks_parallel(source, calib_ids, config, *, nproc: int, progress: bool = True,
                        assignment: Optional[str] = None) -> Optional[dict]:
    """The blocks of ``source`` pruned on ``nproc`` processes (or the ranks of a torchrun): this process is rank
    0 and spawns ``nproc − 1`` workers that build their own source from ``source.worker_recipe()``. Returns the
    merged record on rank 0, ``None`` elsewhere (see :mod:`.distributed` for launch, transfer and errors)."""
    from .pipeline import validate_config
    world = world_for(nproc)
    _check_mode(config)
    validate_config(source.model, config, calib_ids)  # bad input: the same one-line error on every rank
    assignment = assignment or os.environ.get(ENV_ASSIGNMENT)
    assign_blocks([0], 1, assignment)  # checks the name
    if env_world() is None and not source.spawnable():
        raise DistributedError("nproc > 1 needs a model source the workers can load (source=(name, model_dir))")
    with distributed_context(world, _spawned_worker, (source.worker_recipe(), config, assignment),
                             device=config.device) as ctx:
        if progress and ctx.rank == 0:
            where = "loopback 127.0.0.1" if ctx.launcher == "spawn" else \
                "MASTER_ADDR " + os.environ.get("MASTER_ADDR", "?")
            print(f"optprune: block-parallel pruning on {ctx.world} processes ({ctx.backend}, {ctx.launcher}; "
                  f"{where})", file=sys.stderr)
        return prune_rank(ctx, source, calib_ids, config, progress=progress, assignment=assignment)


def _spawned_worker(recipe, config, assignment):
    """A spawned worker (rank ≥ 1): its own source (its own model or skeleton), its own blocks."""
    with distributed_context(1, device=config.device) as ctx:  # env set by the spawning parent → joins the group
        source, err = None, None
        try:
            kind, args = recipe
            source = _SOURCES[kind].for_worker(*args)
        except Exception as e:
            err = e
        prune_rank(ctx, source, None, config, progress=False, assignment=assignment, error=err)


def prune_rank(ctx: DistContext, source, calib_ids, config, *, progress: bool = True,
               assignment: Optional[str] = None, error: Optional[BaseException] = None) -> Optional[dict]:
    """Every rank of ``ctx``: prune this rank's blocks of ``source`` on rank 0's calibration tokens and config,
    exchange the records, gather the pruned blocks (the source's way). Rank 0 returns the merged record; the
    other ranks ``None``. ``error``: this rank already failed (e.g. loading); it still takes part in the exchange."""
    from .pipeline import validate_config
    t0 = time.perf_counter()
    calib_ids, config = _broadcast_inputs(ctx, calib_ids, config)
    t_ready = time.perf_counter()  # every rank is up (rank 0 waited here for the spawned workers to start)
    cpu0 = time.process_time()
    import torch.distributed as dist
    dist.barrier()  # rank 0 has prepared the output (sharded: cleaned it) before anyone writes
    _check_mode(config)
    config = dataclasses.replace(config, device=_device_for_rank(config.device, ctx.local_rank, ctx.backend))
    plan, err, mine = None, error, []
    local = {"layers": [], "blocks": []}
    if err is None:
        try:
            plan = validate_config(source.model, config, calib_ids)
            mine = assign_blocks(plan.blocks, ctx.world, assignment)[ctx.rank]
            local = source.prune_rank(calib_ids, config, mine, progress and ctx.rank == 0)
        except Exception as e:  # reported through the exchange; rank 0 re-raises
            err = e
    summary = {"blocks_owned": mine, "host": socket.gethostname(), "threads": torch.get_num_threads(),
               "device": str(config.device), "tcp_addresses": _tcp_addresses(), **local,
               "prune_time_s": time.perf_counter() - t0, "wait_s": t_ready - t0,
               "work_s": time.perf_counter() - t_ready, "cpu_s": time.process_time() - cpu0,
               "peak_rss_mb": _peak_rss_mb(), "forward_blocks": (min(mine) if mine else 0),
               "structured": None if plan is None else bool(plan.spec.structured)}
    proceed, gathered = exchange(ctx, summary, err)
    if not proceed:  # another rank failed; rank 0 has raised
        return None
    t_x = time.perf_counter()
    owners = assign_blocks(plan.blocks, ctx.world, assignment)
    nbytes = source.gather(ctx, plan, owners)
    t_transfer = time.perf_counter() - t_x
    if ctx.rank != 0:
        return None
    res = _merge(gathered, ctx, owners, assignment, calib_ids, config, time.perf_counter() - t0, t_transfer, nbytes)
    source.finish_merge(res, gathered, plan, t0, t_ready)
    return res


def _merge(gathered: list, ctx: DistContext, owners, assignment, calib_ids, config, wall, t_transfer, nbytes) -> dict:
    """One record from the ranks' records, in block order (the same order as the single-process run)."""
    layers = [r for g in gathered for r in (g.get("layers") or [])]
    layers.sort(key=lambda r: r["block"])  # stable: sub-layer order within a block is kept
    blocks = sorted((r for g in gathered for r in (g.get("blocks") or [])), key=lambda r: r["block"])
    tot = sum(math.prod(r["shape"]) for r in layers)
    zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in layers)
    threads = sorted({g["threads"] for g in gathered})
    addrs = sorted({a for g in gathered for a in g.get("tcp_addresses") or []})
    ranks = [{k: g.get(k) for k in ("rank", "host", "blocks_owned", "forward_blocks", "threads", "device",
                                     "prune_time_s", "wait_s", "work_s", "cpu_s", "time_s", "peak_rss_mb",
                                     "peak_cuda_mb", "tcp_addresses")}
             for g in gathered]
    res = {"layers": layers, "blocks": blocks, "time_s": wall,
           "peak_rss_mb": max(g.get("peak_rss_mb") or 0.0 for g in gathered),
           "sparsity": zeros / tot if tot else 0.0, "device": gathered[0].get("device"),
           "nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
           "batch_size": _batch_size(config.batch_size, *calib_ids.shape),
           "distributed": {"world_size": ctx.world, "backend": ctx.backend, "launcher": ctx.launcher,
                           "assignment": (assignment or os.environ.get(ENV_ASSIGNMENT) or "contiguous"),
                           "owners": owners, "threads": threads, "tcp_addresses": addrs,
                           "transfer_time_s": t_transfer, "transfer_mb": nbytes / 2 ** 20, "ranks": ranks}}
    cuda = [g.get("peak_cuda_mb") for g in gathered if g.get("peak_cuda_mb") is not None]
    if cuda:
        res["peak_cuda_mb"] = max(cuda)
    if len(threads) > 1:
        res["distributed"]["warning"] = (f"ranks ran with different thread counts {threads}: results may differ "
                                         f"in the last bits from a single-process run")
    return res


def prune_model_parallel(model, calib_ids, config, *, progress: bool = True, nproc: int = 1, source=None,
                         assignment: Optional[str] = None, on_block=None) -> Optional[dict]:
    """The pipeline on an in-memory model: :func:`~.pipeline.prune_model` on one process, block-parallel on
    several (``nproc > 1``: workers load the model from ``source`` — ``(name_or_path, model_dir)`` as given to
    ``load_model``, or a picklable callable; under torchrun every rank calls this with its own model).

    Returns the pipeline's record (merged over ranks, plus ``"distributed"``) on rank 0, ``None`` on others."""
    from .pipeline import prune_model
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


# ============================================================================================ the sharded walk
class _BlockView(nn.Module):
    """A causal-LM look-alike holding one block, so that ``prune_model(view, ids, config, inputs=...)`` prunes
    exactly that block on the stored block inputs handed to it."""

    def __init__(self, config, arch, block, vocab):
        super().__init__()
        self.config = config
        parts = arch.blocks.split(".")
        parent = self
        for p in parts[:-1]:
            child = nn.Module()
            parent.add_module(p, child)
            parent = child
        parent.add_module(parts[-1], nn.ModuleList([block]))
        object.__setattr__(self, "optprune_arch", arch)  # get_arch: the full model's, not re-inferred
        object.__setattr__(self, "_emb", types.SimpleNamespace(num_embeddings=vocab))
        self.eval()  # prune_model restores the view's mode: a training-mode view would leave dropout on

    def get_input_embeddings(self):
        return self._emb


def _rename(rec: dict, prefix: str, i: int) -> dict:
    r = dict(rec)
    r["block"] = i
    if "name" in r and r["name"].startswith(f"{prefix}.0."):
        r["name"] = f"{prefix}.{i}." + r["name"][len(prefix) + 3:]
    return r


@torch.no_grad()
def prune_offloaded(om: OffloadedModel, calib_ids, config, out_dir, *, blocks: Optional[list] = None,
                    activation_dtype: Optional[torch.dtype] = None, progress: bool = True,
                    write_rest: bool = True) -> dict:
    """Prune the blocks ``blocks`` (default: ``config.blocks`` or all) of the checkpoint ``om`` one at a time and
    write their shards to ``out_dir``; with ``write_rest`` also the non-block shards, the unselected blocks,
    the index and the config. Returns the pipeline-style record (``layers``, ``blocks``, ...).

    Resident: one block (plus the pipeline's dense copy with error correction), the calibration set's block
    inputs once (in ``activation_dtype``; each batch is cast to the compute dtype as it enters the block), the
    Gram matrices of one group (uncorrected: of the block's groups, each freed once solved) and the
    embeddings only while the first inputs are captured. With the default activation dtype the pruned weights are bit for bit those of the in-memory run."""
    from tqdm.auto import tqdm

    from .architectures import get_module, linear_weight
    from .pipeline import BlockInputs, PipelineError, prune_model, validate_config
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = validate_config(om.model, config, calib_ids)
    if plan.spec.structured:
        raise OffloadError(f"--low-memory prunes unstructured/N:M methods; {plan.spec.name!r} is structured "
                           f"(it changes widths): use the in-memory path")
    mine = sorted(plan.blocks if blocks is None else blocks)
    dev = plan.device
    act_dtype = activation_dtype or om.dtype
    _, block_names = om.shard_names()
    out_dir.mkdir(parents=True, exist_ok=True)
    layers_rec, blocks_rec = [], []
    nz_before = nz_after = tot = 0
    last = mine[-1] if mine else -1

    t0 = time.perf_counter()
    inputs = om.capture(calib_ids, device=dev, batch_size=config.batch_size) if mine else None
    t_capture = time.perf_counter() - t0
    if inputs is not None:
        hidden = inputs.hidden.to("cpu", act_dtype)
        per_block = inputs.per_block  # each block's own masks / positional tables
        del inputs
    vocab = getattr(om.config, "vocab_size", None) or int(calib_ids.max()) + 1
    bar = tqdm(range(last + 1), desc=f"prune {plan.spec.name} (low memory)", unit="block", disable=not progress)
    for i in bar:
        tb = time.perf_counter()
        blk = om.block(i)
        if i not in mine:
            _forward_inplace(blk, hidden, per_block[i], om.dtype, dev)
            om.release(i)
            continue
        subs = [f"{om.prefix}.{i}.{s}" for s in plan.arch.sublayer_names()]
        for s in plan.arch.sublayer_names():
            W = linear_weight(get_module(blk, s), s in plan.arch.transposed)
            nz_before += int((W != 0).sum())
            tot += W.numel()
        ls = None
        if config.layer_sparsity:
            ls = {f"{om.prefix}.0.{n[len(om.prefix) + len(str(i)) + 2:]}": v
                  for n, v in config.layer_sparsity.items() if n in subs}
        view = _BlockView(om.config, plan.arch, blk, vocab)
        cfg = dataclasses.replace(config, blocks=[0], layer_sparsity=ls or None)
        try:  # one block, the last of the view: the pipeline reads the inputs and writes no outputs
            res = prune_model(view, calib_ids, cfg, progress=False, inputs=BlockInputs(hidden, per_block[i]))
        except PipelineError as e:
            raise PipelineError(f"block {i}: {e}") from None
        layers_rec += [_rename(r, om.prefix, i) for r in res["layers"]]
        for r in res["blocks"]:
            blocks_rec.append(_rename(r, om.prefix, i))
        for s in plan.arch.sublayer_names():
            nz_after += int((linear_weight(get_module(blk, s), s in plan.arch.transposed) != 0).sum())
        tw = time.perf_counter()
        _save_shard(om.block_tensors(i, blk), out_dir / block_names[i])
        t_write = time.perf_counter() - tw
        tf = time.perf_counter()
        if i != last:
            if config.mode == "dense-input":  # the next inputs come from the dense block: read it again
                om.release(i)
                blk = om.block(i)
            _forward_inplace(blk, hidden, per_block[i], om.dtype, dev)
        om.release(i)
        blocks_rec[-1].update(write_time_s=t_write, next_inputs_time_s=time.perf_counter() - tf,
                              total_time_s=time.perf_counter() - tb)
    bar.close()
    if write_rest:
        write_rest_and_index(om, out_dir, skip=set(mine))
    tot_all = sum(math.prod(r["shape"]) for r in layers_rec)
    zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in layers_rec)
    res = {"layers": layers_rec, "blocks": blocks_rec, "time_s": time.perf_counter() - t_start,
           "peak_rss_mb": _peak_rss_mb(), "sparsity": zeros / tot_all if tot_all else 0.0, "device": str(dev),
           "nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
           "batch_size": _batch_size(config.batch_size, *calib_ids.shape),
           "low_memory": {"activation_dtype": str(act_dtype).replace("torch.", ""),
                          "compute_dtype": str(om.dtype).replace("torch.", ""), "capture_time_s": t_capture,
                          "model_mb": om.size_bytes() / 2 ** 20,
                          "max_block_mb": max(sum(om.ckpt.nbytes(om.keys[k], om.dtype) for k in ks)
                                              for ks in om.block_keys) / 2 ** 20,
                          "activations_mb": (int(calib_ids.numel()) * _hidden(om) * act_dtype.itemsize) / 2 ** 20,
                          "prunable_weights": tot, "nonzero_before": nz_before, "nonzero_after": nz_after}}
    if dev.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return res
