"""The stages of a prune, in order: :func:`load`, :func:`calibrate`, :func:`allocate`, :func:`prune_blocks`,
:func:`evaluate`, :func:`save`. Each takes the run (:class:`~.flow.PruneRun`: its resolved description ``run.d``
and the state the stages before it left — the model source, the pipeline config, the checkpoint) and returns
its part of the record (run.json); the run merges the parts in order.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import data as D
from ..checkpoint import as_write_error
from ..pipeline import peak_rss_mb
from ...solvers.serialization import to_json
from ..report import RUN_FILE, library_versions, machine_info, perplexities, reference_divergence
from ..settings import clip_to_context, protocol_record

__all__ = ["load", "calibrate", "allocate", "prune_blocks", "evaluate", "save", "prune_config", "SELECTION_PLOT"]

#: the plot of the ``--allocation auto`` candidates, written next to run.json
SELECTION_PLOT = "allocation_selection.png"


# ============================================================================================ load
def load(run) -> dict:
    """The model (or its skeleton), tokenizer and metadata through the source; the protocol clipped to the
    model's context; a speed budget turned into widths; the pipeline config checked against every sub-layer.
    Returns the record's head: ``config`` (the recorded settings), ``versions``, ``machine``, ``model``."""
    d, src = run.d, run.source
    t0 = time.perf_counter()
    src.load(run)
    run.timings["load_s"] = time.perf_counter() - t0
    clip_to_context(run.protocol, src.model)
    part = {}
    run.speed_dense = None
    if not run.d.depth and d.method.speedup is not None:  # widths from the speed budget (uniform candidate)
        import copy
        budget = _speed_widths(run)
        run.sparsity = budget["sparsity"]
        run.speed_dense = copy.deepcopy(src.model).to("cpu")
        part["speed_budget"] = to_json(budget)
    run.config = prune_config(run)
    if run.d.hidden:
        from ..hidden import hidden_plan
        hidden_plan(src.model, src.arch)  # a model whose stream cannot be sliced fails before calibration
    elif not run.d.depth:
        from ..pipeline import validate_config
        validate_config(src.model, run.config)  # the pattern against every sub-layer shape (e.g. 4:8 on width 172)
    settings = d.record(sparsity=run.sparsity, damp=run.config.damp)
    return {"config": to_json(src.config_record(run, settings)), "versions": library_versions(),
            "machine": machine_info(run.d.device), "model": src.meta, **part}


def _speed_widths(run, calib=None) -> dict:
    """Per-block widths under ``--speedup`` (llm_adapters/widths.py): the uniform ones at load, the allocation's
    candidate beside them once the calibration is there."""
    from ..widths import speed_widths
    d, src = run.d, run.source
    kinds = [k.strip().lower() for k in str(run.d.structure).split(",") if k.strip()]
    return speed_widths(src.model, src.arch, kinds, float(d.method.speedup),
                        allocation=run.d.allocation if calib is not None else "uniform",
                        eps=d.method.allocation_eps, calib=calib)


def prune_config(run):
    """The pipeline's :class:`~..pipeline.PruneConfig` from the description (and the sparsity a budget chose)."""
    from ..pipeline import PruneConfig
    d = run.d
    kw = dict(method=run.d.spec.name, sparsity=run.sparsity, pattern=d.method.pattern, min_degree=d.method.min_degree,
              quant=d.method.quant, layer_sparsity=None, structure=run.d.structure, mode=d.method.mode,
              error_correction=bool(d.method.error_correction), refit=bool(d.method.refit),
              method_options=run.d.method_options, device=run.d.device, certify=bool(d.method.certify))
    if d.method.damp is not None:
        kw["damp"] = float(d.method.damp)
    if d.execution.batch_size is not None:
        kw["batch_size"] = int(d.execution.batch_size)
    if d.execution.activation_dtype is not None:
        from ..offload import parse_dtype
        kw["activation_dtype"] = parse_dtype(d.execution.activation_dtype)
    if run.d.targets or run.d.ignore:
        kw.update(targets=run.d.targets, ignore=run.d.ignore)
    return PruneConfig(**kw)


# ============================================================================================ calibrate
def calibrate(run) -> dict:
    """The dense model's perplexity first (``eval_dense``), then the calibration token ids into ``run.calib``.
    Returns ``perplexity_dense`` (when asked) and ``calibration`` (source, size, tokens, hash)."""
    d, src, part = run.d, run.source, {}
    if d.evaluation.eval_dense and d.evaluation.evaluate and src.whole:
        t0 = time.perf_counter()
        part["perplexity_dense"] = perplexities(src.model, src.tok, run.protocol, d.calibration.data_dir, run.d.device,
                                                 d.execution.progress, None)
        run.timings["eval_dense_s"] = time.perf_counter() - t0
        src.model.to("cpu")
    t0 = time.perf_counter()
    calib, info = _calibration_tokens(run)
    if "tokens" not in info:  # how many calibration tokens the statistics saw
        info["tokens"] = 0 if run.d.data_free else int(calib.numel())
    run.timings["calibration_s"] = time.perf_counter() - t0
    run.calib = calib
    part["calibration"] = to_json(info)
    return part


