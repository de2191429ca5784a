"""Tensor fusion op (DESIGN.md section 1): checks, backend choice, autograd, fake kernels.

Two torch ops carry the fused implementations, each with a ``backend`` string chosen here
(so the choice is fixed at trace time and visible in a compiled graph):

* ``fusionops::tensor_fusion_features(xs, mask, backend) -> Z``
* ``fusionops::tensor_fusion_projected(xs, weight, bias, mask, backend) -> y``

and one backward op each. The ``reference`` backend is served by ``fusionops.reference``
directly, with PyTorch's own autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from fusionops import _backend, reference
from fusionops._backend import entry_kernels
from fusionops._checks import (
    check_grad,
    check_like,
    check_mask,
    check_modalities,
    check_rows,
    check_shape,
    feature_count,
)
from fusionops.ops import _autocast, _eager
from fusionops.ops._eager import EagerCall
from fusionops.ops._kernels import TensorFusionKernels, empty_grad
from fusionops.registry import OpDef, needs_grad, register

OP = "tensor_fusion"


class _CompiledKernels:
    """The kernels of ``fusionops._C`` behind the kernel contract: one schema each, C++ for CPU
    tensors and CUDA C++ for CUDA tensors (the dispatcher picks by device)."""

    def features_forward(self, xs: list[Tensor], mask: Tensor | None) -> Tensor:
        return torch.ops.fusionops._tf_features_fwd.default(xs, mask)

    def features_backward(self, grad: Tensor, xs: list[Tensor], mask: Tensor | None) -> list[Tensor]:
        return list(torch.ops.fusionops._tf_features_bwd.default(grad, xs, mask))

    def projected_forward(
        self, xs: list[Tensor], weight: Tensor, bias: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        return torch.ops.fusionops._tf_projected_fwd.default(xs, weight, bias, mask)

    def projected_backward(
        self,
        grad: Tensor,
        xs: list[Tensor],
        weight: Tensor,
        mask: Tensor | None,
        need_dx: bool,
        need_dw: bool,
        need_db: bool,
    ) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
        dxs, dw, db = torch.ops.fusionops._tf_projected_bwd.default(
            grad, xs, weight, mask, need_dx, need_dw, need_db
        )
        return list(dxs), dw, db


# Automatic choice on CPU, on N * K (elements of Z). With gradients the fused path was never
# lost at any measured size (N*K from 2000; 1.0-3.2x). Inference (forward only): with two or
# three modalities of width 16-64 the reference's one GEMM on a materialised Z beat the fused
# forward up to N*K = 1183744 (0.8-0.99x), so smaller inference calls go to the reference.
# The rule: a size is "lost" when fused[cpu] was slower than the reference there in both of two
# runs of `python -m benchmarks.crossover` (a single reading is within this machine's run-to-run
# noise of about 10%); each threshold is the smallest measured size from which nothing is lost.
# CSVs: benchmarks/results/crossover_<op>_cpu_2026-12-04_run{1,2}.csv.
CPU_FUSED_MIN_ELEMENTS = 0
CPU_FUSED_MIN_ELEMENTS_FORWARD = 1257728

OPDEF = register(
    OpDef(
        name=OP,
        reference=reference.tensor_fusion,
        compiled=_CompiledKernels(),
        kernels=("_tf_features_fwd", "_tf_features_bwd", "_tf_projected_fwd", "_tf_projected_bwd"),
        triton_module="tensor_fusion",
        size_metric="N*K",
        cpu_min_size=CPU_FUSED_MIN_ELEMENTS,
        cpu_min_size_forward=CPU_FUSED_MIN_ELEMENTS_FORWARD,
        cuda_kernels=True,
        autocast="lower",
    )
)


def _kernels(backend: str) -> TensorFusionKernels:
    return cast(TensorFusionKernels, OPDEF.kernels_for(backend))


# --- features: Z = flatten(z_1 ⊗ … ⊗ z_M) ------------------------------------------------


@torch.library.custom_op("fusionops::tensor_fusion_features", mutates_args=())
def _features(xs: list[Tensor], mask: Tensor | None, backend: str) -> Tensor:
    return _entry(xs, None, None, mask, backend).features_forward(xs, mask).contiguous()


class _FeaturesCall(EagerCall):
    """Eager features: flat = (*xs, mask)."""

    op = OP

    __slots__ = ("m",)

    def __init__(self, kernels: TensorFusionKernels, m: int) -> None:
        super().__init__(kernels)
        self.m = m

    def forward(self, flat):
        return self.kernels.features_forward(list(flat[: self.m]), flat[self.m]).contiguous()

    def backward(self, grad, flat, needs):
        dxs = self.kernels.features_backward(grad, list(flat[: self.m]), flat[self.m])
        return (*(d.contiguous() if n else None for d, n in zip(dxs, needs, strict=False)), None)

    def reference_grads(self, grad, flat, needs):
        m = self.m
        return (*_features_reference_grads(grad, list(flat[:m]), flat[m], needs[:m]), None)


def _features_reference_grads(
    grad: Tensor, xs: list[Tensor], mask: Tensor | None, needs
) -> list[Tensor | None]:
    """Second order: the features' gradients through the reference (see ops/_eager.py)."""
    return _eager.grads_through(lambda: reference.tensor_fusion(xs, None, None, mask), grad, xs, needs)


