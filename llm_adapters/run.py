"""The functions behind ``optprune prune`` and ``optprune eval`` (same option names in Python and on the CLI).

``prune(model=..., method=..., sparsity=..., ...)``:

1. validate every input that can be checked without the model (method, sparsity, pattern, mode, structure,
   allocation, protocol, data files, output directory) — bad input raises a one-line ``ValueError`` /
   ``FileNotFoundError`` and changes nothing (no output directory is created);
2. load the model (built-in name, HF directory, ``.gguf``, hub id), check its architecture and the pattern
   against every prunable sub-layer (e.g. 4:8 on a width-172 layer), still before anything is written;
3. calibration tokens (protocol defaults, docs/protocols.md), optional per-layer allocation
   (:func:`optprune.llm_adapters.allocation.layer_sparsities`), the sequential pipeline
   (:func:`optprune.llm_adapters.pipeline.prune_model`);
4. perplexity per protocol, ``save_pretrained`` (+ tokenizer) to ``output`` — structured methods go through
   :func:`optprune.llm_adapters.surgery.save_shrunk` — and ``run.json`` (config, versions, machine, protocol,
   per-layer records, timings, peak memory, perplexities); a short summary table on the terminal.

``evaluate(model=..., ...)``: perplexity of any model per protocol / ``--eval`` options, optional KL divergence
and top-1 agreement against ``--reference`` (:func:`optprune.llm_adapters.divergence.kl_eval`), JSON output.

Protocol defaults: ``--protocol`` names one of :data:`~optprune.llm_adapters.data.PROTOCOLS`; without it the
protocol of a built-in model is used (``stories260k`` → ``smoke``, ``smollm2-135m`` → ``cpu``), for a directory
written by ``optprune prune`` the protocol recorded in its ``run.json``, and ``cpu`` otherwise (window lengths
clipped to the model's context). Any explicit option overrides the protocol; the record then names the
protocol as ``"<name>+custom"`` and lists the overrides.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..formulations.patterns import check_sparsity, parse_pattern
from . import data as D
from .evaluation import model_context, perplexity, zero_shot

__all__ = ["prune", "evaluate", "RunError", "resolve_settings"]

RUN_FILE = "run.json"
log = logging.getLogger("optprune")

#: self-calibration size when the protocol was not chosen explicitly and no --nsamples/--seqlen were given:
#: sampling and the block passes cost ~2·params FLOPs per token each, so the data-free default stays small
#: (FISTA 50% on SmolLM2-135M: 128×512 took ~44 min on 2 cores; 64×256 takes 552 CPU-seconds end to end on one
#: thread, KL 0.49 / top-1 0.63 against the dense model; on stories260K 64×256 vs 128×512: KL 1.004 vs 0.997)
SELF_CALIB_DEFAULT = (64, 256)
_ALLOCATIONS_FALLBACK = ("uniform", "alpha", "owl")


class RunError(ValueError):
    """Bad input to prune/evaluate (one line; nothing changed)."""


# ============================================================================================ settings
def _builtin_key(model) -> Optional[str]:
    from .loading import _ALIASES
    return _ALIASES.get(str(model).strip().lower()) if isinstance(model, (str, os.PathLike)) else None


def _recorded_protocol(model) -> Optional[dict]:
    """The effective protocol recorded by a previous ``optprune prune`` in ``<model dir>/run.json``."""
    try:
        p = Path(str(model)).expanduser()
        if p.is_dir() and (p / RUN_FILE).is_file():
            rec = json.loads((p / RUN_FILE).read_text())
            prot = rec.get("protocol")
            return prot if isinstance(prot, dict) else None
    except (OSError, ValueError):
        return None
    return None


def _split_list(v) -> Optional[list]:
    if v is None:
        return None
    if isinstance(v, str):
        items = [s.strip() for s in v.split(",") if s.strip()]
    else:
        items = [str(s).strip() for s in v if str(s).strip()]
    if not items:
        raise RunError("--eval needs at least one evaluation text (wikitext2, ptb, c4, tinystories, or a file)")
    return items


def resolve_settings(model, *, protocol=None, calibration=None, nsamples=None, seqlen=None, seed=0,
                     eval_datasets=None, eval_seqlen=None, eval_windows=None, data_dir=None,
                     need_calibration=True, need_eval=True) -> dict:
    """Effective calibration/evaluation settings from the protocol and explicit options (no model needed).

    Checks that the data files exist (a missing one raises naming its full path)."""
    recorded = None
    if protocol is not None:
        base = D.get_protocol(protocol)
        origin = "explicit"
    else:
        key = _builtin_key(model)
        base = next((p for p in D.PROTOCOLS.values() if p.model == key), None) if key else None
        origin = "model default"
        if base is None:
            recorded = _recorded_protocol(model)
            if recorded and recorded.get("base") in D.PROTOCOLS:
                base = D.PROTOCOLS[recorded["base"]]
                origin = "recorded in run.json"
            else:
                recorded = None
                base = D.PROTOCOLS["cpu"]
                origin = "default (cpu)"
    s = {"base": base.name, "origin": origin, "calibration": base.calibration, "nsamples": base.nsamples,
         "seqlen": base.seqlen, "seed": base.seed, "eval_datasets": list(base.eval_datasets),
         "eval_seqlen": base.eval_seqlen, "eval_windows": base.eval_windows}
    if recorded:  # the exact settings a previous run evaluated with
        for k in ("eval_datasets", "eval_seqlen", "eval_windows"):
            if k in recorded and not (k == "eval_datasets" and recorded.get("eval_missing")):
                s[k] = recorded[k]  # (texts a data-less run skipped are evaluated when they are here now)
    overrides = {}

    def over(k, v):
        if v is not None and v != s[k]:
            overrides[k] = v
            s[k] = v

    if calibration is not None:
        over("calibration", str(calibration))
    if nsamples is not None:
        if int(nsamples) < 1:
            raise RunError(f"--nsamples must be ≥ 1, got {nsamples}")
        over("nsamples", int(nsamples))
    if seqlen is not None:
        if int(seqlen) < 2:
            raise RunError(f"--seqlen must be ≥ 2, got {seqlen}")
        over("seqlen", int(seqlen))
    if seed is not None:
        over("seed", int(seed))
    if eval_datasets is not None:
        over("eval_datasets", _split_list(eval_datasets))
    if eval_seqlen is not None:
        if int(eval_seqlen) < 2:
            raise RunError(f"--eval-seqlen must be ≥ 2, got {eval_seqlen}")
        over("eval_seqlen", int(eval_seqlen))
    if eval_windows is not None:
        if int(eval_windows) < 0:
            raise RunError(f"--eval-windows must be ≥ 0 (0 = all windows), got {eval_windows}")
        w = None if int(eval_windows) == 0 else int(eval_windows)
        if w != s["eval_windows"]:
            overrides["eval_windows"] = w
            s["eval_windows"] = w
    s["overrides"] = overrides

    # calibration source: the protocol's if present; a defaulted protocol falls back to c4, then fails clearly
    if need_calibration:
        src = s["calibration"]
        if src == "self":
            s["calibration_path"] = None
            _self_size(s, overrides)
        elif src.startswith("hub:"):
            s["calibration_path"] = src
        else:
            try:
                s["calibration_path"] = D.check_dataset(src, "validation", data_dir)
            except FileNotFoundError as e:
                if calibration is None and protocol is None and src != "c4":
                    try:
                        s["calibration_path"] = D.check_dataset("c4", "validation", data_dir)
                        s["calibration"] = "c4"
                        overrides["calibration"] = "c4"
                    except FileNotFoundError:
                        _self_fallback(s, overrides, e, data_dir)
                elif calibration is None:
                    _self_fallback(s, overrides, e, data_dir)
                else:
                    raise _no_calibration(e, data_dir) from None
    if need_eval:
        _missing_eval_fallback(s, data_dir, explicit=eval_datasets is not None)
    s["name"] = s["base"] + ("+custom" if overrides else "")
    return s


def _self_fallback(s: dict, overrides: dict, e, data_dir) -> None:
    """no calibration text and none asked for → sequences sampled from the model (announced), at
    :data:`SELF_CALIB_DEFAULT` unless ``--nsamples``/``--seqlen`` were given."""
    s["calibration"] = overrides["calibration"] = "self"
    _self_size(s, overrides)
    s["calibration_path"] = None
    s["calibration_missing"] = str(e).split(";")[0]
    s["calibration_note"] = (f"no calibration text in {D.resolve_data_dir(data_dir)}: calibrating on "
                             f"{s['nsamples']}×{s['seqlen']} sequences sampled from the model itself "
                             f"(--calibration self; --data-dir DIR for C4/WikiText)")


def _self_size(s: dict, overrides: dict) -> None:
    """self-calibration without an explicit protocol: :data:`SELF_CALIB_DEFAULT` unless --nsamples/--seqlen."""
    if s["origin"] == "explicit":
        return
    for k, v in zip(("nsamples", "seqlen"), SELF_CALIB_DEFAULT):
        if k not in overrides and s[k] != v:
            s[k] = overrides[k] = v


def _missing_eval_fallback(s: dict, data_dir, explicit: bool) -> None:
    """evaluation texts of a defaulted protocol that are not there are skipped (announced); the
    data-free KL on held-out self-generated sequences is still reported. Explicitly asked-for texts must exist."""
    paths, missing = {}, []
    for d in s["eval_datasets"]:
        try:
            paths[d] = D.check_dataset(d, "test", data_dir)
        except FileNotFoundError as e:
            if explicit:
                raise
            missing.append(str(e).split(";")[0])
    s["eval_paths"] = paths
    if missing:
        s["eval_missing_names"] = [d for d in s["eval_datasets"] if d not in paths]
        s["eval_datasets"] = [d for d in s["eval_datasets"] if d in paths]
        s["overrides"]["eval_datasets"] = s["eval_datasets"]
        s["eval_missing"] = missing
        s["eval_note"] = (f"no {', '.join(d for d in s['eval_missing_names'])} text in "
                          f"{D.resolve_data_dir(data_dir)}: perplexity skipped; quality is reported as KL/top-1 "
                          f"against the dense model on held-out self-generated sequences")


def _no_calibration(e, data_dir) -> FileNotFoundError:
    return D.DataNotFoundError(
        f"no calibration data: {e}. Point --data-dir / OPTPRUNE_DATA_DIR at the data folder, pass "
        f"--calibration FILE (any text file), or --calibration self (sequences sampled from the model)")


def _clip_to_context(s: dict, model, *, need_calibration=True) -> None:
    """Protocol window lengths longer than the model's context are clipped (explicit ones are an error)."""
    ctx = model_context(model)
    if ctx is None:
        return
    for k, flag in (("seqlen", need_calibration), ("eval_seqlen", True)):
        if not flag:
            continue
        if s[k] > ctx:
            if k in s["overrides"]:
                opt = "--seqlen" if k == "seqlen" else "--eval-seqlen"
                raise RunError(f"{opt} {s[k]} exceeds the model's context of {ctx} tokens")
            s.setdefault("clipped", {})[k] = [s[k], ctx]
            s[k] = ctx
            s["name"] = s["base"] + "+custom"