def _calibration_tokens(run):
    """Token ids ``(nsamples, seqlen)`` and their description: texts or ids given in memory, a text file's rows,
    a data-free stand-in, sequences sampled from the model (saved with the checkpoint), or a named data set."""
    d, s, src, ck = run.d, run.protocol, run.source, run.checkpoint
    if run.d.calib_given is not None or (run.d.packing == "rows" and not run.d.data_free):
        return _given_calibration(run)
    if run.d.data_free:  # the pipeline walks the blocks on a 2-token stand-in; nothing is measured from it
        return torch.zeros((1, 2), dtype=torch.long), {"source": "none", "note": "data-free method"}
    if s["calibration"] == "self" and ck is not None and ck.calib is not None:  # resumed: saved sequences
        return ck.calib, ck.calib_info
    if s["calibration"] == "self":  # sequences sampled from the dense model itself
        from ..selfcalib import self_calibration
        info: dict = {}
        src.model.to(run.d.device)
        calib = self_calibration(src.model, src.tok, s["nsamples"], s["seqlen"], seed=s["seed"], info=info,
                                 progress=d.execution.progress, done_rows=ck and ck.calib_rows,
                                 on_batch=ck and ck.save_calib_rows)
        src.model.to("cpu")
        if ck is not None:
            ck.save_calib(calib, info)
        return calib, info
    return D.calibration_tokens(src.tok, s["calibration"], nsamples=s["nsamples"], seqlen=s["seqlen"],
                                seed=s["seed"], data_dir=d.calibration.data_dir, return_info=True)


def _given_calibration(run):
    """Texts, a datasets.Dataset or token ids in memory, or a text file's lines as rows (calib_inputs.py)."""
    from ..calib_inputs import calibration_from
    d, s, src = run.d, run.protocol, run.source
    given = run.d.calib_given if run.d.calib_given is not None else run.d.file_rows
    calib, info = calibration_from(
        src.tok, given, nsamples=s["nsamples"], seqlen=s["seqlen"], seed=s["seed"],
        explicit_nsamples=d.calibration.nsamples, explicit_seqlen=d.calibration.seqlen,
        text_column=d.calibration.text_column,
        vocab_size=getattr(src.model.get_input_embeddings(), "num_embeddings", None),
        packing=run.d.packing or "windows", kind=None if run.d.calib_given is not None else "text file")
    if run.d.calib_given is None:
        info["path"] = str(Path(s["calibration_path"]).resolve())
    lengths = info.pop("lengths", None)
    if lengths is not None:  # rows as samples: the pipeline cuts each batch to its rows' length
        run.config.calib_lengths = tuple(lengths)
    s["nsamples"], s["seqlen"] = int(calib.shape[0]), int(calib.shape[1])
    return calib, info


# ============================================================================================ allocate
def allocate(run) -> dict:
    """Per-sub-layer sparsities (``--allocation``) — or, with ``--quant``, per-sub-layer grids (bit widths) —
    into the pipeline's config; returns ``allocation`` (none for a uniform one)."""
    if run.d.allocation == "uniform":
        return {}
    src = run.source
    if not run.d.depth and run.d.method.speedup is not None:  # widths under the speed budget: the rule's candidate
        t0 = time.perf_counter()
        budget = _speed_widths(run, run.calib)
        run.config.layer_sparsity = dict(budget["layer_sparsity"])
        run.timings["allocation_s"] = time.perf_counter() - t0
        return {"speed_budget": to_json(budget)}
    from ..allocation_targets import layer_sparsities
    t0 = time.perf_counter()
    if run.d.method.quant is not None:  # mixed precision: per-layer bit widths (allocation_bits.py)
        from ..allocation_bits import layer_grids
        grids, info = layer_grids(src.model, src.arch, run.d.allocation, run.d.method.quant,
                                  eps=run.d.method.allocation_eps, calib_ids=run.calib, progress=run.verbose)
        run.config.layer_quant = grids
        run.timings["allocation_s"] = time.perf_counter() - t0
        return {"allocation": info}
    from ..allocation_targets import layer_sparsities
    layer_s, info = layer_sparsities(src.model, src.arch, run.d.allocation, run.sparsity,
                                     eps=run.d.method.allocation_eps,
                                     calib_ids=run.calib, data=None, prune_config=run.config, progress=run.verbose)
    run.config.layer_sparsity = dict(layer_s)
    run.timings["allocation_s"] = time.perf_counter() - t0
    if run.d.out_dir is not None and info.get("candidates"):  # auto: candidates' scores, saved next to run.json
        run.selection = info
        info["plot"] = str(run.d.out_dir / SELECTION_PLOT)
    return {"allocation": to_json(info)}


