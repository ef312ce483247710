"""A 2:4 output made fast on an NVIDIA GPU: torchao's semi-structured sparse kernels.

``accelerate_2of4(model, kind="plain")`` converts, in place, every linear layer of the blocks whose weight is 2:4
along its input dimension (at most 2 nonzeros in each 4 consecutive inputs — what ``--pattern 2:4`` leaves) to
torchao's semi-structured sparse layout (cuSPARSELt / CUTLASS kernels, compute capability ≥ 8.0):

* ``plain``: ``torchao.sparsity.sparsify_(model, semi_sparse_weight())`` — fp16/bf16 weights, 2:4 compressed;
* ``int8``: ``quantize_(model, Int8DynamicActivationInt8WeightConfig(layout=SemiSparseLayout()))`` — int8
  weights and dynamically quantized int8 activations on the 2:4 kernels;
* ``int4``: ``quantize_(model, Int4WeightOnlyConfig(layout=MarlinSparseLayout()))`` — int4 weights (Marlin 2:4
  kernels; fp16 models).

Layers that are not 2:4 (``lm_head``, layers left out by ``--ignore``) are left as they are. Without CUDA or
without torchao the call is refused in one line (:class:`ExportError`), before the model is touched.
"""
from __future__ import annotations

from torch import nn

from .save_formats import ExportError, detect_structure

__all__ = ["KINDS", "check_accelerate", "accelerate_2of4"]

KINDS = ("plain", "int8", "int4")
_INSTALL = "pip install torchao (the gpu extra)"


def check_accelerate(kind: str = "plain") -> None:
    """Refuse (one line) what :func:`accelerate_2of4` cannot do here: an unknown kind, no CUDA, no torchao."""
    import torch
    if kind not in KINDS:
        raise ExportError(f"unknown 2:4 acceleration {kind!r}; choose from {', '.join(KINDS)}")
    if not torch.cuda.is_available():
        raise ExportError("2:4 acceleration runs torchao's semi-structured sparse kernels on an NVIDIA GPU "
                          "(compute capability ≥ 8.0); this machine has no CUDA device")
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ExportError(f"2:4 acceleration needs torchao ({_INSTALL}; {e})") from None


def _two_four_linears(model: nn.Module) -> list:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{n}" and detect_structure([m.weight]) == "2:4"]


def accelerate_2of4(model: nn.Module, kind: str = "plain") -> list:
    """Convert the 2:4 linear layers of ``model`` (on a CUDA device, fp16/bf16) in place; returns their names."""
    check_accelerate(kind)
    names = set(_two_four_linears(model))
    if not names:
        raise ExportError("2:4 acceleration: no linear layer of the model is 2:4 (prune with --pattern 2:4)")

    def only_24(module: nn.Module, fqn: str) -> bool:
        return fqn in names

    if kind == "plain":
        from torchao.sparsity import semi_sparse_weight, sparsify_
        sparsify_(model, semi_sparse_weight(), filter_fn=only_24)
    else:
        from torchao.quantization import quantize_
        if kind == "int8":
            from torchao.dtypes import SemiSparseLayout
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig
            cfg = Int8DynamicActivationInt8WeightConfig(layout=SemiSparseLayout())
        else:
            from torchao.dtypes import MarlinSparseLayout
            from torchao.quantization import Int4WeightOnlyConfig
            cfg = Int4WeightOnlyConfig(layout=MarlinSparseLayout())
        quantize_(model, cfg, filter_fn=only_24)
    return sorted(names)