def _protocol_record(s: dict) -> dict:
    keep = ("name", "base", "origin", "calibration", "nsamples", "seqlen", "seed", "eval_datasets", "eval_seqlen",
            "eval_windows", "overrides", "clipped", "calibration_path", "eval_paths", "calibration_note",
            "calibration_missing", "eval_note", "eval_missing")
    return {k: s[k] for k in keep if k in s}


# ============================================================================================ helpers
def _default_device(device) -> str:
    if device:
        dev = str(device)
        try:
            td = torch.device(dev)
        except (RuntimeError, TypeError):
            raise RunError(f"unknown device {device!r}; use cpu or cuda") from None
        if td.type == "cuda" and not torch.cuda.is_available():
            raise RunError("device 'cuda' asked for but CUDA is not available here")
        return dev
    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _versions() -> dict:
    import numpy
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        from optprune import __version__
        out["optprune"] = __version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import subprocess
        repo = Path(__file__).resolve().parents[1]
        if (repo / ".git").exists():
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            if commit:
                out["git_commit"] = commit + ("+dirty" if dirty else "")
    except Exception:  # pragma: no cover - git missing
        pass
    return out


def _machine(device: str) -> dict:
    m = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    m["memory_gb"] = round(int(line.split()[1]) / 2 ** 20, 1)
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        m["cuda"] = torch.cuda.get_device_name(0)
    return m


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _prunable(model, arch):
    from .architectures import get_module, linear_weight
    blocks = get_module(model, arch.blocks)
    for bi, block in enumerate(blocks):
        for sub in arch.sublayer_names():
            yield f"{arch.blocks}.{bi}.{sub}", linear_weight(get_module(block, sub), sub in arch.transposed)


