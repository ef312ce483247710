"""``--save-format compressed-sparse-legacy``: the compressed-tensors sparse bitmask checkpoint (legacy).

The library's own :class:`compressed_tensors.ModelCompressor` compresses the state dict and writes the
``quantization_config`` / ``sparsity_config`` block of ``config.json``: ``sparse-24-bitmask`` when every pruned
layer is 2:4 along its input dimension, ``sparse-bitmask`` otherwise. ``targets`` are the module classes of the
pruned layers (``Linear``), ``ignore`` names the modules of those classes that were not pruned (``lm_head``,
layers left out by ``--targets/--ignore``), ``sparsity_structure`` is ``"2:4"`` / the N:M pattern /
``"unstructured"``, ``global_sparsity`` the fraction of zeros over the pruned layers. :func:`load_compressed`
reads such a directory back through the same library (decompressed, dense weights).

**Legacy.** The sparse compressors exist in compressed-tensors up to 0.14.0.1 only: 0.15 removed them, current
transformers requires compressed-tensors ≥ 0.15 to read any ``quantization_config`` of this kind (and refuses a
``sparsity_config``), and vLLM ≥ 0.24 refuses a checkpoint that carries one. The format is therefore written only
when compressed-tensors ≤ 0.14 is installed (``pip install --no-deps 'compressed-tensors==0.14.0.1'``, in an
environment of its own), and refused up front otherwise; optprune reads it back through the same library.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .save_formats import (ExportError, SaveFormat, cast_state_dict, detect_structure, module_names,
                           finish_hf_dir, register_format)

__all__ = ["LEGACY_INSTALL", "sparse_compressors_available", "is_compressed_dir", "load_compressed"]

LEGACY_INSTALL = "pip install --no-deps 'compressed-tensors==0.14.0.1'"


def sparse_compressors_available() -> Optional[str]:
    """None when compressed-tensors with the sparse bitmask compressors is importable, else the reason."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import BaseCompressor
    except ImportError as e:
        return (f"--save-format compressed-sparse-legacy needs compressed-tensors 0.14 ({LEGACY_INSTALL}, in an "
                f"environment of its own; {e})")
    names = set(BaseCompressor.registered_names())
    missing = {"sparse-bitmask", "sparse-24-bitmask"} - names
    if missing:
        return (f"compressed-tensors {compressed_tensors.__version__} has no {', '.join(sorted(missing))} "
                f"compressor (removed in 0.15; the legacy format needs {LEGACY_INSTALL})")
    return None


def _sparsity_config(model: nn.Module, names: list, pattern: Optional[str]):
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


@register_format
class LegacySparseFormat(SaveFormat):
    name = "compressed-sparse-legacy"
    summary = ("legacy compressed-tensors sparse bitmask (needs compressed-tensors<=0.14; current transformers "
               "and vLLM do not load it)")
    structured = False

    def unavailable(self):
        return sparse_compressors_available()

    def write(self, model, out, tokenizer, *, dtype, layers, pattern, options):
        from compressed_tensors import ModelCompressor
        scfg = _sparsity_config(model, module_names(model, layers), pattern)
        compressor = ModelCompressor(sparsity_config=scfg)
        compressed = compressor.compress(model, state_dict=cast_state_dict(model, dtype))
        model.save_pretrained(str(out), state_dict=compressed)
        compressor.update_config(str(out))
        return {"format": "compressed-tensors (sparse, legacy)", "stock_loadable": False,
                "sparsity_config": scfg.model_dump(), "weights_bytes": finish_hf_dir(out, tokenizer, dtype)}

    def loading_note(self, info):
        return ("A compressed-tensors **sparse bitmask** checkpoint (legacy format): the pruned layers hold a "
                "bitmask and their nonzero values.\n\n"
                "* Loads with compressed-tensors 0.14.x (`" + LEGACY_INSTALL + "`) and "
                "`optprune eval --model this/folder` / `optprune.llm_adapters.export_legacy_sparse."
                "load_compressed(\"this/folder\")` in that environment (decompressed to dense weights).\n"
                "* Does **not** load with compressed-tensors ≥ 0.15, with current transformers (it requires "
                "compressed-tensors ≥ 0.15, which has no sparse compressors) or with vLLM ≥ 0.24 (refuses a "
                "`sparsity_config`).\n* For those tools, save the same model with `--save-format dense`.\n")


def is_compressed_dir(path: Union[str, os.PathLike]) -> bool:
    cfg = Path(path) / "config.json"
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return q.get("quant_method") == "compressed-tensors" and bool(q.get("sparsity_config"))


def load_compressed(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A model written with ``format="compressed-sparse-legacy"``, decompressed by compressed-tensors into dense
    weights."""
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
