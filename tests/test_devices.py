"""Where a model's weights are and which device a name means (``optprune.llm_adapters.devices``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from optprune.llm_adapters.devices import model_device, parameter_devices, resolve_device


def test_model_device_is_the_parameters_device_and_cpu_without_any():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert parameter_devices(nn.ReLU()) == set()
    assert parameter_devices(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == {torch.device("cpu")}


def test_resolve_device_names_and_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")

    class Refused(ValueError):
        pass

    with pytest.raises(Refused, match="unknown device 'warp'"):
        resolve_device("warp", Refused)
    if not torch.cuda.is_available():
        with pytest.raises(Refused, match="CUDA is not available"):
            resolve_device("cuda", Refused)