@_features.register_fake
def _features_fake(xs: list[Tensor], mask: Tensor | None, backend: str) -> Tensor:
    return xs[0].new_empty(xs[0].shape[0], math.prod(x.shape[1] + 1 for x in xs))


@torch.library.custom_op("fusionops::tensor_fusion_features_backward", mutates_args=())
def _features_backward(grad: Tensor, xs: list[Tensor], mask: Tensor | None, backend: str) -> list[Tensor]:
    kernels = _entry(xs, None, None, mask, backend, grad)
    return [d.contiguous() for d in kernels.features_backward(grad, xs, mask)]


@_features_backward.register_fake
def _features_backward_fake(
    grad: Tensor, xs: list[Tensor], mask: Tensor | None, backend: str
) -> list[Tensor]:
    return [x.new_empty(x.shape) for x in xs]


def _features_setup(ctx, inputs, output) -> None:
    xs, mask, backend = inputs
    ctx.n_xs = len(xs)
    ctx.backend = backend
    ctx.save_for_backward(*xs, mask)


def _features_grad(ctx, grad: Tensor):
    saved = ctx.saved_tensors
    xs, mask = list(saved[: ctx.n_xs]), saved[ctx.n_xs]
    if torch.is_grad_enabled():  # create_graph=True
        return _features_reference_grads(grad, xs, mask, ctx.needs_input_grad[0]), None, None
    dxs = torch.ops.fusionops.tensor_fusion_features_backward(grad, xs, mask, ctx.backend)
    return list(dxs), None, None


_features.register_autograd(_features_grad, setup_context=_features_setup)


# --- projected: y = Z Wᵀ + b, never holding Z ---------------------------------------------


@torch.library.custom_op("fusionops::tensor_fusion_projected", mutates_args=())
def _projected(
    xs: list[Tensor], weight: Tensor, bias: Tensor | None, mask: Tensor | None, backend: str
) -> Tensor:
    return _entry(xs, weight, bias, mask, backend).projected_forward(xs, weight, bias, mask).contiguous()


@_projected.register_fake
def _projected_fake(
    xs: list[Tensor], weight: Tensor, bias: Tensor | None, mask: Tensor | None, backend: str
) -> Tensor:
    return xs[0].new_empty(xs[0].shape[0], weight.shape[0])


@torch.library.custom_op("fusionops::tensor_fusion_projected_backward", mutates_args=())
def _projected_backward(
    grad: Tensor,
    xs: list[Tensor],
    weight: Tensor,
    mask: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    backend: str,
) -> tuple[list[Tensor], Tensor, Tensor]:
    kernels = _entry(xs, weight, None, mask, backend, grad)
    dxs, dw, db = kernels.projected_backward(grad, xs, weight, mask, need_dx, need_dw, need_db)
    dxs = [d.contiguous() for d in dxs] if need_dx else []
    dw = dw.contiguous() if need_dw else empty_grad(weight)
    db = db.contiguous() if need_db else empty_grad(weight)
    return dxs, dw, db


