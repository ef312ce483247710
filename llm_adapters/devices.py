"""Where a model's weights are: the one helper every runtime module asks."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_device", "parameter_devices", "resolve_device"]


def parameter_devices(model: nn.Module) -> set:
    """The set of devices holding the model's parameters (empty for a model without any)."""
    return {p.device for p in model.parameters()}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; CPU for a model without parameters."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def resolve_device(device, error: type = ValueError) -> torch.device:
    """The torch device named by ``device`` (None or empty: CUDA when available, else the CPU). An unknown name,
    or CUDA asked for on a machine without it, raises ``error`` with a one-line message."""
    name = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise error(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error("device 'cuda' asked for but CUDA is not available here")
    return dev
