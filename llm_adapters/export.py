"""Saving a pruned model for deployment: the output dtype and the on-disk format.

``save_model(model, out_dir, tokenizer=None, *, format="dense", dtype=torch.float32, layers=None, pattern=None,
**format_options)``

* **dtype**: the weights are written in ``dtype`` (:func:`resolve_dtype` turns ``"auto"`` into the input
  model's dtype, :func:`source_dtype`). Pruning itself solves in float32/float64 whatever the output dtype; the
  model in memory is not converted (a cast copy of the state dict is written).
* **format**: one :class:`SaveFormat` per on-disk format, each in its own module that registers itself
  (:func:`register_format`):

  - ``dense`` (here): a stock ``save_pretrained`` directory, no ``sparsity_config``; the newest transformers,
    vLLM, llm-compressor and every tool that reads a Hugging Face checkpoint load it;
  - ``gguf`` (:mod:`.export_gguf`): one GGUF file (weights, tokenizer, chat template, metadata) for llama.cpp,
    Ollama and transformers' GGUF loader;
  - ``compressed-sparse-legacy`` (:mod:`.export_legacy_sparse`): the compressed-tensors sparse bitmask format,
    which only compressed-tensors ≤ 0.14 writes and reads (refused up front otherwise);
  - ``pack-quantized`` (:mod:`.export_quant`): quantized weights (``--quant``) in the current compressed-tensors
    format, which transformers loads and vLLM serves.

A format declares the options it reads (``gguf_type``), whether it can hold a structurally pruned (shrunk)
model, and a check run in the preflight — before any weight is read — that refuses what it cannot write in one
line (:class:`ExportError`). :func:`check_loaded` repeats the checks that need the loaded model (tensor names,
tokenizer) before pruning starts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .save_formats import (LOADING_FILE, ExportError, SaveFormat, cast_state_dict, detect_structure,  # noqa: F401
                           finish_hf_dir,
                           format_options, get_format, module_names, register_format, save_formats,
                           set_config_dtype, write_loading_note)

__all__ = ["SAVE_FORMATS", "DTYPES", "ExportError", "SaveFormat", "register_format", "save_formats", "get_format",
           "check_save_options", "check_loaded", "resolve_dtype", "source_dtype", "save_model", "dir_size_bytes",
           "detect_structure", "LOADING_FILE"]

DTYPES = ("auto", "float32", "float16", "bfloat16")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_save_options(format: str = "dense", dtype: Union[str, torch.dtype, None] = "auto", *,
                       structured: bool = False, model_type: Optional[str] = None, config: Optional[dict] = None,
                       quant=..., **options) -> None:
    """Preflight of the save options: unknown names, options the format does not read, a missing library,
    a model or combination the format cannot hold. ``model_type``/``config``: the model's ``config.json``
    (as a dict) when known. ``quant``: the run's ``--quant`` grid (None: none) when checking a prune before it
    starts; left out when saving a model that is already pruned."""
    fmt = get_format(format)
    if not isinstance(dtype, torch.dtype) and dtype is not None and str(dtype) not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    opts = format_options(fmt, options)
    if structured and not fmt.structured:
        raise ExportError(f"--save-format {fmt.name} cannot hold a structurally pruned model (its matrices are "
                          f"smaller, not sparse); use --save-format dense or gguf")
    if model_type is None and config:
        model_type = config.get("model_type")
    fmt.check(dtype=dtype, structured=structured, model_type=model_type, config=config, options=opts)
    if quant is not ...:
        fmt.check_quant(quant)


def check_loaded(model: nn.Module, tokenizer, format: str = "dense", **options) -> None:
    """The format's checks on the loaded model and tokenizer (before pruning)."""
    fmt = get_format(format)
    fmt.check_loaded(model, tokenizer, format_options(fmt, options))


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


@register_format
class DenseFormat(SaveFormat):
    name = "dense"
    summary = "stock save_pretrained directory (no sparsity_config): transformers, vLLM, llm-compressor load it"

    def write(self, model, out, tokenizer, *, dtype, layers, pattern, options):
        model.save_pretrained(str(out), state_dict=cast_state_dict(model, dtype))
        return {"format": "hf", "stock_loadable": True, "weights_bytes": finish_hf_dir(out, tokenizer, dtype)}

    def loading_note(self, info):
        return ("A Hugging Face checkpoint with the pruned weights stored densely (zeros included):\n\n"
                "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(\"this/folder\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"this/folder\")\n```\n\n"
                "vLLM (`vllm serve this/folder`), llm-compressor and `optprune eval --model this/folder` read it "
                "as it is.\n")


def save_model(model: nn.Module, out_dir: Union[str, os.PathLike], tokenizer=None, *, format: str = "dense",
               dtype: Union[str, torch.dtype] = torch.float32, layers: Optional[Iterable[str]] = None,
               pattern: Optional[str] = None, structured: bool = False, **options) -> dict:
    """Write ``model`` (+ ``tokenizer``) to ``out_dir`` in ``format`` and ``dtype``; returns what was written
    (format, dtype, bytes on disk and what the format adds). ``layers``: the pruned module names (default: every
    ``nn.Linear`` that has zeros); ``pattern``: the pruning pattern; ``options``: the format's options
    (``gguf_type=``). A :data:`LOADING_FILE` says how to load the output."""
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None
    check_save_options(format, dtype, structured=structured, config=config, **options)
    fmt = get_format(format)
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(dtype, source_dtype(model))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"path": str(out.resolve()), "save_format": format, "dtype": str(dtype).replace("torch.", "")}
    info.update(fmt.write(model, out, tokenizer, dtype=dtype, layers=layers, pattern=pattern,
                          options=format_options(fmt, options)))
    write_loading_note(out, fmt.loading_note(info))
    return info


def dir_size_bytes(path: Union[str, os.PathLike]) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


#: the save formats of the package, each in its own module that registers itself
from . import export_gguf, export_legacy_sparse, export_quant  # noqa: E402,F401
SAVE_FORMATS = save_formats()