@_projected_backward.register_fake
def _projected_backward_fake(
    grad: Tensor,
    xs: list[Tensor],
    weight: Tensor,
    mask: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    backend: str,
) -> tuple[list[Tensor], Tensor, Tensor]:
    dxs = [x.new_empty(x.shape) for x in xs] if need_dx else []
    dw = weight.new_empty(weight.shape) if need_dw else empty_grad(weight)
    db = weight.new_empty(weight.shape[0]) if need_db else empty_grad(weight)
    return dxs, dw, db


def _projected_setup(ctx, inputs, output) -> None:
    xs, weight, bias, mask, backend = inputs
    ctx.n_xs = len(xs)
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*xs, weight, mask)


def _projected_grad(ctx, grad: Tensor):
    saved = ctx.saved_tensors
    n = ctx.n_xs
    xs, weight, mask = list(saved[:n]), saved[n], saved[n + 1]
    need_dx = any(ctx.needs_input_grad[0])  # a list: one flag per modality
    need_dw = bool(ctx.needs_input_grad[1])
    need_db = ctx.has_bias and bool(ctx.needs_input_grad[2])
    if torch.is_grad_enabled():  # create_graph=True
        *dxs, dw = _projected_reference_grads(grad, xs, weight, mask, [*ctx.needs_input_grad[0], need_dw])
        return dxs, dw, grad.sum(0) if need_db else None, None, None
    dxs, dw, db = torch.ops.fusionops.tensor_fusion_projected_backward(
        grad, xs, weight, mask, need_dx, need_dw, need_db, ctx.backend
    )
    return (
        list(dxs) if need_dx else [None] * n,
        dw if need_dw else None,
        db if need_db else None,
        None,
        None,
    )


_projected.register_autograd(_projected_grad, setup_context=_projected_setup)


class _ProjectedCall(EagerCall):
    """Eager projection: flat = (*xs, weight, bias, mask)."""

    op = OP

    __slots__ = ("m",)

    def __init__(self, kernels: TensorFusionKernels, m: int) -> None:
        super().__init__(kernels)
        self.m = m

    def forward(self, flat):
        m = self.m
        return self.kernels.projected_forward(list(flat[:m]), flat[m], flat[m + 1], flat[m + 2]).contiguous()

    def saved(self, flat):
        return (*flat[: self.m + 1], None, flat[self.m + 2])  # the bias is not read by backward

    def backward(self, grad, flat, needs):
        m = self.m
        need_dx, need_dw, need_db = any(needs[:m]), needs[m], needs[m + 1]
        dxs, dw, db = self.kernels.projected_backward(
            grad, list(flat[:m]), flat[m], flat[m + 2], need_dx, need_dw, need_db
        )
        dxs = (
            [d.contiguous() if n else None for d, n in zip(dxs, needs, strict=False)]
            if need_dx
            else [None] * m
        )
        return (*dxs, dw.contiguous() if need_dw else None, db.contiguous() if need_db else None, None)

    def reference_grads(self, grad, flat, needs):
        m = self.m
        grads = _projected_reference_grads(grad, list(flat[:m]), flat[m], flat[m + 2], needs[: m + 1])
        return (*grads, grad.sum(0) if needs[m + 1] else None, None)  # bias: not saved; dy/db = 1


def _projected_reference_grads(
    grad: Tensor, xs: list[Tensor], weight: Tensor, mask: Tensor | None, needs
) -> list[Tensor | None]:
    """Second order: gradients of xs and weight through the reference, without the bias (it
    only shifts y). This materialises Z, as the reference does."""
    return _eager.grads_through(
        lambda: reference.tensor_fusion(xs, weight, None, mask), grad, [*xs, weight], needs
    )


for _name in ("tensor_fusion_features", "tensor_fusion_features_backward"):
    _autocast.register(_name, "keep")
for _name in ("tensor_fusion_projected", "tensor_fusion_projected_backward"):
    _autocast.register(_name, OPDEF.autocast)


# --- checks: the public function and every registered op's entry --------------------------


