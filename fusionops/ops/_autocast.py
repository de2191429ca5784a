"""Autocast for the fused ops: the output dtype follows the op's rule, never the backend.

Under ``torch.autocast(device, dtype)`` an op registered with ``autocast="lower"`` (the
GEMM-like ones: projected tensor fusion, low-rank fusion, skew-pair attention) casts its
floating inputs to the autocast dtype, as ``nn.Linear`` does (float64 stays float64, as in
ATen's autocast), and an op with ``autocast="keep"`` runs in its inputs' dtype (elementwise and
distance ops, as ATen keeps ``mul`` and ``cdist``). Either way the op then runs with autocast
off, so the reference does not re-cast inside and every backend returns the same dtype.

The same rule is registered for the custom ops themselves (``torch.ops.fusionops.*`` under
the AutocastCPU / AutocastCUDA dispatch keys), so a direct call or a traced graph gets it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def enabled(device: torch.device) -> bool:
    return device.type in _KEYS and torch.is_autocast_enabled(device.type)


def cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (lists included) cast to ``dtype``; float64
    tensors and everything else unchanged."""
    if isinstance(value, Tensor):
        if value.is_floating_point() and value.dtype != torch.float64 and value.dtype != dtype:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(cast(v, dtype) for v in value)
    return value


def call_without_autocast(
    rule: str, device: torch.device, fn: Callable[..., Tensor], *args: Any, **kwargs: Any
) -> Tensor:
    """``fn(*args, **kwargs)`` with autocast off, the tensors first cast by ``rule``."""
    if rule == "lower":
        dtype = torch.get_autocast_dtype(device.type)
        args = tuple(cast(a, dtype) for a in args)
        kwargs = {k: cast(v, dtype) for k, v in kwargs.items()}
    with torch.autocast(device.type, enabled=False):
        return fn(*args, **kwargs)


_lib: torch.library.Library | None = None


def register(qualname: str, rule: str) -> None:
    """Register ``rule`` for the custom op ``fusionops::<qualname>`` under both autocast keys."""
    global _lib
    if _lib is None:
        _lib = torch.library.Library("fusionops", "IMPL")
    op = getattr(torch.ops.fusionops, qualname).default
    for device_type, key in _KEYS.items():

        def kernel(*args: Any, _device_type: str = device_type, _key: str = key) -> Any:
            keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _key))
            with torch._C._ExcludeDispatchKeyGuard(keys):
                if rule == "lower":
                    dtype = torch.get_autocast_dtype(_device_type)
                    args = tuple(cast(a, dtype) for a in args)
                return op(*args)

        _lib.impl(qualname, kernel, key)
