"""Saving a quantized model (``--quant``) in the compressed-tensors ``pack-quantized`` format.

``--save-format pack-quantized`` writes what llm-compressor writes for its W4A16 / W8A16 schemes and what
stock transformers loads (``AutoModelForCausalLM.from_pretrained``) and vLLM serves: every quantized
``nn.Linear`` stores its integer codes packed into int32 words (``weight_packed``), its scales
(``weight_scale``, one per output channel or per group of inputs) and its shape; ``config.json`` gets the
``quantization_config`` block (``config_groups`` with the grid's bits, strategy ``channel``/``group`` and
group size; ``ignore``: the linear layers that were not quantized, e.g. ``lm_head``). A mixed-precision model
(``--allocation`` with ``--quant``) gets one config group per grid, each naming its layers.

The library writes it (current compressed-tensors release): the grid of each layer is attached to a copy of
the model as a compressed-tensors ``QuantizationScheme`` (``apply_quantization_config``), its scales are our
scales (formulations/grid.py, already rounded to the model dtype by the solver), and ``ModelCompressor``
packs the codes ``round(W / s)``: since our weights are on that grid, the codes are ours and the dequantized
weights the server computes, ``s · q``, are our weights. Pruned weights are code 0, so a sparse + quantized
model is saved the same way (the zeros are in the packed codes).

Asymmetric grids (``w4g128a``) are refused: compressed-tensors 0.20 writes their packed zero points, but its
transformers loader initialises them unpacked and the reload fails with a size mismatch.
"""
from __future__ import annotations

import copy
import os
from typing import Optional, Union

import torch
from torch import nn

from .save_formats import ExportError, SaveFormat, finish_hf_dir, register_format

__all__ = ["PackQuantizedError", "PACK_FORMAT", "pack_quantized_available", "check_pack_quantized", "save_pack_quantized",
           "quantized_modules", "dequantized_weight"]

PACK_FORMAT = "pack-quantized"


class PackQuantizedError(ExportError):
    """Bad options for the pack-quantized format (one line; raised before anything is written)."""

CT_INSTALL_NEW = "pip install -c constraints.txt 'compressed-tensors>=0.20'"


def pack_quantized_available() -> Optional[str]:
    """None when compressed-tensors with the pack-quantized compressor and its lifecycle API imports, else why."""
    try:
        import compressed_tensors
        from compressed_tensors import ModelCompressor  # noqa: F401
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import apply_quantization_config  # noqa: F401
    except ImportError as e:
        return f"--save-format {PACK_FORMAT} needs a current compressed-tensors ({CT_INSTALL_NEW}; {e})"
    if PACK_FORMAT not in set(BaseCompressor.registered_names()):
        return (f"compressed-tensors {compressed_tensors.__version__} has no {PACK_FORMAT} compressor; "
                f"{CT_INSTALL_NEW}")
    if not hasattr(BaseCompressor, "compress_module"):
        return (f"compressed-tensors {compressed_tensors.__version__} predates the per-module compressors "
                f"this exporter uses; {CT_INSTALL_NEW}")
    return None


def check_pack_quantized(quant: Optional[str], *, structured: bool = False) -> None:
    """Preflight of ``--save-format pack-quantized``: a symmetric ``--quant`` grid and the library."""
    from ..formulations.grid import parse_grid
    if structured:
        raise PackQuantizedError(f"--save-format {PACK_FORMAT} stores quantized weights; structured methods save a "
                          f"smaller dense model (use --save-format dense)")
    if quant is None:
        raise PackQuantizedError(f"--save-format {PACK_FORMAT} stores weights on a quantization grid: give --quant "
                          f"(e.g. w4g128) with a quantizing method (gptq, rtn, sparsegpt, quant-refit)")
    if not parse_grid(quant).symmetric:
        raise PackQuantizedError(f"--save-format {PACK_FORMAT} takes symmetric grids (w4, w4g128, w8...): compressed-"
                          f"tensors' transformers loader cannot reload asymmetric zero points; use "
                          f"{quant[:-1]} or --save-format dense")
    why = pack_quantized_available()
    if why:
        raise PackQuantizedError(why)


def quantized_modules(model: nn.Module) -> dict:
    """Module name → the grid (:class:`~optprune.formulations.grid.Quantizer`) the prune left on it."""
    return {n: m.optprune_quant for n, m in model.named_modules() if getattr(m, "optprune_quant", None) is not None}


