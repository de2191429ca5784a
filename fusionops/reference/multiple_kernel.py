"""Multiple kernel fusion (DESIGN.md section 5) as plain torch ops: every base kernel's Gram
matrix computed separately, then summed (what MKL libraries do)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusionops.base_kernels import BaseKernel, KernelSpec, as_base_kernel, as_base_kernels


def base_kernel(a: Tensor, b: Tensor, kernel: KernelSpec) -> Tensor:
    """The Gram matrix ``k(a_i, b_j)`` of one base kernel, ``(N_a, N_b)`` for ``a (N_a, d)`` and
    ``b (N_b, d)``. RBF distances are ``max(‖a‖² + ‖b‖² - 2 a·b, 0)``: the expansion every fast
    implementation uses, clamped where rounding makes it negative."""
    k = kernel if isinstance(kernel, BaseKernel) else as_base_kernel("base_kernel", "kernel", kernel)
    gram = a @ b.transpose(-1, -2)
    if k.kind == "linear":
        return gram
    param = k.param(a.shape[-1])
    if k.kind == "rbf":
        sq_a = (a * a).sum(-1)
        sq_b = (b * b).sum(-1)
        dist = (sq_a[:, None] + sq_b[None, :] - 2 * gram).clamp_min(0)
        return torch.exp(-param * dist)
    return (gram + param) ** k.degree


def multiple_kernel(
    xs_a: Sequence[Tensor], xs_b: Sequence[Tensor], beta: Tensor, kernels: Sequence[KernelSpec]
) -> Tensor:
    """``K = Σ_m β_m k_m(xs_a[m], xs_b[m])``, ``(N_a, N_b)``. Holds each modality's Gram matrix."""
    specs = as_base_kernels("multiple_kernel", kernels, len(xs_a))
    total: Tensor | None = None
    for m, (a, b, k) in enumerate(zip(xs_a, xs_b, specs, strict=True)):
        term = beta[m] * base_kernel(a, b, k)
        total = term if total is None else total + term
    assert total is not None, "xs_a must hold at least one modality"
    return total
