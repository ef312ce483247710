"""Where a model's weights are: the one helper every runtime module asks."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_device", "parameter_devices"]


def parameter_devices(model: nn.Module) -> set:
    """The set of devices holding the model's parameters (empty for a model without any)."""
    return {p.device for p in model.parameters()}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; CPU for a model without parameters."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