def save_pack_quantized(model: nn.Module, out: Union[str, os.PathLike], dtype: torch.dtype) -> dict:
    """Write ``model`` (a copy of it, cast to ``dtype``) to ``out`` in the pack-quantized format; returns the
    quantization config written. The model in memory is not changed."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    grids = quantized_modules(model)
    if not grids:
        raise PackQuantizedError(f"--save-format {PACK_FORMAT}: no layer carries a quantization grid (prune with --quant)")
    by_spec: dict = {}
    for n, g in grids.items():
        by_spec.setdefault(g.spec, []).append(n)
    bad = sorted(s.name for s in by_spec if not s.symmetric)
    if bad:
        raise PackQuantizedError(f"--save-format {PACK_FORMAT} takes symmetric grids, got {', '.join(bad)}")
    mods = dict(model.named_modules())
    bad = [n for n in grids if not isinstance(mods[n], nn.Linear)]
    if bad:
        # nn.Embedding too would be packed by compressed-tensors 0.20, but transformers 5.25 cannot load it back
        # (its weight initialisation asks the replaced module for a ``weight``): docs/deployment.md
        raise PackQuantizedError(f"--save-format {PACK_FORMAT} stores nn.Linear weights; {bad[0]} is "
                                 f"{type(mods[bad[0]]).__name__}")
    groups = {}
    for i, (spec, names) in enumerate(sorted(by_spec.items(), key=lambda kv: (kv[0].bits, kv[0].group or 0))):
        args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=True,
                                strategy="channel" if spec.group is None else "group", group_size=spec.group)
        # one grid: every quantized Linear; mixed precision: one group per grid, naming its layers
        groups[f"group_{i}"] = QuantizationScheme(targets=["Linear"] if len(by_spec) == 1 else sorted(names),
                                                  weights=args)
    ignore = [n for n, m in mods.items() if isinstance(m, nn.Linear) and n not in grids]
    qcfg = QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status="frozen", format=PACK_FORMAT)
    work = copy.deepcopy(model).to(dtype)
    for m in work.modules():
        if hasattr(m, "optprune_quant"):
            del m.optprune_quant  # plain attributes: not in the saved state either way
    apply_quantization_config(work, qcfg)
    wmods = dict(work.named_modules())
    with torch.no_grad():
        for n, qz in grids.items():
            m = wmods[n]
            if tuple(m.weight_scale.shape) != tuple(qz.scale.shape):
                raise PackQuantizedError(f"layer {n}: scales of shape {tuple(qz.scale.shape)}, the format expects "
                                  f"{tuple(m.weight_scale.shape)}")
            m.weight_scale.copy_(qz.scale.to(m.weight_scale.dtype))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(work, PACK_FORMAT)
    compressor.compress_model(work)
    compressor.remove_decompression_hook(work)
    work.save_pretrained(str(out))
    compressor.update_config(str(out))
    return compressor.quantization_config.model_dump(exclude=["quant_method"])


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a loaded pack-quantized ``nn.Linear`` computes with (``s · q``), in float32."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.utils import get_direct_state_dict
    if hasattr(module, "weight") and not hasattr(module, "weight_packed"):
        return module.weight.detach().float()
    comp = BaseCompressor.get_value_from_registry(PACK_FORMAT)
    sd = comp.decompress(get_direct_state_dict(module), module.quantization_scheme)
    return sd["weight"].detach().float()



@register_format
class PackQuantizedFormat(SaveFormat):
    name = PACK_FORMAT
    summary = ("compressed-tensors pack-quantized (W4A16/W8A16, channel or group scales, needs --quant): "
               "transformers and vLLM load it")
    structured = False
    error = PackQuantizedError

    def unavailable(self):
        return pack_quantized_available()

    def check_quant(self, quant):
        check_pack_quantized(quant)

    def write(self, model, out, tokenizer, *, dtype, layers, pattern, options):
        qcfg = save_pack_quantized(model, out, dtype)
        return {"format": "hf", "stock_loadable": True, "quantization_config": qcfg,
                "weights_bytes": finish_hf_dir(out, tokenizer, dtype)}

    def loading_note(self, info):
        return ("A Hugging Face checkpoint in compressed-tensors' `pack-quantized` format (integer codes packed "
                "into int32 words, one scale per channel or group):\n\n"
                "```python\nfrom transformers import AutoModelForCausalLM\n"
                "model = AutoModelForCausalLM.from_pretrained(\"this/folder\")  # needs compressed-tensors>=0.20\n"
                "```\n\nvLLM serves it (`vllm serve this/folder`); `optprune eval --model this/folder` reads it.\n")
