"""Saving a pruned model for deployment: the output dtype and the on-disk format.

``save_model(model, out_dir, tokenizer=None, *, format="dense", dtype=torch.float32, layers=None, pattern=None)``

* **dtype**: the weights are written in ``dtype`` (:func:`resolve_dtype` turns ``"auto"`` into the input
  model's dtype, :func:`source_dtype`). Pruning itself solves in float32/float64 whatever the output dtype; the
  model in memory is not converted (a cast copy of the state dict is written).
* **format** ``"dense"``: a stock ``save_pretrained`` directory.
* **format** ``"compressed"``: the compressed-tensors format that llm-compressor writes and vLLM reads. The
  library's own :class:`compressed_tensors.ModelCompressor` compresses the state dict and writes the
  ``quantization_config`` / ``sparsity_config`` block of ``config.json``: ``sparse-24-bitmask`` when every
  pruned layer is 2:4 along its input dimension, ``sparse-bitmask`` otherwise. ``targets`` are the module
  classes of the pruned layers (``Linear``), ``ignore`` names the modules of those classes that were not pruned
  (``lm_head``, layers left out by ``--targets/--ignore``), ``sparsity_structure`` is ``"2:4"`` / the N:M
  pattern / ``"unstructured"``, ``global_sparsity`` the fraction of zeros over the pruned layers.
  :func:`load_compressed` reads such a directory back through the same library (decompressed, dense weights).

The sparse compressors live in compressed-tensors up to 0.14 (0.15+ keep only the config classes); with a newer
version the compressed format is refused up front (:func:`check_save_options`) with the install line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

__all__ = ["SAVE_FORMATS", "DTYPES", "ExportError", "check_save_options", "resolve_dtype", "source_dtype",
           "save_model", "load_compressed", "is_compressed_dir", "sparse_compressors_available", "dir_size_bytes",
           "detect_structure"]

SAVE_FORMATS = ("dense", "compressed", "pack-quantized")  # pack-quantized: export_quant.py
DTYPES = ("auto", "float32", "float16", "bfloat16")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CT_INSTALL = "pip install --no-deps 'compressed-tensors==0.14.0.1'"


class ExportError(ValueError):
    """Bad save options (one line; raised before anything is written)."""


def sparse_compressors_available() -> Optional[str]:
    """None when compressed-tensors with the sparse bitmask compressors is importable, else the reason."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import BaseCompressor
    except ImportError as e:
        return f"the compressed format needs compressed-tensors ({CT_INSTALL}; {e})"
    names = set(BaseCompressor.registered_names())
    missing = {"sparse-bitmask", "sparse-24-bitmask"} - names
    if missing:
        return (f"compressed-tensors {compressed_tensors.__version__} has no {', '.join(sorted(missing))} "
                f"compressor (removed in 0.15); {CT_INSTALL}")
    return None


def check_save_options(format: str = "dense", dtype: Union[str, torch.dtype, None] = "auto", *,
                       structured: bool = False, quant: Optional[str] = None) -> None:
    """Preflight of the save options: unknown names, a missing library, combinations that cannot be saved."""
    if format not in SAVE_FORMATS:
        raise ExportError(f"unknown save format {format!r}; choose from {', '.join(SAVE_FORMATS)}")
    if not isinstance(dtype, torch.dtype) and dtype is not None and str(dtype) not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if format == "pack-quantized":
        from .export_quant import check_pack_quantized
        check_pack_quantized(quant, structured=structured)
    if format == "compressed":
        if structured:
            raise ExportError("--save-format compressed stores sparse masks; structured methods save a smaller "
                              "dense model (use --save-format dense)")
        why = sparse_compressors_available()
        if why:
            raise ExportError(why)


def source_dtype(model, meta: Optional[dict] = None) -> torch.dtype:
    """The dtype of the model as given: ``dtype``/``torch_dtype`` in the source directory's ``config.json``;
    float32 for a GGUF file (dequantized) or a config that names none; an in-memory model's own dtype when
    ``meta`` is None."""
    if meta is None:
        return next(model.parameters()).dtype
    if "gguf" in str(meta.get("format", "")):
        return torch.float32
    src = meta.get("source")
    if src and not str(src).startswith("hub:"):
        cfg = Path(str(src)) / "config.json"
        try:
            d = json.loads(cfg.read_text()) if cfg.is_file() else {}
        except (OSError, ValueError):
            d = {}
        name = d.get("dtype") or d.get("torch_dtype")
        if isinstance(name, str) and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        return torch.float32
    name = getattr(getattr(model, "config", None), "dtype", None)  # hub: transformers keeps the checkpoint's
    return name if isinstance(name, torch.dtype) else torch.float32


