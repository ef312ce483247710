"""Run settings: the effective calibration/evaluation protocol of a run, from the protocol defaults
(docs/protocols.md) and the explicit options — resolved without the model — and the checks of single options.

``resolve_settings`` names the protocol (``"<name>+custom"`` when options override it), checks that the data
files exist, and falls back (announced) to C4 and then to self-generated calibration when a defaulted protocol's
text is missing. ``clip_to_context`` clips protocol window lengths to the model's context once it is known.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from . import data as D
from .evaluation import model_context

__all__ = ["RunError", "resolve_settings", "SELF_CALIB_DEFAULT", "RUN_FILE", "check_sizes", "available_memory",
           "cpu_cores",
           "clip_to_context", "default_device", "protocol_record", "split_list", "model_sizes", "ALLOCATIONS_FALLBACK"]

RUN_FILE = "run.json"
log = logging.getLogger("optprune")

#: self-calibration size when the protocol was not chosen explicitly and no --nsamples/--seqlen were given:
#: sampling and the block passes cost ~2·params FLOPs per token each, so the data-free default stays small
#: (FISTA 50% on SmolLM2-135M: 128×512 took ~44 min on 2 cores; 64×256 takes 552 CPU-seconds end to end on one
#: thread, KL 0.49 / top-1 0.63 against the dense model; on stories260K 64×256 vs 128×512: KL 1.004 vs 0.997)
SELF_CALIB_DEFAULT = (64, 256)
ALLOCATIONS_FALLBACK = ("uniform", "alpha", "owl")


class RunError(ValueError):
    """Bad input to prune/evaluate (one line; nothing changed)."""


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory() -> Optional[int]:
    """Bytes of memory available to new allocations (``MemAvailable`` of /proc/meminfo), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None



# ============================================================================================ settings
def _builtin_key(model) -> Optional[str]:
    from .loading import MODEL_ALIASES
    return MODEL_ALIASES.get(str(model).strip().lower()) if isinstance(model, (str, os.PathLike)) else None


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


def split_list(v) -> Optional[list]:
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
    overrides = _apply_overrides(s, calibration=calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                 eval_datasets=eval_datasets, eval_seqlen=eval_seqlen, eval_windows=eval_windows)
    s["overrides"] = overrides
    if need_calibration:
        _calibration_source(s, overrides, explicit=calibration is not None, protocol=protocol, data_dir=data_dir)
    if need_eval:
        _missing_eval_fallback(s, data_dir, explicit=eval_datasets is not None)
    s["name"] = s["base"] + ("+custom" if overrides else "")
    return s


#: the integer protocol settings an option may override: key -> (flag, smallest value, note in the refusal)
_INT_SETTINGS = {"nsamples": ("--nsamples", 1, ""), "seqlen": ("--seqlen", 2, ""),
                 "eval_seqlen": ("--eval-seqlen", 2, ""), "eval_windows": ("--eval-windows", 0, " (0 = all windows)")}


def _apply_overrides(s: dict, *, calibration, nsamples, seqlen, seed, eval_datasets, eval_seqlen,
                     eval_windows) -> dict:
    """The explicit options over the protocol's settings (in place); returns those that changed a setting."""
    given = {"calibration": None if calibration is None else str(calibration),
             "seed": None if seed is None else int(seed),
             "eval_datasets": None if eval_datasets is None else split_list(eval_datasets)}
    for key, value in (("nsamples", nsamples), ("seqlen", seqlen), ("eval_seqlen", eval_seqlen),
                       ("eval_windows", eval_windows)):
        if value is not None:
            flag, low, note = _INT_SETTINGS[key]
            if int(value) < low:
                raise RunError(f"{flag} must be ≥ {low}{note}, got {value}")
            given[key] = int(value)
    if given.get("eval_windows") == 0:
        given["eval_windows"] = None  # 0: all windows
    overrides = {}
    for key in ("calibration", "nsamples", "seqlen", "seed", "eval_datasets", "eval_seqlen", "eval_windows"):
        if key in given and (given[key] is not None or key == "eval_windows") and given[key] != s[key]:
            overrides[key] = s[key] = given[key]
    return overrides


