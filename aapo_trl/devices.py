"""Device placement for the CPU-only steps of the advantage computation (scikit-learn's K-Means, numpy).

TRL keeps every tensor of a batch on ``accelerator.device``. A step that can only run on the CPU
takes its tensor inputs there and must hand its tensor results back on the device those inputs came
from: otherwise the next op that meets the batch mixes two devices, which CUDA refuses ("Expected all
tensors to be on the same device"). Every such round trip in aapo-trl goes through :func:`run_on_cpu`,
so the rule lives in one place; tests/test_devices.py runs every trainer's advantage step with the
batch on an emulated second device to check it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside tuples (named ones too), lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_tensors(item, fn) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    return value


def _tensors_in(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(value, lambda tensor: found.append(tensor) or tensor)
    return found


def run_on_cpu(func: Callable, *args, **kwargs):
    """``func(*args, **kwargs)`` on CPU copies of its tensor arguments, with its tensor results moved back.

    The results come back on the device the tensor arguments share (the accelerator during training),
    so they can meet the rest of the batch; with no tensor argument they stay on the CPU. Tensor
    arguments on several devices are an error: the caller has already mixed devices.
    """
    devices = {tensor.device for tensor in _tensors_in((args, kwargs))}
    if len(devices) > 1:
        name = getattr(func, "__name__", repr(func))
        raise ValueError(
            f"run_on_cpu({name}): the tensor arguments are on several devices ({sorted(map(str, devices))}); "
            "put them on one device first"
        )
    device = devices.pop() if devices else torch.device("cpu")
    result = func(*_map_tensors(args, torch.Tensor.cpu), **_map_tensors(kwargs, torch.Tensor.cpu))
    return _map_tensors(result, lambda tensor: tensor.to(device))
