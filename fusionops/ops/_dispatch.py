"""What every op's boundary shares: why a backend cannot serve it, and gradient stand-ins."""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from fusionops._backend import common_reasons

# One CUDA C++ kernel of each op that has them (issue 7 adds them; csrc/cuda/): an extension
# built with CUDA from older sources lacks it.
CUDA_KERNELS = {
    "tensor_fusion": "_tf_projected_fwd_cuda",
    "low_rank_fusion": "_lmf_fwd_cuda",
    "product_fusion": "_product_fwd_cuda",
}

# The most modalities one launch of the CUDA kernels takes (kMaxModalities in
# csrc/cuda/kernels/common.h); an op's `_reasons` rules the cuda backend out for more.
CUDA_MAX_MODALITIES = 8


def cuda_modality_reasons(backend: str, modalities: int) -> list[str]:
    """Why ``backend`` cannot serve ``modalities`` modalities: the CUDA kernels take at most
    :data:`CUDA_MAX_MODALITIES` (empty: it can)."""
    if backend == "cuda" and modalities > CUDA_MAX_MODALITIES:
        return [
            f"the CUDA kernels take at most {CUDA_MAX_MODALITIES} modalities, got {modalities} "
            "(the triton and reference backends take any number)"
        ]
    return []


# Ops that have CUDA C++ kernels; the rest report why the cuda backend cannot serve them.
CUDA_KERNEL_OPS: frozenset[str] = frozenset(CUDA_KERNELS)


# One C++ kernel of each op: an extension built before the op existed lacks it.
CPU_KERNELS = {
    "tensor_fusion": "_tf_projected_fwd_cpu",
    "low_rank_fusion": "_lmf_fwd_cpu",
    "product_fusion": "_product_fwd_cpu",
    "skew_pair_attention": "_skew_pair_fwd_cpu",
    "multiple_kernel": "_mkl_fwd_cpu",
}


@functools.cache
def _extension_has(kernel: str) -> bool:
    return hasattr(torch.ops.fusionops, kernel)


def kernel_reasons(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot serve ``op`` on ``device``/``dtype`` (empty: it can)."""
    reasons = common_reasons(backend, device, dtype)
    if backend == "cpu" and not reasons and not _extension_has(CPU_KERNELS[op]):
        reasons.append(
            f"the compiled extension fusionops._C has no {op} kernels (built from older sources): "
            "rebuild it with pip install --no-build-isolation -e ."
        )
    if backend == "cuda" and device.type == "cuda" and op not in CUDA_KERNEL_OPS:
        reasons.append(f"CUDA C++ kernels for {op} are not implemented yet")
    elif backend == "cuda" and not reasons and not _extension_has(CUDA_KERNELS[op]):
        reasons.append(
            f"the compiled extension fusionops._C has no CUDA {op} kernels (built from older "
            "sources): rebuild it with FUSIONOPS_WITH_CUDA=1 pip install --no-build-isolation -e ."
        )
    return reasons


def compiled(kernel: str, device: str):
    """``torch.ops.fusionops._<kernel>_<device>``: a kernel of the compiled extension, C++
    (``device="cpu"``) or CUDA C++ (``"cuda"``, present only in CUDA builds; looked up on call)."""
    return getattr(torch.ops.fusionops, f"_{kernel}_{device}")


def empty_grad(like: Tensor) -> Tensor:
    """Stand-in for a gradient that was not asked for (custom ops cannot return None)."""
    return like.new_empty(0)


def fused_kernels(
    op: str, backend: str, cpu: object, triton_module: str, cuda: object | None = None
) -> object:
    """The kernels serving ``backend``: ``cpu`` (the C++ wrappers), ``cuda`` (the CUDA C++
    wrappers, for the ops that have them) or the Triton module ``fusionops.triton.<triton_module>``
    (imported on first use: triton is optional)."""
    if backend == "cpu":
        return cpu
    if backend == "cuda" and cuda is not None:
        return cuda
    if backend == "triton":
        return importlib.import_module(f"fusionops.triton.{triton_module}")
    expected = "'cpu', 'cuda' or 'triton'" if cuda is not None else "'cpu' or 'triton'"
    raise ValueError(
        f"{op}: backend {backend!r} has no fused kernels for this op "
        f"(the reference is served by fusionops.reference; expected {expected})"
    )


def size_order(device: torch.device, elements: int, cpu_min_elements: int) -> tuple[str, ...] | None:
    """Shape-aware automatic order: on CPU, problems below ``cpu_min_elements`` go to the
    reference first (measured faster there); None keeps the device's default order."""
    if device.type == "cpu" and elements < cpu_min_elements:
        return ("reference", "cpu")
    return None