# ============================================================================================ prune
def prune_blocks(run):
    """The blocks pruned through the source (or whole blocks removed, ``--structure depth``) into
    ``run.result``; returns the per-layer and per-block records, the pipeline's record and the summary — None
    on the non-zero ranks of a block-parallel run (rank 0 evaluates, saves and records)."""
    src = run.source
    src.before_prune(run)
    part = {}
    res = _prune_depth(run, part) if run.d.depth else src.prune(run, run.calib)
    if res is None:
        return None
    run.result = res
    run.timings["prune_s"] = res.get("time_s")
    part.update(_summary(run, res))
    if run.speed_dense is not None:  # the pruned model's measured speed-up (dense and pruned runs alternated)
        from ..latency import measure_speedup
        src.model.to("cpu")
        part["speed"] = measure_speedup(run.speed_dense, src.model)
        run.speed_dense = None
    return part


def _prune_depth(run, part: dict) -> dict:
    """``--structure depth``: select and remove whole blocks (llm_adapters/depth.py); the selection, the budget
    and the measured speed-up go into ``part``."""
    from ..depth import prune_depth
    d, src = run.d, run.source
    src.model.to("cpu")
    budget = d.method.speedup or d.method.flops
    rec = prune_depth(src.model, src.arch, run.calib, rule=run.d.spec.name, options=run.d.method_options,
                      speedup=d.method.speedup, flops=d.method.flops, sparsity=None if budget else run.sparsity,
                      progress=run.verbose)
    if "speed" in rec:
        part["speed"] = rec.pop("speed")
    part["depth"] = to_json(rec)
    return {"layers": [], "blocks": [], "time_s": rec["time_s"]}


def _summary(run, res: dict) -> dict:
    """Per-layer and per-block records and the summary of the pruned weights."""
    layers = res.get("layers", [])
    if run.d.data_free:
        for r in layers:
            r["rel_error"] = None
    tot_w, nz_before, nz_after = run.source.weight_counts(res)
    rel = [r["rel_error"] for r in layers if r.get("rel_error") is not None]
    targets = [(r["sparsity_target"], math.prod(r["shape"])) for r in layers if "shape" in r]
    summary = {
        "prunable_weights": tot_w, "nonzero_before": nz_before, "nonzero_after": nz_after,
        "sparsity": 1.0 - (nz_after or 0) / tot_w if tot_w else 0.0,
        "sparsity_target": (sum(t * n for t, n in targets) / sum(n for _, n in targets)) if targets else None,
        "layers": len(layers),
        "mean_rel_error": (sum(rel) / len(rel)) if rel else None,
        "max_rel_error": max(rel) if rel else None,
    }
    if run.d.method.certify:
        from ...solvers.verification.certificates import summarize_certificates
        summary["certificates"] = summarize_certificates(layers)
    return {"layers": to_json(layers), "blocks": to_json(res.get("blocks", [])),
            "pipeline": to_json({k: v for k, v in res.items() if k not in ("layers", "blocks")}),
            "summary": summary}


# ============================================================================================ evaluate
def evaluate(run) -> dict:
    """Perplexity (and the data-free KL against the dense model) through the source; KL and top-1 against
    ``--reference``; the effective protocol. Returns those parts."""
    d, src, part = run.d, run.source, {}
    if d.evaluation.evaluate:
        part.update(src.evaluate(run))
    if d.evaluation.reference:
        t0 = time.perf_counter()
        part.update(reference_divergence(src.model, src.tok, d.evaluation.reference, run.protocol, model_dir=d.model.model_dir,
                                data_dir=d.calibration.data_dir, device=run.d.device, progress=d.execution.progress))
        run.timings["divergence_s"] = time.perf_counter() - t0
    part["protocol"] = protocol_record(run.protocol)
    return part


# ============================================================================================ save
def save(run, record: dict) -> dict:
    """The output (weights, tokenizer, the allocation plot, run.json) written through the source — atomically:
    beside the target, renamed into place at the end. Returns the finished record."""
    src, timings = run.source, run.timings
    with src.output(run) as stage:
        if run.d.out_dir is not None:
            t0 = time.perf_counter()
            record["saved"] = _save_weights(run, stage)
            if run.selection is not None:
                from ..allocation_select import plot_selection
                plot_selection(run.selection, stage / SELECTION_PLOT)
            timings["save_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - run.t_total
        record["timings"] = timings
        record["peak_rss_mb"] = peak_rss_mb()
        if run.result.get("peak_cuda_mb") is not None:
            record["peak_cuda_mb"] = run.result["peak_cuda_mb"]
        record["status"] = "done"
        record = to_json(record)
        if run.d.out_dir is not None:
            (stage / RUN_FILE).write_text(json.dumps(record, indent=1))
    return record


def _save_weights(run, stage: Path) -> dict:
    try:
        return {**run.source.save(run, stage), "path": str(run.d.out_dir.resolve())}
    except Exception as e:  # noqa: BLE001 - a full disk, in any library's words (SafetensorError...)
        err = as_write_error(e, run.d.out_dir, writing=True)
        if err is None:
            raise
        raise err from None
