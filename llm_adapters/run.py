"""The functions behind ``optprune prune`` and ``optprune eval`` (same option names in Python and on the CLI).

``prune(model=..., method=..., sparsity=..., ...)`` is :class:`~optprune.llm_adapters.engine.PruneRun` of the
options, whose names, defaults and docs come from the run description (:mod:`.description`):

1. validate every input that can be checked without the model (method, sparsity, pattern, mode, structure,
   allocation, protocol, data files, output directory) — bad input raises a one-line ``ValueError`` /
   ``FileNotFoundError`` and changes nothing (no output directory is created);
2. load the model (built-in name, HF directory, ``.gguf``, hub id — whole, or block by block from its shards
   with ``low_memory``), check the pattern against every prunable sub-layer (e.g. 4:8 on a width-172 layer),
   still before anything is written;
3. calibration tokens (protocol defaults, docs/protocols.md), optional per-layer allocation
   (:func:`optprune.llm_adapters.allocation_targets.layer_sparsities`), the sequential pipeline
   (:func:`optprune.llm_adapters.pipeline.prune_model`) on one process or block-parallel ranks;
4. perplexity per protocol, ``save_pretrained`` (+ tokenizer) to ``output`` — structured methods go through
   :func:`optprune.llm_adapters.surgery.save_shrunk` — and ``run.json`` (config, versions, machine, protocol,
   per-layer records, timings, peak memory, perplexities); a short summary table on the terminal.

``evaluate(model=..., ...)``: perplexity of any model per protocol / ``--eval`` options, optional KL divergence
and top-1 agreement against ``--reference`` (:func:`optprune.llm_adapters.divergence.kl_eval`), JSON output.

Protocol defaults (:mod:`.settings`): ``--protocol`` names one of :data:`~optprune.llm_adapters.data.PROTOCOLS`;
without it the protocol of a built-in model is used (``stories260k`` → ``smoke``, ``smollm2-135m`` → ``cpu``),
for a directory written by ``optprune prune`` the protocol recorded in its ``run.json``, and ``cpu`` otherwise
(window lengths clipped to the model's context). Any explicit option overrides the protocol; the record then
names the protocol as ``"<name>+custom"`` and lists the overrides.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from .evaluation import zero_shot
from ..solvers.serialization import to_json
from .pipeline import peak_rss_mb
from .report import library_versions, machine_info, perplexities, print_eval_summary, reference_divergence
from .description import RESOLVE_EXTRA, check_run_options, with_signature
from .settings import (RUN_FILE, SELF_CALIB_DEFAULT, RunError, check_sizes, clip_to_context,  # noqa: F401
                       default_device, log, model_sizes, protocol_record, resolve_settings, split_list)

__all__ = ["prune", "evaluate", "RunError", "resolve_settings"]


# ============================================================================================ prune
def prune(*args, **options):
    """Prune ``model`` with ``method`` and return the run record (a JSON-ready dict, also written to
    ``<output>/run.json``); with ``return_model=True`` returns ``(model, tokenizer, record)``.

    API-only extras: ``damp`` (Hessian damping, default the pipeline's), ``batch_size`` (calibration samples per
    forward), ``eval_dense`` (also evaluate the dense model first), ``progress``, ``verbose`` (print the summary;
    default: when called from the CLI).

    ``kl`` (CLI ``--no-kl`` turns it off): with ``evaluate``, keep a CPU copy of the dense model and report
    KL(dense ‖ pruned) and top-1 agreement on held-out self-generated sequences (``record["divergence_self"]``)
    — the quality measure that needs no data.

    Deployment (llm_adapters/export.py, targets.py, calib_inputs.py): ``model`` may be a loaded model (pruned in
    place; pass ``tokenizer``), ``calibration`` a list of strings, a ``datasets.Dataset`` (``text_column``) or
    token ids; ``targets``/``ignore`` choose the pruned sub-layers; ``save_format`` (dense | gguf |
    compressed-sparse-legacy), ``dtype`` (auto = the input model's) and ``gguf_type`` (f32, f16, bf16, q8_0; the
    GGUF file's type, default from the dtype) say how ``output`` is written.

    Long runs (:mod:`optprune.llm_adapters.checkpoint`): the output is written atomically (``overwrite`` replaces an
    existing optprune output); with an output (or ``checkpoint_dir``) every pruned block is checkpointed and
    ``resume=True`` continues an interrupted run. ``force_nproc`` allows ``nproc`` above the CPU cores.
    ``quant`` (``w4g128``, formulations/grid.py) puts the kept weights on a quantization grid.

    ``calibration_packing``: ``rows`` (each text or document one sample, truncated at ``seqlen``, short ones
    kept — the default for lists, ``datasets.Dataset`` and text files) or ``windows`` (texts joined into one
    stream, ``nsamples`` windows of ``seqlen`` tokens — the default for the named data sets); see
    :mod:`.calib_inputs`. ``sparsity`` defaults to 0.5 (1 − N/M for N:M patterns; 0 with ``quant``),
    ``structure`` to ``"mlp"``; giving either where the method or pattern would ignore it is an error.
    ``equal_widths`` (structured methods): the same widths in every block, so the saved config states them
    (uniform allocation; heads removed as whole key/value groups).

    Depth (``structure="depth"``, ``method`` = ``depth`` or ``shortgpt``, :mod:`optprune.llm_adapters.depth`):
    whole blocks are removed under one budget — ``speedup`` (measured prefill speed-up on this machine),
    ``flops`` (fraction of the dense FLOPs per token kept) or ``sparsity`` (fraction of blocks removed)."""
    from .engine import PruneRun  # the whole flow: preflight, load, calibrate, allocate, prune, record, save
    return PruneRun(*args, **options).run()


with_signature(prune, extra=RESOLVE_EXTRA)  # parameters and their docs: llm_adapters/description.py


# ============================================================================================ evaluate
def evaluate(model, protocol: Optional[str] = None, output=None, data_dir=None, model_dir=None, device=None,
             seed: int = 0, eval_datasets=None, eval_seqlen: Optional[int] = None, eval_windows: Optional[int] = None,
             reference: Optional[str] = None, batch_size: Optional[int] = None, progress: bool = True,
             verbose: Optional[bool] = None, tasks=None, task_limit: Optional[int] = None,
             include_path=None, _cli: bool = False) -> dict:
    """Perplexity (per protocol / options) of any model — built-in name, directory, ``.gguf``, hub id —
    and, with ``reference``, KL divergence and top-1 agreement against it. Returns the record; ``output`` =
    a JSON file (or a directory, which gets ``eval.json``).

    ``tasks`` (comma string or list) runs lm-evaluation-harness tasks (llm_adapters/lm_eval_tasks.py; the
    ``eval`` extra), ``include_path`` a folder of custom task YAMLs, ``task_limit`` caps examples per task;
    ``eval_datasets=[]`` with ``tasks`` skips the perplexity."""
    t_total = time.perf_counter()
    typed = check_run_options(dict(seed=seed, eval_seqlen=eval_seqlen, eval_windows=eval_windows,
                                   batch_size=batch_size, progress=progress, verbose=verbose, task_limit=task_limit))
    seed, eval_seqlen, eval_windows, batch_size, progress, verbose, task_limit = (
        typed.get(k, v) for k, v in (("seed", seed), ("eval_seqlen", eval_seqlen), ("eval_windows", eval_windows),
                                     ("batch_size", batch_size), ("progress", progress), ("verbose", verbose),
                                     ("task_limit", task_limit)))
    verbose = _cli if verbose is None else verbose
    dev, info, task_list, s, out_file = _evaluate_preflight(
        model, protocol=protocol, output=output, data_dir=data_dir, model_dir=model_dir, device=device, seed=seed,
        eval_datasets=eval_datasets, eval_seqlen=eval_seqlen, eval_windows=eval_windows, reference=reference,
        tasks=tasks, include_path=include_path)
    from . import preflight
    from .loading import load_model
    t0 = time.perf_counter()
    mdl, tok, meta = preflight.load_checked(load_model, model, model_dir=model_dir, device=dev)
    timings = {"load_s": time.perf_counter() - t0}
    clip_to_context(s, mdl, need_calibration=False)
    record = {"command": "eval", "model": meta, "versions": library_versions(), "machine": machine_info(dev)}
    t0 = time.perf_counter()
    record["perplexity"] = perplexities(mdl, tok, s, data_dir, dev, progress, batch_size)
    timings["eval_s"] = time.perf_counter() - t0
    if reference:
        t0 = time.perf_counter()
        record.update(reference_divergence(mdl, tok, reference, s, model_dir=model_dir, data_dir=data_dir,
                                  device=dev, progress=progress, self_gen=True))
        timings["divergence_s"] = time.perf_counter() - t0
    if task_list:
        t0 = time.perf_counter()
        record["zero_shot"] = zero_shot(mdl, tok, task_list, limit=task_limit, device=dev, include_path=include_path)
        timings["zero_shot_s"] = time.perf_counter() - t0
    s.pop("calibration_path", None)
    prot = protocol_record(s)
    for k in ("calibration", "nsamples", "seqlen"):
        prot.pop(k, None)
    record["protocol"] = prot
    timings["total_s"] = time.perf_counter() - t_total
    record["timings"] = timings
    record["peak_rss_mb"] = peak_rss_mb()
    record = to_json(record)
    if out_file is not None:  # whole or not at all
        tmp = out_file.with_name(f".{out_file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_file)
    if verbose:
        print_eval_summary(record, out_file)
    return record


def _evaluate_preflight(model, *, protocol, output, data_dir, model_dir, device, seed, eval_datasets, eval_seqlen,
                        eval_windows, reference, tasks, include_path) -> tuple:
    """Everything ``evaluate`` checks before the model is loaded: ``(device, model info, tasks, settings, output
    file)``."""
    dev = default_device(device)
    from . import preflight  # files and folders, before any weight is read
    preflight.check_data_dir(data_dir)
    info = preflight.check_model_source(model, model_dir)
    if reference:
        preflight.check_model_source(reference, model_dir, what="--reference")
    task_list = split_list(tasks) if tasks else None
    if task_list:  # lm-eval installed, every task known: before the model is loaded
        from .lm_eval_tasks import check_tasks
        check_tasks(task_list, include_path)
    no_ppl = bool(task_list) and eval_datasets is not None and not (
        [d for d in eval_datasets.split(",") if d.strip()] if isinstance(eval_datasets, str) else list(eval_datasets))
    s = resolve_settings(model, protocol=protocol, eval_datasets=None if no_ppl else eval_datasets,
                         eval_seqlen=eval_seqlen, eval_windows=eval_windows, data_dir=data_dir, seed=seed,
                         need_calibration=False, need_eval=not no_ppl)
    if no_ppl:
        s["eval_datasets"] = []
    clip_to_context(s, preflight.context_length((info or {}).get("config")), need_calibration=False)
    if not s["eval_datasets"] and not reference and not task_list:
        raise RunError(f"nothing to evaluate: {s.get('eval_note', 'no evaluation text')}; point --data-dir at the "
                       f"data, pass --eval FILE, or --reference DENSE for the data-free KL/top-1")
    if s.get("eval_note"):
        log.warning(s["eval_note"])
    check_sizes(s, **model_sizes(model, (info or {}).get("config")), calibration=False)
    out_file = None
    if output is not None:
        o = Path(str(output)).expanduser()
        out_file = o / "eval.json" if o.is_dir() else o
        if not out_file.parent.exists():
            raise RunError(f"--output: the folder {out_file.parent} does not exist")
        preflight.check_writable(out_file.parent, f"--output {out_file}")
    return dev, info, task_list, s, out_file
