"""Product fusion op (DESIGN.md section 3): checks, backend choice, autograd, fake kernels.

``fusionops::product_fusion(xs, backend) -> p`` and its backward op carry the fused
implementations (one kernel per direction for any M); the ``reference`` backend is served by
``fusionops.reference`` directly, with PyTorch's own autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from fusionops import reference
from fusionops._backend import choose
from fusionops._checks import check_modalities
from fusionops.ops._dispatch import CUDA_MAX_MODALITIES as CUDA_MAX_MODALITIES  # re-exported
from fusionops.ops._dispatch import compiled, cuda_modality_reasons, fused_kernels, kernel_reasons, size_order
from fusionops.ops._kernels import ProductFusionKernels

OP = "product_fusion"

# Automatic choice on CPU: the fused kernel replaces the reference's M - 1 passes over memory
# by one, so it wins from three modalities and N * d >= 2^20 elements. With two modalities
# both are one multiply at memory speed and ATen's was never beaten (best 0.96x), so two
# modalities always go to the reference unless a backend is forced.
# `python -m benchmarks.crossover --op product_fusion` (CSV in benchmarks/results/).
CPU_FUSED_MIN_ELEMENTS = 1 << 20
CPU_FUSED_MIN_MODALITIES = 3


class _CompiledKernels:
    """The C++ (``device="cpu"``) or CUDA C++ (``"cuda"``, csrc/cuda/; only in CUDA builds, at most
    ``CUDA_MAX_MODALITIES`` modalities: ``_reasons`` says so otherwise) kernels of
    ``fusionops._C``, behind the kernel contract."""

    def __init__(self, device: str) -> None:
        self.device = device

    def forward(self, xs: list[Tensor]) -> Tensor:
        return compiled("product_fwd", self.device)(xs)

    def backward(self, grad: Tensor, xs: list[Tensor]) -> list[Tensor]:
        return list(compiled("product_bwd", self.device)(grad, xs))


def _kernels(backend: str) -> ProductFusionKernels:
    return cast(
        ProductFusionKernels,
        fused_kernels(OP, backend, _CompiledKernels("cpu"), "product_fusion", cuda=_CompiledKernels("cuda")),
    )


def _reasons(backend: str, device: torch.device, dtype: torch.dtype, modalities: int = 1) -> list[str]:
    return kernel_reasons(OP, backend, device, dtype) + cuda_modality_reasons(backend, modalities)


def _order(device: torch.device, elements: int, modalities: int) -> tuple[str, ...] | None:
    counted = elements if modalities >= CPU_FUSED_MIN_MODALITIES else 0
    return size_order(device, counted, CPU_FUSED_MIN_ELEMENTS)


@torch.library.custom_op("fusionops::product_fusion", mutates_args=())
def _fused(xs: list[Tensor], backend: str) -> Tensor:
    return _kernels(backend).forward(xs).contiguous()


@_fused.register_fake
def _fused_fake(xs: list[Tensor], backend: str) -> Tensor:
    return xs[0].new_empty(xs[0].shape)


@torch.library.custom_op("fusionops::product_fusion_backward", mutates_args=())
def _fused_backward(grad: Tensor, xs: list[Tensor], backend: str) -> list[Tensor]:
    return [d.contiguous() for d in _kernels(backend).backward(grad, xs)]


@_fused_backward.register_fake
def _fused_backward_fake(grad: Tensor, xs: list[Tensor], backend: str) -> list[Tensor]:
    return [x.new_empty(x.shape) for x in xs]


def _setup(ctx, inputs, output) -> None:
    xs, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(*xs)


def _grad(ctx, grad: Tensor):
    dxs = torch.ops.fusionops.product_fusion_backward(grad, list(ctx.saved_tensors), ctx.backend)
    return list(dxs), None


_fused.register_autograd(_grad, setup_context=_setup)


def product_fusion(xs: Sequence[Tensor]) -> Tensor:
    """Elementwise product of M modalities of one width (DESIGN.md section 3).

    ``p = x_1 ⊙ x_2 ⊙ … ⊙ x_M``; every ``x_m`` has the same shape ``(*, d)`` (nothing is
    broadcast), dtype and device. Gradients are computed without division, so zeros in the
    inputs are fine.
    """
    lead, dims = check_modalities(OP, xs)
    for m, d in enumerate(dims[1:], start=1):
        if d != dims[0]:
            raise ValueError(
                f"{OP}: xs[{m}] has width {d} but xs[0] has {dims[0]}; product fusion multiplies "
                "modalities of one width elementwise (project them to a common width first)"
            )
    first = xs[0]
    n = math.prod(lead)
    backend = choose(
        OP,
        first.device,
        lambda b: _reasons(b, first.device, first.dtype, len(xs)),
        _order(first.device, n * dims[0], len(xs)),
    )
    if backend == "reference":
        return reference.product_fusion(xs)
    xs2 = [x.reshape(n, dims[0]) for x in xs]
    return torch.ops.fusionops.product_fusion(xs2, backend).reshape(first.shape)
