"""Runs written down: optprune config files, ``run.json`` replays, and llm-compressor recipes.

All three give the keyword arguments of ``optprune prune`` (CLI option names with ``_``: ``sparsity``,
``pattern``, ``dataset``, ``targets``, ...); explicit CLI flags override them.

* **config file** (``--config run.yaml`` / ``.json``): a mapping of those names, e.g.
  ``{model: stories260k, method: sparsegpt, sparsity: 0.5, pattern: "2:4", dataset: wikitext2, nsamples: 32}``
  (``-`` or ``_`` in keys; ``method_options`` a mapping). Unknown keys are an error naming the valid ones.
* **replay** (``--replay out/run.json``): the settings a previous run recorded — model, method and every
  option, the effective calibration (source, nsamples, seqlen, seed), evaluation windows and the calibration
  batch size — so that the same code on the same machine (1 thread) reproduces its masks bit for bit. The
  output directory and the device are not taken over.
* **llm-compressor recipe** (a config file holding ``SparseGPTModifier`` or ``WandaPruningModifier``, at the top
  level, under ``<stage>: {<group>_modifiers: {...}}`` or in a ``modifiers`` list): ``sparsity``,
  ``mask_structure`` (``"2:4"``, ``"0:0"`` = unstructured), ``targets``, ``ignore``, ``dampening_frac`` map to
  the equivalent optprune run; execution details of llm-compressor (``block_size``, ``sequential_targets``,
  ``offload_hessians``, ...) are recorded as not applicable; any other modifier is an error naming the ones
  optprune reads. The calibration data of a recipe come from the command line (``--dataset``), as with
  llm-compressor's ``oneshot``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .description import config_keys, replay_keys

__all__ = ["RecipeError", "read_mapping", "config_kwargs", "replay_kwargs", "recipe_kwargs",
           "is_llmc_recipe", "LLMC_MODIFIERS"]


class RecipeError(ValueError):
    """A config file, recipe or run.json that cannot be used (one line)."""


_ALIASES = {"calibration": "dataset", "eval": "eval_datasets", "method_opt": "method_options",
            "mask_structure": "pattern"}

#: llm-compressor modifier → optprune method
LLMC_MODIFIERS = {"SparseGPTModifier": "sparsegpt", "WandaPruningModifier": "wanda"}
#: llm-compressor modifier fields that are execution details with no optprune counterpart (recorded, not used)
_LLMC_NOT_APPLICABLE = ("block_size", "sequential_update", "sequential_targets", "offload_hessians",
                        "preserve_sparsity_mask", "start", "end", "update", "index", "group")
_LLMC_MAPPED = ("sparsity", "mask_structure", "targets", "ignore", "dampening_frac")


def read_mapping(path) -> dict:
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise RecipeError(f"no such file: {p}")
    from .model_files import read_utf8
    text = read_utf8(p, RecipeError)
    try:
        if p.suffix.lower() == ".json":
            d = json.loads(text)
        else:
            import yaml
            d = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {first}") from None
    if not isinstance(d, dict):
        raise RecipeError(f"{p} must hold a mapping of option: value")
    return d


def _norm_key(k) -> str:
    k = str(k).strip().replace("-", "_")
    return _ALIASES.get(k, k)


def _pattern(mask_structure) -> str:
    ms = str(mask_structure).strip()
    return "unstructured" if ms in ("0:0", "unstructured", "") else ms


def config_kwargs(path) -> tuple[dict, dict]:
    """(prune keyword arguments, info) from an optprune config file or an llm-compressor recipe."""
    d = read_mapping(path)
    if is_llmc_recipe(d):
        return recipe_kwargs(d, path)
    out = {}
    for k, v in d.items():
        key = _norm_key(k)
        if key not in config_keys():  # the run options (llm_adapters/description.py)
            raise RecipeError(f"{path}: unknown option {k!r}; valid: {', '.join(config_keys())} (or an llm-compressor "
                              f"recipe with {' / '.join(LLMC_MODIFIERS)})")
        if key == "method_options" and v is not None and not isinstance(v, dict):
            raise RecipeError(f"{path}: method_options must be a mapping of option: value")
        if key == "pattern" and k == "mask_structure":
            v = _pattern(v)
        out[key] = v
    return out, {"kind": "optprune config", "path": str(Path(str(path)).expanduser().resolve())}


# ---------------------------------------------------------------------------------------------- llm-compressor
def _modifier_name(k) -> Optional[str]:
    return str(k) if str(k).endswith("Modifier") else None


def _collect_modifiers(node, found: list, where: str) -> None:
    """Every ``{XModifier: {...}}`` in a recipe: top level, ``stage: {group_modifiers: {...}}``, or lists
    ``[{XModifier: {...}}]`` / ``[{type: XModifier, ...}]``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if _modifier_name(k):
                found.append((str(k), v if isinstance(v, dict) else {}, where))
            elif isinstance(v, (dict, list)) and k not in _LLMC_MAPPED:
                _collect_modifiers(v, found, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            if isinstance(item, dict) and _modifier_name(item.get("type", "")):
                args = {k: v for k, v in item.items() if k != "type"}
                found.append((str(item["type"]), args, f"{where}[{i}]"))
            else:
                _collect_modifiers(item, found, f"{where}[{i}]")


def is_llmc_recipe(d: dict) -> bool:
    found: list = []
    _collect_modifiers(d, found, "")
    return bool(found)


def recipe_kwargs(d: dict, path="recipe") -> tuple[dict, dict]:
    """(prune keyword arguments, info) of an llm-compressor recipe with one SparseGPT/Wanda modifier."""
    found: list = []
    _collect_modifiers(d, found, "")
    unknown = [(n, w) for n, _, w in found if n not in LLMC_MODIFIERS]
    if unknown:
        n, w = unknown[0]
        raise RecipeError(f"{path}: modifier {n} (at {w or 'top level'}) is not available in optprune; it reads "
                          f"{', '.join(LLMC_MODIFIERS)}")
    if len(found) != 1:
        raise RecipeError(f"{path}: one pruning modifier per run, found {len(found)} "
                          f"({', '.join(n for n, _, _ in found)})")
    name, args, where = found[0]
    bad = [k for k in args if k not in _LLMC_MAPPED + _LLMC_NOT_APPLICABLE]
    if bad:
        raise RecipeError(f"{path}: {name} field {bad[0]!r} has no optprune counterpart (read: "
                          f"{', '.join(_LLMC_MAPPED)}; not applicable, recorded: {', '.join(_LLMC_NOT_APPLICABLE)})")
    kw = {"method": LLMC_MODIFIERS[name]}
    if "sparsity" in args:
        if not isinstance(args["sparsity"], (int, float)):
            raise RecipeError(f"{path}: {name}.sparsity must be one number (per-layer sparsity dicts are not read)")
        kw["sparsity"] = float(args["sparsity"])
    if "mask_structure" in args:
        kw["pattern"] = _pattern(args["mask_structure"])
    for k in ("targets", "ignore"):
        if args.get(k) is not None:
            v = args[k]
            kw[k] = [v] if isinstance(v, str) else list(v)
    if args.get("dampening_frac") is not None:
        kw["damp"] = float(args["dampening_frac"])
    info = {"kind": "llm-compressor recipe", "path": str(Path(str(path)).expanduser().resolve())
            if isinstance(path, (str, Path)) else str(path), "modifier": name, "at": where or "top level",
            "not_applicable": {k: args[k] for k in args if k in _LLMC_NOT_APPLICABLE}}
    return kw, info


# ---------------------------------------------------------------------------------------------- replay
def replay_kwargs(path) -> tuple[dict, dict]:
    """(prune keyword arguments, info) reproducing the run recorded in a ``run.json``."""
    rec = read_mapping(path)
    cfg, prot = rec.get("config"), rec.get("protocol")
    if rec.get("command") != "prune" or not isinstance(cfg, dict) or not isinstance(prot, dict):
        raise RecipeError(f"{path} is not the run.json of an optprune prune run")
    calib = prot.get("calibration")
    if calib in ("list of strings", "datasets.Dataset", "token ids"):
        raise RecipeError(f"{path}: the run was calibrated on in-memory {calib}, which a replay cannot re-read")
    kw = {k: cfg[k] for k in replay_keys() if k in cfg and cfg[k] is not None}  # (a structure only where it applied)
    if cfg.get("equal_widths"):
        kw["equal_widths"] = True
    if "pattern" in kw and cfg.get("structure") is not None:
        kw.pop("pattern")
    kw["protocol"] = prot.get("base")
    # the effective calibration: a named source is re-read from the recorded data dir; a file by its path
    src = calib
    path_ = prot.get("calibration_path")
    if calib not in (None, "self") and path_ and not (isinstance(path_, str) and path_.startswith("hub:")):
        from . import data as D
        if D.known_dataset(str(calib)) is None:
            src = path_
    kw["dataset"] = src
    for k in ("nsamples", "seqlen", "seed"):
        if prot.get(k) is not None:
            kw[k] = prot[k]
    if kw.get("evaluate", True):  # the evaluation settings only where the recorded run evaluated
        if prot.get("eval_seqlen") is not None:
            kw["eval_seqlen"] = prot["eval_seqlen"]
        if prot.get("eval_datasets"):
            kw["eval_datasets"] = list(prot["eval_datasets"])
        kw["eval_windows"] = 0 if prot.get("eval_windows") is None else prot["eval_windows"]
    bs = (rec.get("pipeline") or {}).get("batch_size")
    if bs:
        kw["batch_size"] = int(bs)
    info = {"kind": "replay", "path": str(Path(str(path)).expanduser().resolve()),
            "recorded_git_commit": (rec.get("versions") or {}).get("git_commit"),
            "recorded_calibration_sha256": (rec.get("calibration") or {}).get("sha256")}
    return kw, info
