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

from ..formulations.patterns import check_sparsity, parse_pattern
from ..solvers.registry import check_value
from . import data as D
from .checkpoint import WriteError, as_write_error
from ..solvers.serialization import to_json as _jsonable
from .distributed import (ENV_ASSIGNMENT, DistContext, DistributedError, assign_blocks, distributed_context,
                          env_world, exchange, world_for)
from .distributed import broadcast_inputs as _broadcast_inputs, check_parallel_mode as _check_mode
from .distributed import device_for_rank as _device_for_rank, recv_into as _recv_into, send_tensor as _send_tensor
from .distributed import tcp_addresses as _tcp_addresses
from .offload import OffloadError, OffloadedModel, write_rest_and_index
from .offload import forward_inplace as _forward_inplace, hidden_size as _hidden, save_shard as _save_shard
from .pipeline import forward_batch_size as _batch_size, peak_rss_mb as _peak_rss_mb
from .report import HELDOUT_SEQLEN, RUN_FILE, _check_reference_hook
from .report import count_prunable as _count_prunable, in_memory_meta as _memory_meta
from .report import library_versions as _versions, machine_info as _machine, perplexities as _perplexities
from .report import print_prune_header as _print_header, print_prune_summary as _print_prune_summary
from .report import reference_divergence as _divergence
from .saving import save_pruned_model as _save
from .settings import _ALLOCATIONS_FALLBACK, RunError, _clip_to_context, _default_device, _protocol_record, \
    check_run_options, check_sizes, cpu_cores, model_sizes, resolve_settings

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

    def __init__(self, **options):
        self.t_total = time.perf_counter()
        options.update(check_run_options(options))  # typed options parsed (booleans never by truthiness)
        self.o = types.SimpleNamespace(**options)
        self.verbose = self.o._cli if self.o.verbose is None else self.o.verbose
        self.source = None
        self.selection = None  # --allocation auto: the candidates' scores, plotted into the output

    # ------------------------------------------------------------------------------------ 1. preflight
    def preflight(self) -> "PruneRun":
        """Validate every input that can be checked without the model; resolve the settings (idempotent)."""
        if self.source is not None:
            return self
        o = self.o
        from ..solvers import get_method
        from . import export, preflight
        from .calib_inputs import calibration_kind, check_calibration_type, is_in_memory
        from .pipeline import pattern_kind
        from .targets import parse_patterns

        check_calibration_type(o.calibration)  # a number, dict, generator or bytes: a TypeError, not a file name
        self.depth = str(o.structure or "").strip().lower() == "depth"
        if self.depth:  # whole blocks: --method names a block-selection rule (llm_adapters/depth.py)
            from .depth import check_depth_options, depth_rule
            try:
                spec = depth_rule(o.method)
            except ValueError as e:
                raise RunError(str(e)) from None
            check_depth_options(o)
        else:
            spec = get_method(o.method)
            if getattr(o, "flops", None) is not None:
                raise RunError("--flops applies to --structure depth")
            if getattr(o, "speedup", None) is not None:  # MLP widths chosen by the measured latency model
                from .depth import check_width_speedup
                check_width_speedup(o, spec)
        if o.method_options is not None and not isinstance(o.method_options, dict):
            raise RunError("method_options must be a dict of method option → value")
        # an option the solver does not read, or a value outside its declared type/range/choices, fails here
        self.method_options = spec.normalize_options(dict(o.method_options or {}))
        pf = preflight.check_prune(
            model=o.model, model_dir=o.model_dir, spec=spec, sparsity=o.sparsity,
            sparsity_given=o.sparsity is not None, pattern=o.pattern,
            pattern_given=o.pattern is not None and str(o.pattern).strip().lower() != "unstructured",
            structure=o.structure or "mlp", structure_given=o.structure is not None, min_degree=o.min_degree,
            allocation=o.allocation, allocation_eps=o.allocation_eps, evaluate=o.evaluate, data_dir=o.data_dir,
            eval_options={"--eval": o.eval_datasets, "--eval-seqlen": o.eval_seqlen,
                          "--eval-windows": o.eval_windows},
            output=o.output, overwrite=o.overwrite, reference=o.reference, resume=o.resume,
            checkpoint_dir=o.checkpoint_dir, low_memory=o.low_memory, quant=o.quant)
        self.structure = o.structure or "mlp"
        self.hidden = str(self.structure).strip().lower() == "hidden"  # slice the residual stream (hidden.py)
        sparsity = pf["sparsity"]
        if o.quant is not None:  # quantization alone prunes nothing unless asked (N:M fixes its own sparsity)
            if spec.structured or self.hidden:
                raise RunError(f"--quant puts kept weights on a grid; {spec.name} "
                               f"{'slices the hidden dimension' if self.hidden else 'is a structured method'}")
            from ..formulations.patterns import NM
            if o.sparsity is None and not isinstance(parse_pattern(o.pattern, 0.5, min_degree=o.min_degree), NM):
                sparsity = 0.0
        self.sparsity = check_sparsity(sparsity)
        if self.hidden:
            if o.targets or o.ignore or o.save_format != "dense" or int(o.nproc or 1) != 1 or o.certify or o.refit:
                raise RunError("--structure hidden slices the whole residual stream on one process: it takes no "
                               "--targets/--ignore, --nproc, --certify or --refit, and saves the dense format")
        elif not spec.structured:
            kind = pattern_kind(parse_pattern(o.pattern, self.sparsity, min_degree=o.min_degree, quant=o.quant))
            if kind == "grid" and kind not in spec.patterns:
                from ..solvers.registry import method_specs
                raise RunError(f"method {spec.name!r} does not put weights on a grid (--quant); methods that do: "
                               f"{', '.join(m.name for m in method_specs() if 'grid' in m.patterns)}")
            if spec.patterns == frozenset({"grid"}) and kind != "grid":
                raise RunError(f"method {spec.name!r} puts weights on a quantization grid: give --quant "
                               f"(e.g. w4g128)")
            if kind not in spec.patterns:
                raise RunError(f"method {spec.name!r} does not handle the {kind} pattern "
                               f"(it takes: {', '.join(sorted(spec.patterns))})")
        if o.mode not in ("sequential", "dense-input"):
            raise RunError(f"--mode must be sequential or dense-input, got {o.mode!r}")
        self.nproc = int(o.nproc or 1)
        if self.nproc > 1 and self.nproc > cpu_cores() and not o.force_nproc:
            raise RunError(f"--nproc {self.nproc} is more than the {cpu_cores()} CPU cores this process may use (each "
                           f"rank prunes its blocks on its own core); lower --nproc, or pass --force-nproc to "
                           f"oversubscribe")
        self.world = world_for(self.nproc)  # block-parallel pruning (--nproc N, or ranks of a torchrun)
        if o.save_format == "pack-quantized" and (o.resume or self.world > 1):
            # each layer's grid scales live on its module in this process (not in checkpoints or other ranks)
            raise RunError("--save-format pack-quantized needs the whole prune in one process: not with --resume "
                           "or --nproc > 1")
        if self.world > 1 and o.mode != "dense-input":
            raise RunError("--nproc > 1 (or a torchrun world > 1) needs --mode dense-input (independent blocks); "
                           "the sequential mode stays single-process")
        self.alloc = _check_allocation(o.allocation)
        if o.allocation_eps is not None and not (0 <= float(o.allocation_eps) < 1):
            raise RunError(f"--allocation-eps must be in [0, 1), got {o.allocation_eps}")
        self.dev = _default_device(o.device)
        self.out_dir = pf["out_dir"]
        if o.reference:
            _check_reference_hook()
        cfg = o.model.config.to_dict() if isinstance(o.model, torch.nn.Module) else \
            ((pf.get("model") or {}).get("config") or None)
        export.check_save_options(o.save_format, o.dtype, structured=spec.structured, config=cfg,
                                  quant=o.quant, gguf_type=o.gguf_type)
        self.targets, self.ignore = parse_patterns(o.targets, "targets"), parse_patterns(o.ignore, "ignore")
        if o.equal_widths:
            self.structure = _equal_widths_structure(spec, self.structure, self.alloc, self.targets or self.ignore)
        in_memory = isinstance(o.model, torch.nn.Module)
        self.model_label = (getattr(o.model.config, "name_or_path", "") or type(o.model).__name__) if in_memory \
            else o.model
        self.calib_given = o.calibration if is_in_memory(o.calibration) else None
        if o.low_memory and (in_memory or self.calib_given is not None or self.targets or self.ignore
                             or o.save_format != "dense" or o.dtype not in (None, "auto")):
            raise RunError("--low-memory takes a model path, a named/file calibration, all layers, the dense "
                           "format and --dtype auto")
        s = resolve_settings(self.model_label, protocol=o.protocol,
                             calibration=None if self.calib_given is not None else o.calibration,
                             nsamples=o.nsamples, seqlen=o.seqlen, seed=o.seed, eval_datasets=o.eval_datasets,
                             eval_seqlen=o.eval_seqlen, eval_windows=o.eval_windows, data_dir=o.data_dir,
                             need_calibration=self.calib_given is None, need_eval=bool(o.evaluate))
        if self.calib_given is not None:
            s["calibration"] = s["overrides"]["calibration"] = calibration_kind(self.calib_given)
            s["name"] = s["base"] + "+custom"
        # a data-free method (no statistics, no refit, uniform allocation) is never calibrated
        self.data_free = spec.needs == "none" and not o.refit and self.alloc == "uniform" and not o.low_memory
        if not self.data_free:
            sizes = model_sizes(o.model, (pf["model"] or {}).get("config"))
            check_sizes(s, device=self.dev, **sizes)  # context length and activation memory, from metadata
        self.packing = self._packing(s)
        self.file_rows = None
        if self.data_free:
            self.packing = None  # never calibrated
        elif self.packing == "rows" and self.calib_given is None:  # a text file's lines, read before any weight
            from .calib_inputs import CalibrationInputError, file_rows
            self.file_rows = file_rows(s["calibration_path"])
            if not self.file_rows:
                raise CalibrationInputError(f"{s['calibration_path']}: no calibration text (every line is empty)")
        self.s = s
        self.spec = spec
        self.ck = None if self.depth else preflight.open_checkpoint(  # per-block checkpoints + resume (checkpoint.py); None when not kept
            self.out_dir, o.checkpoint_dir, o.resume, single=self.world == 1 and not o.low_memory, settings=dict(
                model=str(self.model_label), method=spec.name, sparsity=self.sparsity, pattern=o.pattern,
                min_degree=o.min_degree, quant=o.quant, allocation=self.alloc, allocation_eps=o.allocation_eps,
                structure=self.structure, mode=o.mode, error_correction=bool(o.error_correction),
                refit=bool(o.refit), method_options=self.method_options, damp=o.damp, batch_size=o.batch_size,
                calibration_packing=self.packing,
                device=self.dev, **{k: s.get(k) for k in ("calibration", "calibration_path", "nsamples", "seqlen",
                                                          "seed")}))
        if s["calibration"] == "self":
            try:
                from . import selfcalib  # noqa: F401
            except ModuleNotFoundError as e:
                raise RunError(f"--calibration self needs optprune.llm_adapters.selfcalib ({e})") from None
        if self.data_free:
            s.update(calibration="none", calibration_path=None, nsamples=0, seqlen=0)
            s.pop("calibration_note", None)
        # window lengths against the context the config / GGUF header gives: an explicit one too long is refused
        # now, not after the load (the same rule runs again on the loaded model)
        _clip_to_context(s, preflight.context_length((pf["model"] or {}).get("config")))
        for note in (s.get("calibration_note"), s.get("eval_note") if o.evaluate else None):
            if note:
                log.warning(note)
        if o.activation_dtype is not None and not o.low_memory:
            raise RunError("--activation-dtype applies to --low-memory only")
        if o.certify and o.low_memory:
            raise RunError("--certify is not available with --low-memory (run it in memory)")
        source = ShardedSource() if o.low_memory else InMemorySource()
        source.check(self)  # what this source cannot do, still before any weight is read
        self.source = source
        return self

    def _packing(self, s: dict) -> Optional[str]:
        """How texts become calibration samples: ``rows`` or ``windows`` for texts (lists, Datasets, text files),
        None for the other sources (named data sets are windowed by their protocol; self / token ids as they
        come). An explicit ``calibration_packing`` that cannot apply is an error."""
        from .calib_inputs import PACKINGS
        o = self.o
        given = o.calibration_packing
        if given is not None:
            given = check_value("--calibration-packing", given, type=str, choices=PACKINGS).strip().lower()
        texts = (self.calib_given is not None and not torch.is_tensor(self.calib_given)) or (
            self.calib_given is None and s.get("calibration") not in (None, "self")
            and not str(s.get("calibration_path") or "").startswith("hub:")
            and D.known_dataset(str(s["calibration"])) is None)
        if not texts:
            windowed = s.get("calibration") not in (None, "self", "token ids")  # a named data set: its windows
            if given is not None and not (windowed and given == "windows"):
                raise RunError(f"--calibration-packing {given} applies to texts (a list of strings, a "
                               f"datasets.Dataset or a text file), not to calibration {s.get('calibration')!r}")
            return "windows" if windowed else None
        a = self.alloc
        blocker = ("--low-memory" if o.low_memory else f"--allocation {a}"
                   if a != "uniform" and not (a.startswith("alpha") and "bounded" not in a) else None)
        if blocker and given == "rows":
            raise RunError(f"--calibration-packing rows is not available with {blocker} (it measures activations "
                           f"on fixed-length windows); use --calibration-packing windows")
        if blocker and given is None:
            log.warning(f"calibration texts packed as windows of {s['seqlen']} tokens (rows as samples are not "
                        f"available with {blocker})")
        return given or ("windows" if blocker else "rows")

    # ------------------------------------------------------------------------------------ 2.–5. the run
    def run(self):
        self.preflight()
        o, s = self.o, self.s
        if self.verbose:  # what is about to run, after every check, before any heavy work
            _print_header(self.model_label, self.spec, self.sparsity, "hidden" if self.hidden else o.pattern, s,
                          evaluate=o.evaluate, kl=o.kl, out_dir=self.out_dir, speedup=getattr(o, "speedup", None),
                          flops=getattr(o, "flops", None))
        try:
            with self.source.staging(self) as write_dir:  # sharded: shards are written while pruning
                self.write_dir = write_dir
                return self._run()
        except RunError:  # settings that cannot succeed (e.g. a missed sparsity target): resuming them would fail
            if self.ck is not None and not o.resume:  # the same way, and the checkpoint would block the next run
                self.ck.remove()
            raise
        except Exception as e:  # noqa: BLE001 - the disk (full, read-only) while writing: one line, file and remedy
            err = as_write_error(e, self.out_dir or "the output")
            if err is None:
                raise
            raise RunError(self._write_failure(err)) from None

    def _run(self):
        o, s, src = self.o, self.s, self.source
        timings = self.timings = {}
        t0 = time.perf_counter()
        src.load(self)  # the model (or its skeleton), tokenizer and metadata
        timings["load_s"] = time.perf_counter() - t0
        _clip_to_context(s, src.model)
        speed_dense = None
        if not self.depth and getattr(o, "speedup", None) is not None:  # widths from the speed budget
            import copy
            from .depth import width_sparsity
            rec = width_sparsity(src.model, src.arch, float(o.speedup))
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
                                "config": _jsonable(src.config_record(self, self._config_record())),
                                "versions": _versions(), "machine": _machine(self.dev), "model": src.meta}
        if speed_dense is not None:
            record["speed_budget"] = _jsonable(self.width_budget)
        if o.eval_dense and o.evaluate and src.whole:
            t0 = time.perf_counter()
            record["perplexity_dense"] = _perplexities(src.model, src.tok, s, o.data_dir, self.dev, o.progress,
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
        if o.evaluate:
            src.evaluate(self)
        if o.reference:
            t0 = time.perf_counter()
            record.update(_divergence(src.model, src.tok, o.reference, s, model_dir=o.model_dir,
                                      data_dir=o.data_dir, device=self.dev, progress=o.progress))
            timings["divergence_s"] = time.perf_counter() - t0
        record["protocol"] = _protocol_record(s)
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
        if o.return_model:
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
        o = self.o
        kw = dict(method=self.spec.name, sparsity=self.sparsity, pattern=o.pattern, min_degree=o.min_degree,
                  quant=o.quant,
                  layer_sparsity=None, structure=self.structure, mode=o.mode,
                  error_correction=bool(o.error_correction), refit=bool(o.refit),
                  method_options=self.method_options, device=self.dev, certify=bool(o.certify))
        if o.damp is not None:
            kw["damp"] = float(o.damp)
        if o.batch_size is not None:
            kw["batch_size"] = int(o.batch_size)
        if self.targets or self.ignore:
            kw.update(targets=self.targets, ignore=self.ignore)
        return PruneConfig(**kw)

    def _prune_depth(self, calib) -> dict:
        """``--structure depth``: select and remove whole blocks (llm_adapters/depth.py); the selection, the
        budget and the measured speed-up go into the record."""
        from .depth import prune_depth
        o, src = self.o, self.source
        src.model.to("cpu")
        rec = prune_depth(src.model, src.arch, calib, rule=self.spec.name, options=self.method_options,
                          speedup=o.speedup, flops=o.flops, sparsity=None if (o.speedup or o.flops) else self.sparsity,
                          progress=self.verbose)
        if "speed" in rec:
            self.record["speed"] = rec.pop("speed")
        self.record["depth"] = _jsonable(rec)
        return {"layers": [], "blocks": [], "time_s": rec["time_s"]}

    def _config_record(self) -> dict:
        o, spec = self.o, self.spec
        budget = self.depth and (o.speedup is not None or o.flops is not None)
        return {"model": str(self.model_label), "method": spec.name, "sparsity": None if budget else self.sparsity,
                "speedup": getattr(o, "speedup", None), "flops": getattr(o, "flops", None),
                "pattern": None if spec.structured or self.hidden else o.pattern, "min_degree": o.min_degree,
                "quant": o.quant,
                "allocation": self.alloc, "allocation_eps": o.allocation_eps,
                "structure": self.structure if spec.structured or self.hidden else None, "mode": o.mode,
                "error_correction": bool(o.error_correction), "refit": bool(o.refit),
                "method_options": self.method_options, "damp": self.config.damp, "nproc": self.nproc,
                "device": self.dev, "seed": self.s["seed"], "output": str(self.out_dir) if self.out_dir else None,
                "evaluate": bool(o.evaluate), "data_dir": str(D.resolve_data_dir(o.data_dir)),
                "reference": o.reference, "targets": self.targets, "ignore": self.ignore,
                "equal_widths": bool(o.equal_widths) if spec.structured else None,
                "save_format": o.save_format, "dtype": o.dtype, "gguf_type": o.gguf_type,
                "certify": bool(o.certify), "calibration_packing": self.packing}

    def _calibration(self):
        """Token ids ``(nsamples, seqlen)`` and their description (run.json's ``calibration``)."""
        o, s, src, ck = self.o, self.s, self.source, self.ck
        if self.calib_given is not None or (self.packing == "rows" and not self.data_free):
            # texts, a datasets.Dataset or token ids in memory, or a text file's lines as rows (calib_inputs.py)
            from .calib_inputs import calibration_from
            given = self.calib_given if self.calib_given is not None else self.file_rows
            calib, info = calibration_from(
                src.tok, given, nsamples=s["nsamples"], seqlen=s["seqlen"], seed=s["seed"],
                explicit_nsamples=o.nsamples, explicit_seqlen=o.seqlen, text_column=o.text_column,
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
                                     progress=o.progress, done_rows=ck and ck.calib_rows,
                                     on_batch=ck and ck.save_calib_rows)
            src.model.to("cpu")
            if ck is not None:
                ck.save_calib(calib, info)
            return calib, info
        return D.calibration_tokens(src.tok, s["calibration"], nsamples=s["nsamples"], seqlen=s["seqlen"],
                                    seed=s["seed"], data_dir=o.data_dir, return_info=True)

    def _allocation(self, calib) -> None:
        """Per-sub-layer sparsities (``--allocation``) into the pipeline's config."""
        o, src = self.o, self.source
        t0 = time.perf_counter()
        from .allocation_targets import layer_sparsities
        layer_s, info = layer_sparsities(src.model, src.arch, self.alloc, self.sparsity,
                                                        eps=o.allocation_eps, calib_ids=calib, data=None,
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
        if self.o.certify:
            from ..solvers.bounds import summarize_certificates
            record["summary"]["certificates"] = summarize_certificates(layers)


def _check_allocation(allocation) -> str:
    """The normalised ``--allocation`` spec; unknown names and options fail here."""
    alloc = (allocation or "uniform").strip().lower()
    if alloc == "uniform":
        return alloc
    try:
        from . import allocation as alloc_mod
    except ModuleNotFoundError as e:
        raise RunError(f"--allocation {allocation} needs optprune.llm_adapters.allocation, which is not "
                       f"available ({e})") from None
    if hasattr(alloc_mod, "parse_allocation"):  # NAME[:OPTION...], e.g. alpha:median, auto
        try:
            alloc_mod.parse_allocation(alloc)
        except ValueError as e:
            raise RunError(str(e)) from None
    else:
        known = getattr(alloc_mod, "ALLOCATIONS", _ALLOCATIONS_FALLBACK)
        if alloc not in known:
            raise RunError(f"unknown allocation {allocation!r}; choose from {', '.join(known)}")
    return alloc


def _call(fn, *a, **kw):
    return fn(*a, **kw)


# ============================================================================================ model sources
def _equal_widths_structure(spec, structure: str, allocation: str, chosen_layers: bool) -> str:
    """``--equal-widths``: the structured program keeps the same widths in every block, so that the saved config
    states them (stock tools load it). Every block removes the same number of groups (one sparsity for all:
    uniform allocation, every block pruned), and under grouped-query attention heads are removed as whole
    key/value groups (``heads`` → ``heads:kv``): the kept query heads then share out evenly over the kept
    key/value heads, with no replicated key/value head whose count would differ from block to block
    (``docs/methods.md §4``, equal widths). Returns the structure string to prune with."""
    if not spec.structured:
        raise RunError(f"--equal-widths constrains structured methods (spap, flap, group_magnitude, ...); "
                       f"{spec.name!r} keeps every matrix's shape")
    if allocation != "uniform":
        raise RunError(f"--equal-widths gives every block the same widths; --allocation {allocation} gives blocks "
                       f"different sparsities (drop one of them)")
    if chosen_layers:
        raise RunError("--equal-widths prunes every block alike; --targets/--ignore would leave some blocks at "
                       "other widths")
    return ",".join("heads:kv" if k.strip().lower() == "heads" else k.strip() for k in structure.split(","))


class InMemorySource:
    """The whole model in memory: loaded from its name/folder/file (built-in, HF directory, ``.gguf``, hub id),
    or the model object the caller passed (pruned in place)."""

    whole = True  # the model object is whole: dense evaluation, self-calibration, allocation, KL work on it

    def __init__(self, model=None, recipe=None):
        self.model, self.tok, self.meta, self.arch = model, None, None, None
        self.recipe = recipe  # how a spawned worker gets its own copy: (name_or_path, model_dir) or a callable

    # ---------------------------------------------------------------- the engine's calls
    def check(self, run: PruneRun) -> None:
        self.recipe = (run.o.model, run.o.model_dir)

    def staging(self, run: PruneRun):
        return contextlib.nullcontext(run.out_dir)  # the output is written as a whole at the end (output())

    def load(self, run: PruneRun) -> None:
        from . import export, preflight
        from .architectures import get_arch
        from .loading import load_model
        o = run.o
        if isinstance(o.model, torch.nn.Module):
            self.model, self.tok, self.meta = o.model, o.tokenizer, _memory_meta(o.model, run.model_label)
        else:
            self.model, tok, self.meta = preflight.load_checked(load_model, o.model, model_dir=o.model_dir,
                                                                require_arch=True)
            self.tok = o.tokenizer if o.tokenizer is not None else tok
        self.meta["source_dtype"] = str(export.source_dtype(self.model, None if isinstance(o.model, nn.Module)
                                                            else self.meta)).replace("torch.", "")
        self.arch = get_arch(self.model)
        if self.tok is None and (o.evaluate or run.out_dir is not None or not torch.is_tensor(run.calib_given)):
            raise RunError("an in-memory model needs its tokenizer (tokenizer=) for text calibration, evaluation "
                           "and saving")
        if run.out_dir is not None:  # what the save format needs of the loaded model, before any pruning
            export.check_loaded(self.model, self.tok, o.save_format, gguf_type=o.gguf_type)

    def config_record(self, run: PruneRun, rec: dict) -> dict:
        return rec

    def before_prune(self, run: PruneRun) -> None:
        self.counts_before = _count_prunable(self.model, self.arch)
        self.dense_copy = None
        if run.o.kl and run.o.evaluate:  # kept on the CPU for the data-free KL after pruning
            import copy
            self.dense_copy = copy.deepcopy(self.model).to("cpu")

    def prune(self, run: PruneRun, calib) -> Optional[dict]:
        o = run.o
        if run.hidden:  # the residual stream as a whole: statistics, its program, the rewrite (hidden.py)
            from .hidden import prune_hidden
            res = prune_hidden(self.model, calib, method=run.spec.name, sparsity=run.sparsity,
                               method_options=run.method_options,
                               batch_size=_batch_size(run.config.batch_size, *calib.shape),
                               device=run.dev, progress=o.progress)
            run.record["hidden"] = res["hidden"]
            self.model.to("cpu")
            return res
        return (run.ck.run_pipeline if run.ck is not None else _call)(  # checkpoints after every block; resumes
            prune_model_parallel, self.model, calib, run.config, progress=o.progress, nproc=run.nproc,
            source=self.recipe)

    def weight_counts(self, res: dict) -> tuple:
        tot, before = self.counts_before
        return tot, before, _count_prunable(self.model, self.arch)[1]

    def evaluate(self, run: PruneRun) -> None:
        o, s, record, timings = run.o, run.s, run.record, run.timings
        t0 = time.perf_counter()
        record["perplexity"] = _perplexities(self.model, self.tok, s, o.data_dir, run.dev, o.progress, None)
        timings["eval_s"] = time.perf_counter() - t0
        if self.dense_copy is not None:  # data-free KL / top-1 against the dense model, held-out sequences
            from .divergence import heldout_divergence
            t0 = time.perf_counter()
            self.model.to(run.dev)
            self.dense_copy.to(run.dev)
            record["divergence_self"] = heldout_divergence(self.model, self.dense_copy, self.tok, seed=s["seed"],
                                                           seqlen=HELDOUT_SEQLEN, progress=o.progress)
            record["divergence_self"]["reference"] = "the dense model before pruning"
            self.dense_copy = None
            timings["divergence_self_s"] = time.perf_counter() - t0

    def output(self, run: PruneRun):
        from .checkpoint import atomic_output
        return atomic_output(run.out_dir, overwrite=run.o.overwrite) if run.out_dir is not None \
            else contextlib.nullcontext()

    def save(self, run: PruneRun, stage: Path) -> dict:
        from . import export
        o = run.o
        if run.hidden:
            from .hidden import save_sliced
            return save_sliced(self.model, self.tok, stage,
                               dtype=export.resolve_dtype(o.dtype, getattr(torch, self.meta["source_dtype"])))
        return _save(self.model, self.tok, stage, self.arch, run.spec, save_format=o.save_format,
                     dtype=export.resolve_dtype(o.dtype, getattr(torch, self.meta["source_dtype"])),
                     layers=[r["name"] for r in run.record["layers"]], pattern=o.pattern,
                     format_options={"gguf_type": o.gguf_type})

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
        o, s = run.o, run.s
        if o.output is None:
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
        if o.reference:
            raise OffloadError("--reference is not available with --low-memory (it loads two whole models); run "
                               "optprune eval --model OUT --reference DENSE afterwards")
        if o.return_model:
            raise OffloadError("return_model is not available with low_memory (the model is never whole in "
                               "memory); load the output directory instead")
        self.act = parse_dtype(o.activation_dtype)

    def staging(self, run: PruneRun):
        """The shards are written while pruning: one process writes beside the target and renames into place
        at the end; block-parallel ranks write into the output directory itself."""
        from .checkpoint import atomic_output
        if run.world == 1:
            return atomic_output(run.out_dir, overwrite=run.o.overwrite)
        return contextlib.nullcontext(run.out_dir)

    def load(self, run: PruneRun) -> None:
        from transformers import AutoTokenizer

        from .offload import safetensors_dir as _resolve_source
        self.directory = _resolve_source(run.o.model, run.o.model_dir)
        self.om = om = OffloadedModel(self.directory)
        self.tok = AutoTokenizer.from_pretrained(str(self.directory))
        self.out_dir = Path(run.write_dir)
        c = om.config
        self.meta = {"name": str(run.o.model), "source": str(Path(self.directory).resolve()),
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
            from .offload import remove_previous_weights as _clean_output
            _clean_output(self.out_dir)

    def prune(self, run: PruneRun, calib) -> Optional[dict]:
        if run.world > 1:
            return run_blocks_parallel(self, calib, run.config, nproc=run.nproc, progress=run.o.progress)
        return prune_offloaded(self.om, calib, run.config, self.out_dir, activation_dtype=self.act,
                               progress=run.o.progress)

    def weight_counts(self, res: dict) -> tuple:
        low = res.get("low_memory") or {}
        return low.get("prunable_weights", 0), low.get("nonzero_before"), low.get("nonzero_after", 0)

    def evaluate(self, run: PruneRun) -> None:
        """Perplexity streamed block by block from the written shards."""
        from .offload import perplexity_offloaded
        s, o = run.s, run.o
        if not s["eval_datasets"]:
            return
        t0 = time.perf_counter()
        ppl = {}
        for name in s["eval_datasets"]:
            ids = D.eval_tokens(self.tok, name, seqlen=s["eval_seqlen"], data_dir=o.data_dir)
            r = perplexity_offloaded(self.out_dir, ids, s["eval_seqlen"], max_windows=s["eval_windows"],
                                     device=run.dev, dtype=self.om.dtype, progress=o.progress,
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