def _count_prunable(model, arch) -> tuple[int, int]:
    """(number of weights, number of nonzero weights) over the prunable sub-layers."""
    tot = nz = 0
    for _, W in _prunable(model, arch):
        tot += W.numel()
        nz += int((W != 0).sum())
    return tot, nz


def _perplexities(model, tok, s: dict, data_dir, device, progress, batch_size=None) -> dict:
    out = {}
    model.to(device)
    for name in s["eval_datasets"]:
        ids = D.eval_tokens(tok, name, seqlen=s["eval_seqlen"], data_dir=data_dir)
        r = perplexity(model, ids, s["eval_seqlen"], max_windows=s["eval_windows"], device=device,
                       progress=progress, desc=f"eval {name}", batch_size=batch_size)
        r["dataset"] = name
        r["all_windows"] = s["eval_windows"] is None or r["windows"] < s["eval_windows"]
        out[name] = r
    return out


def _check_reference_hook():
    """``--reference``: KL divergence and top-1 agreement (llm_adapters/divergence.py)."""
    try:
        from . import divergence  # noqa: F401
    except ModuleNotFoundError as e:
        raise RunError(f"--reference needs optprune.llm_adapters.divergence, which is not available ({e})") from None


#: window of the held-out self-generated sequences of the data-free KL (clipped to the model's context)
HELDOUT_SEQLEN = 512


def _divergence(model, tok, reference, s, *, model_dir, data_dir, device, progress, self_gen=False) -> dict:
    """compare next-token distributions with a reference (dense) model: ``{"divergence": ...}`` on the
    first evaluation text's windows (same windows as the perplexity) when there is a text, and with ``self_gen``
    ``{"divergence_self": ...}`` on held-out sequences sampled from the reference (data-free)."""
    from . import divergence
    from .loading import load_model
    ref, ref_tok, ref_meta = load_model(reference, model_dir=model_dir, device=device)
    out = {}
    if s["eval_datasets"]:
        name = s["eval_datasets"][0]
        ids = D.eval_tokens(tok, name, seqlen=s["eval_seqlen"], data_dir=data_dir)
        L = s["eval_seqlen"]
        n = ids.numel() // L if s["eval_windows"] is None else min(ids.numel() // L, s["eval_windows"])
        windows = ids[: n * L].view(n, L)
        r = divergence.kl_eval(model, ref, windows, progress=progress)
        r.update(reference=ref_meta.get("source"), text=name)
        out["divergence"] = r
    if self_gen:  # data-free: held-out sequences sampled from the reference (seed + 1000)
        r = divergence.heldout_divergence(model, ref, ref_tok, seed=s["seed"], seqlen=HELDOUT_SEQLEN,
                                          progress=progress)
        r.update(reference=ref_meta.get("source"))
        out["divergence_self"] = r
    del ref
    return out