def _check_args(
    xs: Sequence[Tensor], weight: Tensor | None, bias: Tensor | None, mask: Tensor | None
) -> tuple[torch.Size, int]:
    """Every argument of a call; returns the leading shape and K."""
    lead, dims = check_modalities(OP, xs)
    first = xs[0]
    k = feature_count(dims)
    if weight is None:
        if bias is not None:
            raise ValueError(f"{OP}: bias was given without weight; pass weight (O, {k}) too")
    else:
        check_like(OP, "weight", weight, first)
        if weight.dim() != 2 or weight.shape[1] != k:
            factors = " * ".join(f"({d} + 1)" for d in dims)  # built only for the message
            raise ValueError(
                f"{OP}: weight must have shape (O, K) with K = {factors} = {k} for input "
                f"dims {tuple(dims)}, got {tuple(weight.shape)}"
            )
        if bias is not None:
            check_like(OP, "bias", bias, first)
            check_shape(OP, "bias", bias, (weight.shape[0],), " (O, the rows of weight)")
    check_mask(OP, mask, lead, len(xs), first.device)
    return lead, k


def _entry(
    xs: list[Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    backend: str,
    grad: Tensor | None = None,
) -> TensorFusionKernels:
    """A registered op's checks (its arguments are rows; ``grad``: a backward op's upstream
    gradient), then the kernels of ``backend``."""
    lead, k = _check_args(xs, weight, bias, mask)
    n = check_rows(OP, lead)
    if grad is not None:
        check_grad(OP, grad, (n, k if weight is None else weight.shape[0]), xs[0])
    return cast(TensorFusionKernels, entry_kernels(OPDEF, backend, xs[0].device, xs[0].dtype, len(xs)))


# --- public function ----------------------------------------------------------------------


def tensor_fusion(
    xs: Sequence[Tensor],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Tensor fusion of M modalities (Zadeh et al. 2017; DESIGN.md section 1).

    Args:
        xs: M >= 1 tensors ``x_m`` of shape ``(*, d_m)`` sharing the leading shape ``*``,
            dtype and device.
        weight: optional ``(O, K)`` with ``K = prod(d_m + 1)``, as ``nn.Linear(K, O)`` stores it.
        bias: optional ``(O,)``; only with ``weight``.
        mask: optional bool ``(*, M)``; False marks a missing modality, which contributes
            ``[1, 0…0]`` (its values are ignored, NaN included) and gets zero gradient.

    Returns:
        ``Z = flatten(z_1 ⊗ … ⊗ z_M)`` of shape ``(*, K)`` when ``weight`` is None, with
        ``z_m = [1, x_m]`` and modality 1 the slowest index; otherwise ``Z Wᵀ + b`` of shape
        ``(*, O)``, computed without ever holding ``Z`` (forward or backward).

    The backend is chosen by ``fusionops.backend`` / ``FUSIONOPS_BACKEND`` or automatically
    (see ``python -m fusionops.info``).
    """
    lead, k = _check_args(xs, weight, bias, mask)
    first = xs[0]
    if _autocast.enabled(first.device):  # features: elementwise products, kept in their dtype
        rule = "keep" if weight is None else OPDEF.autocast
        return _autocast.call_without_autocast(rule, first.device, tensor_fusion, xs, weight, bias, mask=mask)

    n = math.prod(lead)
    backend = _backend.choose(OPDEF, first.device, first.dtype, len(xs), n * k, needs_grad(xs, weight, bias))
    if backend == "reference":
        return reference.tensor_fusion(xs, weight, bias, mask)

    if len(lead) == 1:  # rows already: no reshape (a view, but a call each)
        xs2, mask2 = list(xs), mask
    else:
        xs2 = [x.reshape(n, x.shape[-1]) for x in xs]
        mask2 = None if mask is None else mask.reshape(n, len(xs))
    if _eager.traced(first):  # the custom ops: what compiled graphs, exports and fake tensors take
        if weight is None:
            out = torch.ops.fusionops.tensor_fusion_features(xs2, mask2, backend)
        else:
            out = torch.ops.fusionops.tensor_fusion_projected(xs2, weight, bias, mask2, backend)
    elif weight is None:
        out = _eager.apply(_FeaturesCall(_kernels(backend), len(xs)), (*xs2, mask2))
    else:
        out = _eager.apply(_ProjectedCall(_kernels(backend), len(xs)), (*xs2, weight, bias, mask2))
    return out if len(lead) == 1 else out.reshape(*lead, out.shape[-1])
