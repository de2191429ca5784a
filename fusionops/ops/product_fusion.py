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

from fusionops import _backend, reference
from fusionops._backend import entry_kernels
from fusionops._checks import check_grad, check_modalities, check_rows, plain_cpu_modalities
from fusionops._extension import extension_loaded
from fusionops.ops import _autocast, _eager
from fusionops.ops._eager import EagerCall
from fusionops.ops._kernels import ProductFusionKernels
from fusionops.registry import OpDef, needs_grad, register

OP = "product_fusion"


class _CompiledKernels:
    """The kernels of ``fusionops._C`` behind the kernel contract: one schema each, C++ for CPU
    tensors and CUDA C++ for CUDA tensors (the dispatcher picks by device)."""

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.ops.fusionops._product_fwd.default(xs)

    def backward(self, grad: Tensor, xs: list[Tensor]) -> list[Tensor]:
        return list(torch.ops.fusionops._product_bwd.default(grad, xs))


# Automatic choice on CPU, on N * d: the fused kernel replaces the reference's M - 1 passes over
# memory by one. With two modalities ATen's single multiply was never beaten (0.74-0.96x with the
# backward in C++ too), so they always go to the reference; with three or more, since the eager
# call and its autograd are in C++ (csrc/cpu/eager_entry.cpp, eager_autograd.cpp), the fused
# kernels were not lost at any size, with or without gradients (1.0-2.5x).
# The rule: a size is "lost" when fused[cpu] was slower than the reference there in both of two
# runs of `python -m benchmarks.crossover` (a single reading is within this machine's run-to-run
# noise of about 10%); each threshold is the smallest measured size from which nothing is lost.
# CSVs: benchmarks/results/crossover_product_fusion_cpu_2026-12-05_run{1,2}_cpp_autograd.csv
# (before the C++ autograd: 2026-12-04, thresholds 2^20 with gradients and 2^22 without).
CPU_FUSED_MIN_ELEMENTS = 0
CPU_FUSED_MIN_ELEMENTS_FORWARD = 0
CPU_FUSED_MIN_MODALITIES = 3

OPDEF = register(
    OpDef(
        name=OP,
        reference=reference.product_fusion,
        compiled=_CompiledKernels(),
        kernels=("_product_fwd", "_product_bwd"),
        triton_module="product_fusion",
        size_metric="N*d",
        cpu_min_size=CPU_FUSED_MIN_ELEMENTS,
        cpu_min_size_forward=CPU_FUSED_MIN_ELEMENTS_FORWARD,
        cpu_min_modalities=CPU_FUSED_MIN_MODALITIES,
        cuda_kernels=True,
        autocast="keep",
    )
)


def _kernels(backend: str) -> ProductFusionKernels:
    return cast(ProductFusionKernels, OPDEF.kernels_for(backend))


class _Call(EagerCall):
    """Eager product: flat = xs."""

    op = OP

    def forward(self, flat):
        return self.kernels.forward(list(flat)).contiguous()

    def backward(self, grad, flat, needs):
        dxs = self.kernels.backward(grad, list(flat))
        return tuple(d.contiguous() if n else None for d, n in zip(dxs, needs, strict=True))

    def reference_grads(self, grad, flat, needs):
        return tuple(_reference_grads(grad, list(flat), needs))


def _reference_grads(grad: Tensor, xs: list[Tensor], needs) -> list[Tensor | None]:
    """Second order: the gradients through the reference (see ops/_eager.py)."""
    return _eager.grads_through(lambda: reference.product_fusion(xs), grad, xs, needs)


@torch.library.custom_op("fusionops::product_fusion", mutates_args=())
def _fused(xs: list[Tensor], backend: str) -> Tensor:
    return _entry(xs, backend).forward(xs).contiguous()


@_fused.register_fake
def _fused_fake(xs: list[Tensor], backend: str) -> Tensor:
    return xs[0].new_empty(xs[0].shape)


@torch.library.custom_op("fusionops::product_fusion_backward", mutates_args=())
def _fused_backward(grad: Tensor, xs: list[Tensor], backend: str) -> list[Tensor]:
    return [d.contiguous() for d in _entry(xs, backend, grad).backward(grad, xs)]


@_fused_backward.register_fake
def _fused_backward_fake(grad: Tensor, xs: list[Tensor], backend: str) -> list[Tensor]:
    return [x.new_empty(x.shape) for x in xs]


def _setup(ctx, inputs, output) -> None:
    xs, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(*xs)


def _grad(ctx, grad: Tensor):
    if torch.is_grad_enabled():  # create_graph=True
        return _reference_grads(grad, list(ctx.saved_tensors), ctx.needs_input_grad[0]), None
    dxs = torch.ops.fusionops.product_fusion_backward(grad, list(ctx.saved_tensors), ctx.backend)
    return list(dxs), None


_fused.register_autograd(_grad, setup_context=_setup)
for _name in ("product_fusion", "product_fusion_backward"):
    _autocast.register(_name, OPDEF.autocast)


