"""What every op's boundary shares: why a backend cannot serve it, and gradient stand-ins."""

from __future__ import annotations

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
