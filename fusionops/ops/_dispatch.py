"""What every op's boundary shares: why a backend cannot serve it, and gradient stand-ins."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from fusionops._backend import common_reasons

# Ops that have CUDA C++ kernels (issue 7 adds them); the rest report why the cuda backend cannot
# serve them.
CUDA_KERNEL_OPS: frozenset[str] = frozenset()


def kernel_reasons(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot serve ``op`` on ``device``/``dtype`` (empty: it can)."""
    reasons = common_reasons(backend, device, dtype)
    if backend == "cuda" and device.type == "cuda" and op not in CUDA_KERNEL_OPS:
        reasons.append(f"CUDA C++ kernels for {op} are not implemented yet")
    return reasons


def empty_grad(like: Tensor) -> Tensor:
    """Stand-in for a gradient that was not asked for (custom ops cannot return None)."""
    return like.new_empty(0)


def fused_kernels(op: str, backend: str, cpu: object, triton_module: str) -> object:
    """The kernels serving ``backend``: ``cpu`` (the C++ wrappers) or the Triton module
    ``fusionops.triton.<triton_module>`` (imported on first use: triton is optional)."""
    if backend == "cpu":
        return cpu
    if backend == "triton":
        return importlib.import_module(f"fusionops.triton.{triton_module}")
    raise ValueError(
        f"{op}: backend {backend!r} has no fused kernels for this op "
        "(the reference is served by fusionops.reference; expected 'cpu' or 'triton')"
    )


def size_order(device: torch.device, elements: int, cpu_min_elements: int) -> tuple[str, ...] | None:
    """Shape-aware automatic order: on CPU, problems below ``cpu_min_elements`` go to the
    reference first (measured faster there); None keeps the device's default order."""
    if device.type == "cpu" and elements < cpu_min_elements:
        return ("reference", "cpu")
    return None
