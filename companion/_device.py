"""Where tensors go: one rule for the whole package.

An explicit device is checked (a one-line ``ValueError`` for a name torch does not know, or for a
GPU on a machine without CUDA); without one, CUDA when available, else the CPU. A model's device
is the device of its first parameter (the CPU for a model without parameters).
"""

from __future__ import annotations

import torch
from torch import nn


def resolve_device(device: str | torch.device | None = None, *, what: str = "device") -> torch.device:
    """``device`` checked, or the default one (CUDA when available, else the CPU).

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("banana")
    Traceback (most recent call last):
    ...
    ValueError: device 'banana' is not a torch device (cpu, cuda, cuda:1, ...)
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{what} {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{what} {str(device)!r} asks for a GPU, but CUDA is not available on this machine: use 'cpu'"
        )
    return resolved


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU when it has none)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def cuda_autocast_dtype() -> torch.dtype:
    """The mixed-precision dtype of this machine's GPU: bf16 where it has it natively (Ampere and
    newer), else float16."""
    try:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the keyword
        bf16 = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float16


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def device_constant(
    values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A vector kept on ``device``, built once (copying a new one to a GPU in every training
    step would make the host wait for the device); under :func:`torch.compile` a constant of
    the compiled graph.

    >>> device_constant((1.0, 2.0), torch.device("cpu"))
    tensor([1., 2.])
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (tuple(values), torch.device(device), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype).to(device)
    return _CONSTANTS[key]


def off_diagonal(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n, n)`` with 0 on the diagonal and 1 elsewhere, a :func:`device_constant`.

    >>> off_diagonal(2, torch.device("cpu"))
    tensor([[0., 1.],
            [1., 0.]])
    """
    values = tuple(float(i != j) for i in range(n) for j in range(n))
    return device_constant(values, device, dtype).view(n, n)