# ============================================================================================ prune
def prune(model, method, sparsity: Optional[float] = None, pattern: str = "unstructured",
          min_degree: Optional[int] = None, allocation: str = "uniform", allocation_eps: Optional[float] = None,
          structure: Optional[str] = None,
          mode: str = "sequential", error_correction: bool = True, refit: bool = False,
          calibration: Optional[str] = None, nsamples: Optional[int] = None, seqlen: Optional[int] = None,
          protocol: Optional[str] = None, nproc: int = 1, method_options: Optional[dict] = None,
          output=None, evaluate: bool = True, data_dir=None, model_dir=None, device=None, seed: int = 0,
          eval_datasets=None, eval_seqlen: Optional[int] = None, eval_windows: Optional[int] = None,
          reference: Optional[str] = None, damp: Optional[float] = None, batch_size: Optional[int] = None,
          eval_dense: bool = False, kl: bool = True, progress: bool = True, verbose: Optional[bool] = None,
          return_model: bool = False, low_memory: bool = False, activation_dtype: Optional[str] = None,
          tokenizer=None, save_format: str = "dense", dtype: str = "auto", targets=None, ignore=None,
          text_column: str = "text", overwrite: bool = False, checkpoint_dir=None, resume: bool = False,
          certify: bool = False, _cli: bool = False):
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
    token ids; ``targets``/``ignore`` choose the pruned sub-layers; ``save_format`` (dense | compressed) and
    ``dtype`` (auto = the input model's) say how ``output`` is written.

    Long runs (:mod:`optprune.llm_adapters.checkpoint`): the output is written atomically (``overwrite`` replaces an
    existing optprune output); with an output (or ``checkpoint_dir``) every pruned block is checkpointed and
    ``resume=True`` continues an interrupted run. ``sparsity`` defaults to 0.5 (1 − N/M for N:M patterns),
    ``structure`` to ``"mlp"``; giving either where the method or pattern would ignore it is an error."""
    t_total = time.perf_counter()
    verbose = _cli if verbose is None else verbose
    # ---------------------------------------------------------------- 1. validate without the model
    from ..solvers import get_method
    from .pipeline import PruneConfig, pattern_kind, prune_model, validate_config

    spec = get_method(method)
    if method_options is not None and not isinstance(method_options, dict):
        raise RunError("method_options must be a dict of method option → value")
    method_options = dict(method_options or {})
    spec.check_options(method_options)  # an option the solver does not read fails here, before the model loads
    from . import preflight
    from .checkpoint import atomic_output
    pf = preflight.check_prune(
        model=model, model_dir=model_dir, spec=spec, sparsity=sparsity, sparsity_given=sparsity is not None,
        pattern=pattern, pattern_given=pattern is not None and str(pattern).strip().lower() != "unstructured",
        structure=structure or "mlp", structure_given=structure is not None, min_degree=min_degree,
        allocation=allocation, allocation_eps=allocation_eps, evaluate=evaluate, data_dir=data_dir,
        eval_options={"--eval": eval_datasets, "--eval-seqlen": eval_seqlen, "--eval-windows": eval_windows},
        output=output, overwrite=overwrite, reference=reference, resume=resume, checkpoint_dir=checkpoint_dir,
        low_memory=low_memory)
    sparsity, structure = pf["sparsity"], structure or "mlp"
    sparsity = check_sparsity(sparsity)
    if not spec.structured:
        pat = parse_pattern(pattern, sparsity, min_degree=min_degree)
        kind = pattern_kind(pat)
        if kind not in spec.patterns:
            raise RunError(f"method {spec.name!r} does not handle the {kind} pattern "
                           f"(it takes: {', '.join(sorted(spec.patterns))})")
    if mode not in ("sequential", "dense-input"):
        raise RunError(f"--mode must be sequential or dense-input, got {mode!r}")
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    try:
        nproc = int(nproc or 1)
    except (TypeError, ValueError):
        raise RunError(f"--nproc must be an integer ≥ 1, got {nproc!r}") from None
    if nproc < 1:
        raise RunError(f"--nproc must be ≥ 1, got {nproc}")
    from .distributed import world_for  # block-parallel pruning (--nproc N, or ranks of a torchrun)
    if world_for(nproc) > 1 and mode != "dense-input":
        raise RunError("--nproc > 1 (or a torchrun world > 1) needs --mode dense-input (independent blocks); "
                       "the sequential mode stays single-process")
    alloc = (allocation or "uniform").strip().lower()
    if alloc != "uniform":
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
    if allocation_eps is not None and not (0 <= float(allocation_eps) < 1):
        raise RunError(f"--allocation-eps must be in [0, 1), got {allocation_eps}")
    dev = _default_device(device)
    out_dir = pf["out_dir"]
    if reference:
        _check_reference_hook()
    from . import export
    from .calib_inputs import calibration_kind, is_in_memory
    from .targets import parse_patterns
    export.check_save_options(save_format, dtype, structured=spec.structured)
    targets, ignore = parse_patterns(targets, "targets"), parse_patterns(ignore, "ignore")
    in_memory = isinstance(model, torch.nn.Module)
    model_label = (getattr(model.config, "name_or_path", "") or type(model).__name__) if in_memory else model
    calib_given = calibration if is_in_memory(calibration) else None
    if low_memory and (in_memory or calib_given is not None or targets or ignore or save_format != "dense"
                       or dtype not in (None, "auto")):
        raise RunError("--low-memory takes a model path, a named/file calibration, all layers, the dense format "
                       "and --dtype auto")
    s = resolve_settings(model_label, protocol=protocol, calibration=None if calib_given is not None else calibration,
                         nsamples=nsamples, seqlen=seqlen, seed=seed, eval_datasets=eval_datasets,
                         eval_seqlen=eval_seqlen, eval_windows=eval_windows, data_dir=data_dir,
                         need_calibration=calib_given is None, need_eval=bool(evaluate))
    if calib_given is not None:
        s["calibration"] = s["overrides"]["calibration"] = calibration_kind(calib_given)
        s["name"] = s["base"] + "+custom"
    ck = preflight.open_checkpoint(  # per-block checkpoints + resume (checkpoint.py); None when not kept
        out_dir, checkpoint_dir, resume, single=world_for(nproc) == 1 and not low_memory, settings=dict(
            model=str(model_label), method=spec.name, sparsity=sparsity, pattern=pattern, min_degree=min_degree,
            allocation=alloc, allocation_eps=allocation_eps, structure=structure, mode=mode,
            error_correction=bool(error_correction), refit=bool(refit), method_options=method_options, damp=damp,
            batch_size=batch_size, device=dev, **{k: s.get(k) for k in ("calibration", "calibration_path",
                                                                        "nsamples", "seqlen", "seed")}))
    if s["calibration"] == "self":
        try:
            from .selfcalib import self_calibration
        except ModuleNotFoundError as e:
            raise RunError(f"--calibration self needs optprune.llm_adapters.selfcalib ({e})") from None
    # a data-free method (no statistics, no refit, uniform allocation) is never calibrated
    data_free = spec.needs == "none" and not refit and alloc == "uniform" and not low_memory
    if data_free:
        s.update(calibration="none", calibration_path=None, nsamples=0, seqlen=0)
        s.pop("calibration_note", None)
    for note in (s.get("calibration_note"), s.get("eval_note") if evaluate else None):
        if note:
            log.warning(note)
    if activation_dtype is not None and not low_memory:
        raise RunError("--activation-dtype applies to --low-memory only")
    if certify and low_memory:
        raise RunError("--certify is not available with --low-memory (run it in memory)")
    if verbose:  # what is about to run, after every check, before any heavy work
        _print_header(model_label, spec, sparsity, pattern, s, evaluate=evaluate, kl=kl, out_dir=out_dir)
    if low_memory:  # one block resident at a time, read from the safetensors shards (offload.py)
        from .offload import prune_low_memory
        staged = atomic_output(out_dir, overwrite=overwrite) if out_dir is not None and world_for(nproc) == 1 \
            else contextlib.nullcontext(out_dir)  # atomic output: written beside the target, renamed at the end
        with staged as lm_out:
            return prune_low_memory(
                model=model, model_dir=model_dir, spec=spec, sparsity=sparsity, pattern=pattern, min_degree=min_degree,
                allocation=alloc, structure=structure, mode=mode, error_correction=error_correction, refit=refit,
                method_options=method_options, damp=damp, batch_size=batch_size, nproc=nproc, device=dev, settings=s,
                output=lm_out, evaluate=evaluate, data_dir=data_dir, reference=reference, seed=seed,
                activation_dtype=activation_dtype, progress=progress, verbose=verbose, return_model=return_model,
                t_total=t_total)

    # ---------------------------------------------------------------- 2. model; architecture and shapes
    from .architectures import get_arch
    from .loading import load_model
    timings = {}
    t0 = time.perf_counter()
    if in_memory:
        mdl, tok, meta = model, tokenizer, _memory_meta(model, model_label)
    else:
        mdl, tok, meta = preflight.load_checked(load_model, model, model_dir=model_dir,
                                                   require_arch=True)  # unsupported: refused before loading
        tok = tokenizer if tokenizer is not None else tok
    meta["source_dtype"] = str(export.source_dtype(mdl, None if in_memory else meta)).replace("torch.", "")
    timings["load_s"] = time.perf_counter() - t0
    arch = get_arch(mdl)
    _clip_to_context(s, mdl)
    if tok is None and (evaluate or out_dir is not None or not torch.is_tensor(calib_given)):
        raise RunError("an in-memory model needs its tokenizer (tokenizer=) for text calibration, evaluation "
                       "and saving")
    cfg_kw = dict(method=spec.name, sparsity=sparsity, pattern=pattern, min_degree=min_degree, layer_sparsity=None,
                  structure=structure, mode=mode, error_correction=bool(error_correction), refit=bool(refit),
                  method_options=method_options, device=dev, certify=bool(certify))
    if damp is not None:
        cfg_kw["damp"] = float(damp)
    if batch_size is not None:
        cfg_kw["batch_size"] = int(batch_size)
    if "nproc" in fields:
        cfg_kw["nproc"] = nproc
    if targets or ignore:
        cfg_kw.update(targets=targets, ignore=ignore)
    config = PruneConfig(**cfg_kw)
    validate_config(mdl, config)  # the pattern against every sub-layer shape (e.g. 4:8 on width 172)

    record = {"command": "prune", "status": "running",
              "config": _jsonable({"model": str(model_label), "method": spec.name, "sparsity": sparsity,
                                   "pattern": None if spec.structured else pattern,
                                   "min_degree": min_degree, "allocation": alloc, "allocation_eps": allocation_eps,
                                   "structure": structure if spec.structured else None, "mode": mode,
                                   "error_correction": bool(error_correction), "refit": bool(refit),
                                   "method_options": method_options, "damp": config.damp, "nproc": nproc,
                                   "device": dev, "seed": s["seed"], "output": str(out_dir) if out_dir else None,
                                   "evaluate": bool(evaluate), "data_dir": str(D.resolve_data_dir(data_dir)),
                                   "reference": reference, "targets": targets, "ignore": ignore,
                                   "save_format": save_format, "dtype": dtype, "certify": bool(certify)}),
              "versions": _versions(), "machine": _machine(dev), "model": meta}

    # ---------------------------------------------------------------- 3. calibration, allocation, pruning
    if eval_dense and evaluate:
        t0 = time.perf_counter()
        record["perplexity_dense"] = _perplexities(mdl, tok, s, data_dir, dev, progress, None)
        timings["eval_dense_s"] = time.perf_counter() - t0
        mdl.to("cpu")
    t0 = time.perf_counter()
    if calib_given is not None:  # in memory: texts, a datasets.Dataset or token ids (calib_inputs.py)
        from .calib_inputs import calibration_from
        calib, calib_info = calibration_from(
            tok, calib_given, nsamples=s["nsamples"], seqlen=s["seqlen"], seed=s["seed"], explicit_nsamples=nsamples,
            explicit_seqlen=seqlen, text_column=text_column,
            vocab_size=getattr(mdl.get_input_embeddings(), "num_embeddings", None))
        s["nsamples"], s["seqlen"] = int(calib.shape[0]), int(calib.shape[1])
    elif data_free:  # the pipeline walks the blocks on a 2-token stand-in; nothing is measured from it
        calib, calib_info = torch.zeros((1, 2), dtype=torch.long), {"source": "none", "note": "data-free method"}
    elif s["calibration"] == "self" and ck is not None and ck.calib is not None:  # resumed: saved sequences
        calib, calib_info = ck.calib, ck.calib_info
    elif s["calibration"] == "self":  # sequences sampled from the dense model itself
        info: dict = {}
        mdl.to(dev)
        calib = self_calibration(mdl, tok, s["nsamples"], s["seqlen"], seed=s["seed"], info=info, progress=progress,
                                 done_rows=ck and ck.calib_rows, on_batch=ck and ck.save_calib_rows)
        mdl.to("cpu")
        calib_info = info
        if ck is not None:
            ck.save_calib(calib, info)
    else:
        calib, calib_info = D.calibration_tokens(tok, s["calibration"], nsamples=s["nsamples"], seqlen=s["seqlen"],
                                                 seed=s["seed"], data_dir=data_dir, return_info=True)
    timings["calibration_s"] = time.perf_counter() - t0
    record["calibration"] = _jsonable(calib_info)

    if alloc != "uniform":
        t0 = time.perf_counter()
        layer_s, alloc_info = alloc_mod.layer_sparsities(mdl, arch, alloc, sparsity, eps=allocation_eps,
                                                         calib_ids=calib, data=None, prune_config=config,
                                                         progress=verbose)
        config.layer_sparsity = dict(layer_s)
        timings["allocation_s"] = time.perf_counter() - t0
        if out_dir is not None and alloc_info.get("candidates"):  # auto: candidates' scores, next to run.json
            from .allocation_select import plot_selection
            alloc_info["plot"] = plot_selection(alloc_info, out_dir / "allocation_selection.png")
        record["allocation"] = _jsonable(alloc_info)

    tot_w, nz_before = _count_prunable(mdl, arch)
    dense_copy = None
    if kl and evaluate:  # kept on the CPU for the data-free KL after pruning
        import copy
        dense_copy = copy.deepcopy(mdl).to("cpu")
    from .distributed import prune_model_parallel  # one process, --nproc N workers, or torchrun ranks
    res = (ck.run_pipeline if ck is not None else _call)(  # checkpoints after every block; resumes
        prune_model_parallel, mdl, calib, config, progress=progress, nproc=nproc, source=(model, model_dir))
    if res is None:  # a non-zero rank of a block-parallel run: rank 0 evaluates, saves and records
        return None
    timings["prune_s"] = res.get("time_s")
    _, nz_after = _count_prunable(mdl, arch)
    if data_free:
        for r in res.get("layers", []):
            r["rel_error"] = None
    record["layers"] = _jsonable(res.get("layers", []))
    record["blocks"] = _jsonable(res.get("blocks", []))
    record["pipeline"] = _jsonable({k: v for k, v in res.items() if k not in ("layers", "blocks")})
    rel = [r["rel_error"] for r in res.get("layers", []) if r.get("rel_error") is not None]
    targets = [(r["sparsity_target"], math.prod(r["shape"])) for r in res.get("layers", []) if "shape" in r]
    record["summary"] = {
        "prunable_weights": tot_w, "nonzero_before": nz_before, "nonzero_after": nz_after,
        "sparsity": 1.0 - nz_after / tot_w if tot_w else 0.0,
        "sparsity_target": (sum(t * n for t, n in targets) / sum(n for _, n in targets)) if targets else None,
        "layers": len(res.get("layers", [])),
        "mean_rel_error": (sum(rel) / len(rel)) if rel else None,
        "max_rel_error": max(rel) if rel else None,
    }
    if certify:
        from ..solvers.bounds import summarize_certificates
        record["summary"]["certificates"] = summarize_certificates(res.get("layers", []))

    # ---------------------------------------------------------------- 4. evaluation, save, record
    if evaluate:
        t0 = time.perf_counter()
        record["perplexity"] = _perplexities(mdl, tok, s, data_dir, dev, progress, None)
        timings["eval_s"] = time.perf_counter() - t0
    if dense_copy is not None:  # data-free KL / top-1 against the dense model, held-out sequences
        from .divergence import heldout_divergence
        t0 = time.perf_counter()
        mdl.to(dev)
        dense_copy.to(dev)
        record["divergence_self"] = heldout_divergence(mdl, dense_copy, tok, seed=s["seed"], seqlen=HELDOUT_SEQLEN,
                                                       progress=progress)
        record["divergence_self"]["reference"] = "the dense model before pruning"
        dense_copy = None
        timings["divergence_self_s"] = time.perf_counter() - t0
    if reference:
        t0 = time.perf_counter()
        record.update(_divergence(mdl, tok, reference, s, model_dir=model_dir, data_dir=data_dir,
                                  device=dev, progress=progress))
        timings["divergence_s"] = time.perf_counter() - t0
    record["protocol"] = _protocol_record(s)
    # written into a folder beside the target, renamed into place at the end (an interrupted save leaves
    # the target as it was)
    with (atomic_output(out_dir, overwrite=overwrite) if out_dir is not None else contextlib.nullcontext()) as stage:
        if out_dir is not None:
            t0 = time.perf_counter()
            record["saved"] = {**_save(mdl, tok, stage, arch, spec, save_format=save_format,
                                       dtype=export.resolve_dtype(dtype, getattr(torch, meta["source_dtype"])),
                                       layers=[r["name"] for r in record["layers"]], pattern=pattern),
                               "path": str(out_dir.resolve())}
            timings["save_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_total
        record["timings"] = timings
        record["peak_rss_mb"] = _peak_rss_mb()
        if res.get("peak_cuda_mb") is not None:
            record["peak_cuda_mb"] = res["peak_cuda_mb"]
        record["status"] = "done"
        record = _jsonable(record)
        if out_dir is not None:
            (stage / RUN_FILE).write_text(json.dumps(record, indent=1))
    if ck is not None:
        ck.remove()
    if verbose:
        _print_prune_summary(record, out_dir)
    if return_model:
        return mdl, tok, record
    return record


def _call(fn, *a, **kw):
    return fn(*a, **kw)


def _save(model, tok, out_dir: Path, arch, spec, *, save_format="dense", dtype=None, layers=None,
          pattern=None) -> dict:
    """save_pretrained (+ tokenizer) through ``export.save_model`` (format, dtype). Structured methods may leave
    per-layer widths that a stock config cannot express: those go through ``surgery.save_shrunk`` (which writes
    ``optprune_widths.json`` and, when the widths are uniform, a stock-loadable config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    info = {"path": str(out_dir.resolve())}
    if not spec.structured:
        from .export import save_model
        info.update(save_model(model, out_dir, tok, format=save_format, dtype=dtype or torch.float32,
                               layers=layers, pattern=pattern), format="hf", stock_loadable=save_format == "dense")
        return info
    if dtype is not None:
        model.to(dtype)  # (structured: the shrunk model is written in the output dtype)
        info["dtype"] = str(dtype).replace("torch.", "")
    if spec.structured:
        # SURGERY CALL SITE (llm_adapters/surgery.py): shrunk models, possibly with per-layer widths
        from . import surgery
        widths = surgery.save_shrunk(model, str(out_dir), arch)
        info.update(format="optprune-shrunk", stock_loadable=bool(widths.get("stock_loadable")),
                    uniform=bool(widths.get("uniform")))
    else:
        model.save_pretrained(str(out_dir))
        info.update(format="hf", stock_loadable=True)
    tok.save_pretrained(str(out_dir))
    return info


def _memory_meta(model, label) -> dict:
    from .loading import count_parameters
    cfg = model.config
    return {"name": str(label), "source": "in-memory", "format": "in-memory",
            "model_type": getattr(cfg, "model_type", None), "architecture": type(model).__name__,
            "n_params": count_parameters(model),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "num_layers": getattr(cfg, "num_hidden_layers", None), "vocab_size": getattr(cfg, "vocab_size", None)}


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
    verbose = _cli if verbose is None else verbose
    dev = _default_device(device)
    from . import preflight  # files and folders, before any weight is read
    preflight.check_data_dir(data_dir)
    preflight.check_model_source(model, model_dir)
    if reference:
        _check_reference_hook()
        preflight.check_model_source(reference, model_dir, what="--reference")
    task_list = _split_list(tasks) if tasks else None
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
    if not s["eval_datasets"] and not reference and not task_list:
        raise RunError(f"nothing to evaluate: {s.get('eval_note', 'no evaluation text')}; point --data-dir at the "
                       f"data, pass --eval FILE, or --reference DENSE for the data-free KL/top-1")
    if s.get("eval_note"):
        log.warning(s["eval_note"])
    out_file = None
    if output is not None:
        o = Path(str(output)).expanduser()
        out_file = o / "eval.json" if o.is_dir() else o
        if not out_file.parent.exists():
            raise RunError(f"--output: the folder {out_file.parent} does not exist")
        preflight.check_writable(out_file.parent, f"--output {out_file}")
    from .loading import load_model
    t0 = time.perf_counter()
    mdl, tok, meta = preflight.load_checked(load_model, model, model_dir=model_dir, device=dev)
    timings = {"load_s": time.perf_counter() - t0}
    _clip_to_context(s, mdl, need_calibration=False)
    record = {"command": "eval", "model": meta, "versions": _versions(), "machine": _machine(dev)}
    t0 = time.perf_counter()
    record["perplexity"] = _perplexities(mdl, tok, s, data_dir, dev, progress, batch_size)
    timings["eval_s"] = time.perf_counter() - t0
    if reference:
        t0 = time.perf_counter()
        record.update(_divergence(mdl, tok, reference, s, model_dir=model_dir, data_dir=data_dir,
                                  device=dev, progress=progress, self_gen=True))
        timings["divergence_s"] = time.perf_counter() - t0
    if task_list:
        t0 = time.perf_counter()
        record["zero_shot"] = zero_shot(mdl, tok, task_list, limit=task_limit, device=dev, include_path=include_path)
        timings["zero_shot_s"] = time.perf_counter() - t0
    s.pop("calibration_path", None)
    prot = _protocol_record(s)
    for k in ("calibration", "nsamples", "seqlen"):
        prot.pop(k, None)
    record["protocol"] = prot
    timings["total_s"] = time.perf_counter() - t_total
    record["timings"] = timings
    record["peak_rss_mb"] = _peak_rss_mb()
    record = _jsonable(record)
    if out_file is not None:  # whole or not at all
        tmp = out_file.with_name(f".{out_file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_file)
    if verbose:
        _print_eval_summary(record, out_file)
    return record


# ============================================================================================ terminal
def _fmt(v, spec=".4f", none="-"):
    return none if v is None else format(v, spec)


def _print_ppl(record, file):
    for name, r in (record.get("perplexity") or {}).items():
        win = "all" if r.get("all_windows") else "first"
        dense = (record.get("perplexity_dense") or {}).get(name)
        extra = f"   (dense {dense['ppl']:.3f})" if dense else ""
        print(f"  perplexity {name:<10} {r['ppl']:10.3f}   seqlen {r['seqlen']}, {win} {r['windows']} windows, "
              f"{r['time_s']:.1f} s{extra}", file=file)
    dv = record.get("divergence")
    if dv:
        print(f"  vs reference ({dv.get('text')}): KL {dv.get('kl'):.4f} nats/token, top-1 agreement "
              f"{dv.get('top1'):.3f}", file=file)
    ds = record.get("divergence_self")
    if ds:
        who = "dense" if record.get("command") == "prune" else "reference"
        print(f"  vs {who} (held-out self-generated {ds.get('windows')}×{ds.get('seqlen')}, seed {ds.get('seed')}): "
              f"KL {ds.get('kl'):.4f} nats/token, top-1 agreement {ds.get('top1'):.3f}", file=file)


def _print_header(model, spec, sparsity, pattern, s: dict, *, evaluate, kl, out_dir, file=None) -> None:
    file = file or sys.stderr
    calib = "none (data-free method)" if s["calibration"] == "none" else \
        f"{s['calibration']} {s['nsamples']}×{s['seqlen']} seed {s['seed']}"
    ev, nt = [], torch.get_num_threads()
    if evaluate:
        ev += [f"perplexity {', '.join(s['eval_datasets'])}"] if s["eval_datasets"] else []
        ev += ["KL/top-1 vs dense (held-out self-generated)"] if kl else []
    print(f"[optprune] prune {model}: {spec.name} · {'structured' if spec.structured else pattern} · sparsity "
          f"{sparsity:.2f} · calibration {calib} · eval {'; '.join(ev) or 'off'} · output "
          f"{out_dir if out_dir else '(not saved)'} · {nt} thread{'s' if nt != 1 else ''}", file=file, flush=True)


def _print_prune_summary(record: dict, out_dir, file=None) -> None:
    file = file or sys.stdout
    c, p, sm, t = record["config"], record["protocol"], record["summary"], record["timings"]
    pat = "structured " + str(c["structure"]) if c.get("structure") else c["pattern"]
    print(f"\noptprune prune: {c['method']} · {pat} · sparsity {c['sparsity']:.2f} · {record['model'].get('name')} "
          f"({record['model'].get('n_params', 0) / 1e6:.2f}M params)", file=file)
    print(f"  protocol {p['name']}: calibration {p['calibration']} {p['nsamples']}×{p['seqlen']} seed {p['seed']}; "
          f"mode {c['mode']}, error correction {'on' if c['error_correction'] else 'off'}"
          f"{', refit' if c['refit'] else ''}", file=file)
    layers = record.get("layers") or []
    blocks = {}
    for r in layers:
        b = blocks.setdefault(r["block"], {"n": 0, "w": 0, "z": 0.0, "rel": [], "t": 0.0})
        n = math.prod(r["shape"])
        b["n"] += 1
        b["w"] += n
        b["z"] += r["sparsity"] * n
        b["t"] += r.get("time_s") or 0.0
        if r.get("rel_error") is not None:
            b["rel"].append(r["rel_error"])
    print(f"  {'block':>5} {'layers':>6} {'sparsity':>9} {'rel.err mean':>13} {'rel.err max':>12} {'solve s':>8}",
          file=file)
    for bi, b in sorted(blocks.items()):
        rel = b["rel"]
        print(f"  {bi:>5} {b['n']:>6} {b['z'] / b['w']:>9.4f} {_fmt(sum(rel) / len(rel) if rel else None):>13} "
              f"{_fmt(max(rel) if rel else None):>12} {b['t']:>8.2f}", file=file)
    pruned_w = sum(b["w"] for b in blocks.values())
    pruned_s = sum(b["z"] for b in blocks.values()) / pruned_w if pruned_w else 0.0
    print(f"  {'all':>5} {sm['layers']:>6} {pruned_s:>9.4f} {_fmt(sm['mean_rel_error']):>13} "
          f"{_fmt(sm['max_rel_error']):>12} {sum(b['t'] for b in blocks.values()):>8.2f}   "
          f"(target {_fmt(sm['sparsity_target'])})", file=file)
    if abs(pruned_s - sm["sparsity"]) > 5e-5:  # structured runs: the rows above are the pruned layers only
        print(f"  zeros/removed weights over all {sm['prunable_weights']} prunable weights: {sm['sparsity']:.4f}",
              file=file)
    cs = sm.get("certificates")
    if cs:
        g = cs["l0_rel_gap"]
        print(f"  certified: (ours − lower bound)/ours over {g['n']} layers: median {g['median']:.3g}, "
              f"p90 {g['p90']:.3g}, max {g['max']:.3g} (weakest: {cs['weakest'][0]['name']})"
              + (f"; ℓ1 duality gap median {cs['l1_rel_gap']['median']:.2e}" if cs.get("l1_rel_gap") else ""),
              file=file)
    print(f"  time: load {t.get('load_s', 0):.1f} s, calibration {t.get('calibration_s', 0):.1f} s, "
          f"prune {t.get('prune_s') or 0:.1f} s, eval {t.get('eval_s', 0):.1f} s, total {t['total_s']:.1f} s; "
          f"peak RSS {record['peak_rss_mb']:.0f} MB", file=file)
    _print_ppl(record, file)
    if out_dir is not None:
        sv = record.get("saved") or {}
        size = f", {sv['weights_bytes'] / 2 ** 20:.1f} MiB of weights" if sv.get("weights_bytes") else ""
        print(f"  saved: {out_dir}/ (model, tokenizer, {RUN_FILE}; {sv.get('save_format', 'dense')} "
              f"{sv.get('dtype', '')}{size})", file=file)


def _print_eval_summary(record: dict, out_file, file=None) -> None:
    file = file or sys.stdout
    p = record["protocol"]
    print(f"\noptprune eval: {record['model'].get('name')} ({record['model'].get('n_params', 0) / 1e6:.2f}M params), "
          f"protocol {p['name']}", file=file)
    _print_ppl(record, file)
    for task, m in (record.get("zero_shot") or {}).items():
        print(f"  lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), file=file)
    if out_file is not None:
        print(f"  record: {out_file}", file=file)