def _kernel_fwd_fake(xs: list[Tensor]) -> Tensor:
    return xs[0].new_empty(xs[0].shape)


def _kernel_bwd_fake(grad: Tensor, xs: list[Tensor]) -> list[Tensor]:
    return [x.new_empty(x.shape) for x in xs]


# Kept alive for the registrations' lifetime. Fake kernels of the C++ kernels that the eager op
# fusionops::_product_eager calls (csrc/cpu/eager_autograd.cpp), so that it runs on fake
# tensors too (torch.library.opcheck; the public function never hands it one: _eager.traced).
_LIB = torch.library.Library("fusionops", "IMPL")
if extension_loaded():
    torch.library.register_fake("fusionops::_product_fwd", _kernel_fwd_fake, lib=_LIB)
    torch.library.register_fake("fusionops::_product_bwd", _kernel_bwd_fake, lib=_LIB)


def _check_args(xs: Sequence[Tensor]) -> tuple[torch.Size, list[int]]:
    """Every argument of a call; returns the leading shape and the widths."""
    lead, dims = check_modalities(OP, xs)
    for m, d in enumerate(dims[1:], start=1):
        if d != dims[0]:
            raise ValueError(
                f"{OP}: xs[{m}] has width {d} but xs[0] has {dims[0]}; product fusion multiplies "
                "modalities of one width elementwise (project them to a common width first)"
            )
    return lead, dims


def _entry(xs: list[Tensor], backend: str, grad: Tensor | None = None) -> ProductFusionKernels:
    """A registered op's checks (its arguments are rows; ``grad``: the backward op's upstream
    gradient), then the kernels of ``backend``."""
    lead, dims = _check_args(xs)
    n = check_rows(OP, lead)
    if grad is not None:
        check_grad(OP, grad, (n, dims[0]), xs[0])
    return cast(ProductFusionKernels, entry_kernels(OPDEF, backend, xs[0].device, xs[0].dtype, len(xs)))


def _eager_cpu(xs: Sequence[Tensor]) -> Tensor | None:
    """The common eager call at a fraction of the full path's cost (issue 15: at research
    sizes the reference's multiplies take a few µs, less than the full checks): plain CPU
    tensors of one float dtype and one shape (at least 1-d, width >= 1), no autocast, not
    traced. Anything else returns None and takes the full path, which decides the same way and
    names what is wrong."""
    if plain_cpu_modalities(xs) is None:
        return None
    shape = xs[0].shape
    if not shape or shape[-1] == 0:
        return None
    for x in xs[1:]:
        if x.shape != shape:
            return None
    backend = _backend.choose_cpu_eager(OPDEF, len(xs), shape.numel(), needs_grad(xs))
    if backend is None:
        return None
    return _run(xs, backend, shape.numel() // shape[-1])


# The common eager call, chosen and served in C++ (csrc/cpu/eager_entry.cpp: the reference's
# own multiplies or the kernels, as _eager_cpu would); None without the extension.
_COMPILED_ENTRY = _backend.compiled_entry(OPDEF, "_product_eager", ("reference", "cpu"))


def product_fusion(xs: Sequence[Tensor]) -> Tensor:
    """Elementwise product of M modalities of one width (DESIGN.md section 3).

    ``p = x_1 ⊙ x_2 ⊙ … ⊙ x_M``; every ``x_m`` has the same shape ``(*, d)`` (nothing is
    broadcast), dtype and device. Gradients are computed without division, so zeros in the
    inputs are fine.
    """
    entry = _COMPILED_ENTRY
    if entry is not None and _backend.entries_allowed():
        out = entry(xs)
        if out is not None:
            return out
    out = _eager_cpu(xs)
    if out is not None:
        return out
    lead, dims = _check_args(xs)
    first = xs[0]
    if _autocast.enabled(first.device):
        return _autocast.call_without_autocast(OPDEF.autocast, first.device, product_fusion, xs)
    n = math.prod(lead)
    backend = _backend.choose(OPDEF, first.device, first.dtype, len(xs), n * dims[0], needs_grad(xs))
    return _run(xs, backend, n)


def _run(xs: Sequence[Tensor], backend: str, n: int) -> Tensor:
    """A checked call of ``n`` rows on ``backend``."""
    if backend == "reference":
        return reference.product_fusion(xs)
    first = xs[0]
    rows = first.dim() == 2  # rows already: no reshape (a view, and a node in the graph, each)
    xs2 = list(xs) if rows else [x.reshape(n, first.shape[-1]) for x in xs]
    if _eager.traced(first):  # the custom op: what compiled graphs, exports and fake tensors take
        out = torch.ops.fusionops.product_fusion(xs2, backend)
    elif backend in ("cpu", "cuda"):  # the compiled kernels, with their autograd in C++
        out = torch.ops.fusionops._product_eager.default(xs2)
    else:
        out = _eager.apply(_Call(_kernels(backend)), tuple(xs2))
    return out if rows else out.reshape(first.shape)