def _calibration_source(s: dict, overrides: dict, *, explicit: bool, protocol, data_dir) -> None:
    """The calibration source: the protocol's if present; a defaulted protocol falls back to c4, then to
    self-generated sequences (announced); an explicitly asked-for one must exist."""
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
            if not explicit and protocol is None and src != "c4":
                try:
                    s["calibration_path"] = D.check_dataset("c4", "validation", data_dir)
                    s["calibration"] = "c4"
                    overrides["calibration"] = "c4"
                except FileNotFoundError:
                    _self_fallback(s, overrides, e, data_dir)
            elif not explicit:
                _self_fallback(s, overrides, e, data_dir)
            else:
                raise _no_calibration(e, data_dir) from None


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


def clip_to_context(s: dict, model, *, need_calibration=True) -> None:
    """Protocol window lengths longer than the model's context are clipped (explicit ones are an error).
    ``model``: the model, or its context length in tokens read from its files before loading (or None)."""
    ctx = model if model is None or isinstance(model, int) else model_context(model)
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


#: copies of the calibration activations the pipeline holds at once (a block's inputs and its outputs,
#: ``nsamples × seqlen × hidden`` each, in the model's dtype on the compute device; llm_adapters/pipeline.py)
ACTIVATION_COPIES = 2


def check_sizes(s: dict, *, context: Optional[int], hidden: Optional[int], dtype_bytes: int = 4, device=None,
                calibration: bool = True) -> Optional[int]:
    """Sizes against the model, from its metadata (before any weight is read): an explicit ``--seqlen`` /
    ``--eval-seqlen`` longer than the model's context, and calibration activations that would not fit in the
    memory available (RAM, or the GPU's free memory for a CUDA device). Returns the activation estimate
    (bytes) or None when the hidden size is unknown; raises :class:`RunError` with the estimate."""
    if context:
        for k, flag, use in (("seqlen", "--seqlen", calibration), ("eval_seqlen", "--eval-seqlen", True)):
            if use and k in s.get("overrides", {}) and int(s[k]) > int(context):
                raise RunError(f"{flag} {s[k]} exceeds the model's context of {context} tokens")
    if not calibration or not hidden or not s.get("nsamples"):
        return None
    seqlen = min(int(s["seqlen"]), int(context)) if context else int(s["seqlen"])
    need = ACTIVATION_COPIES * int(s["nsamples"]) * seqlen * int(hidden) * int(dtype_bytes)
    avail, where = available_memory(), "memory"
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        try:
            avail, where = torch.cuda.mem_get_info(torch.device(str(device)))[0], "free GPU memory"
        except (RuntimeError, ValueError):
            pass
    if avail is not None and need > avail:
        raise RunError(f"--nsamples {s['nsamples']} × --seqlen {seqlen}: the calibration activations need about "
                       f"{need / 2**30:.1f} GiB ({ACTIVATION_COPIES} × {s['nsamples']} × {seqlen} × hidden {hidden} "
                       f"× {dtype_bytes} bytes), but only {avail / 2**30:.1f} GiB of {where} is available; lower "
                       f"--nsamples or --seqlen")
    return need


def model_sizes(model, config: Optional[dict]) -> dict:
    """``{"context", "hidden", "dtype_bytes"}`` of a model from its metadata: a loaded model's config, or the
    config dict read from ``config.json`` / the GGUF header (GGUF weights are dequantized to float32)."""
    if isinstance(model, torch.nn.Module):
        cfg = getattr(model, "config", None)
        get = (lambda k: getattr(cfg, k, None))
        try:
            nbytes = next(model.parameters()).element_size()
        except StopIteration:
            nbytes = 4
    else:
        cfg = config or {}
        get = cfg.get
        dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        nbytes = 2 if dt in ("float16", "bfloat16") else 4
    ctx = next((get(k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(get(k), int) and get(k) > 0), None)
    hidden = next((get(k) for k in ("hidden_size", "n_embd", "d_model", "dim") if isinstance(get(k), int)), None)
    return {"context": ctx, "hidden": hidden, "dtype_bytes": nbytes}


def protocol_record(s: dict) -> dict:
    keep = ("name", "base", "origin", "calibration", "nsamples", "seqlen", "seed", "eval_datasets", "eval_seqlen",
            "eval_windows", "overrides", "clipped", "calibration_path", "eval_paths", "calibration_note",
            "calibration_missing", "eval_note", "eval_missing")
    return {k: s[k] for k in keep if k in s}



def default_device(device) -> str:
    """The run's device as a string (None: CUDA when available, else the CPU); one-line :class:`RunError` for an
    unknown name or CUDA on a machine without it."""
    from .devices import resolve_device
    return str(resolve_device(device, RunError))