def resolve_dtype(dtype: Union[str, torch.dtype, None], source: torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return source
    if dtype not in _TORCH_DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return _TORCH_DTYPES[dtype]


def detect_structure(weights: Iterable[torch.Tensor]) -> str:
    """``"2:4"`` when every matrix keeps at most 2 of each 4 consecutive inputs (rows of ``W`` (out, in)),
    ``"unstructured"`` otherwise."""
    seen = False
    for W in weights:
        seen = True
        if W.dim() != 2 or W.shape[1] % 4:
            return "unstructured"
        if int((W.reshape(-1, 4) != 0).sum(1).max()) > 2:
            return "unstructured"
    return "2:4" if seen else "unstructured"


def _module_names(model: nn.Module, layers: Optional[Iterable[str]]) -> list[str]:
    mods = dict(model.named_modules())
    if layers is None:  # every nn.Linear with at least one zero weight
        return [n for n, m in mods.items() if isinstance(m, nn.Linear) and bool((m.weight == 0).any())]
    names = list(dict.fromkeys(layers))
    bad = [n for n in names if n not in mods]
    if bad:
        raise ExportError(f"save: no module named {bad[0]!r} in the model")
    return names


def _cast_state_dict(model: nn.Module, dtype: torch.dtype) -> dict:
    """The state dict in ``dtype``; tensors that share storage (tied embeddings) stay shared, so that
    ``save_pretrained`` writes them once."""
    out, done = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key not in done:
            done[key] = v.detach().to(dtype) if v.is_floating_point() else v.detach()
        out[k] = done[key]
    return out


def _sparsity_config(model: nn.Module, names: list[str], pattern: Optional[str]):
    from compressed_tensors.config import SparsityCompressionConfig
    mods = dict(model.named_modules())
    if not names:
        raise ExportError("save: no pruned layer to compress (no linear layer has zero weights)")
    nonlinear = sorted({type(mods[n]).__name__ for n in names if not isinstance(mods[n], nn.Linear)})
    if nonlinear:
        raise ExportError(f"the compressed format stores nn.Linear weights; these pruned layers are "
                          f"{', '.join(nonlinear)} (use --save-format dense)")
    structure = detect_structure(mods[n].weight for n in names)
    fmt = "sparse-24-bitmask" if structure == "2:4" else "sparse-bitmask"
    if structure != "2:4" and pattern and ":" in str(pattern):  # another N:M pattern (e.g. 4:8)
        structure = str(pattern)
    chosen = set(names)
    ignore = [n for n, m in mods.items() if isinstance(m, nn.Linear) and n not in chosen]
    total = sum(mods[n].weight.numel() for n in names)
    zeros = sum(int((mods[n].weight == 0).sum()) for n in names)
    return SparsityCompressionConfig.load_from_registry(
        fmt, targets=["Linear"], ignore=ignore, global_sparsity=zeros / total, sparsity_structure=structure)


def _set_config_dtype(out: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` names the dtype of the model in memory; the file holds ``dtype``."""
    f = out / "config.json"
    d = json.loads(f.read_text())
    d["dtype"] = str(dtype).replace("torch.", "")
    f.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def save_model(model: nn.Module, out_dir: Union[str, os.PathLike], tokenizer=None, *, format: str = "dense",
               dtype: Union[str, torch.dtype] = torch.float32, layers: Optional[Iterable[str]] = None,
               pattern: Optional[str] = None) -> dict:
    """Write ``model`` (+ ``tokenizer``) to ``out_dir`` in ``format`` and ``dtype``; returns what was written
    (format, dtype, bytes on disk, and for the compressed format the sparsity config). ``layers``: the pruned
    module names (default: every ``nn.Linear`` that has zeros); ``pattern``: the pruning pattern, recorded as the
    ``sparsity_structure`` of an N:M mask other than 2:4."""
    if format == "pack-quantized":
        from .export_quant import pack_quantized_available
        why = pack_quantized_available()
        if why:
            raise ExportError(why)
    else:
        check_save_options(format, dtype)
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(dtype, source_dtype(model))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"path": str(out.resolve()), "save_format": format, "dtype": str(dtype).replace("torch.", "")}
    sd = _cast_state_dict(model, dtype)
    if format == "dense":
        model.save_pretrained(str(out), state_dict=sd)
        _set_config_dtype(out, dtype)
    elif format == "pack-quantized":
        from .export_quant import save_pack_quantized
        del sd
        info["quantization_config"] = save_pack_quantized(model, out, dtype)
        _set_config_dtype(out, dtype)
    else:
        from compressed_tensors import ModelCompressor
        names = _module_names(model, layers)
        scfg = _sparsity_config(model, names, pattern)
        compressor = ModelCompressor(sparsity_config=scfg)
        compressed = compressor.compress(model, state_dict=sd)
        model.save_pretrained(str(out), state_dict=compressed)
        _set_config_dtype(out, dtype)
        compressor.update_config(str(out))
        info["sparsity_config"] = scfg.model_dump()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    info["weights_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return info


def is_compressed_dir(path: Union[str, os.PathLike]) -> bool:
    cfg = Path(path) / "config.json"
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return q.get("quant_method") == "compressed-tensors" and bool(q.get("sparsity_config"))


def load_compressed(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A model written with ``format="compressed"``, decompressed by compressed-tensors into dense weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    why = sparse_compressors_available()
    if why:
        raise ExportError(why)
    from compressed_tensors import ModelCompressor
    path = str(path)
    cfg = AutoConfig.from_pretrained(path)
    compressor = ModelCompressor.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
    stored = getattr(cfg, "dtype", None)
    dtype = dtype or (stored if isinstance(stored, torch.dtype) else torch.float32)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    compressor.decompress(path, model)
    model.tie_weights()
    return model.eval()


def dir_size_bytes(path: Union[str, os.PathLike]) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
