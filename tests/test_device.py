"""companion._device: one rule for where tensors go."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from companion._device import module_device, resolve_device


def test_explicit_devices_are_checked_and_the_default_follows_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ValueError, match="map_location 'cuda:1' asks for a GPU, but CUDA is not available"):
        resolve_device("cuda:1", what="map_location")
    with pytest.raises(ValueError, match="device 'gpu0' is not a torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")


def test_a_module_is_where_its_first_parameter_is():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")  # no parameters
    meta = nn.Linear(2, 2, device="meta")
    assert module_device(meta) == torch.device("meta")
