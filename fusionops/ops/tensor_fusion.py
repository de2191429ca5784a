"""Tensor fusion op (DESIGN.md section 1): checks, backend choice, autograd, fake kernels.

Two torch ops carry the fused implementations, each with a ``backend`` string chosen here
(so the choice is fixed at trace time and visible in a compiled graph):

* ``fusionops::tensor_fusion_features(xs, mask, backend) -> Z``
* ``fusionops::tensor_fusion_projected(xs, weight, bias, mask, backend, dropout=0., seed=0) -> y``

and one backward op each. The ``reference`` backend is served by ``fusionops.reference``
directly, with PyTorch's own autograd.

Eager calls (outside torch.compile/export and fake tensors) skip those custom ops: the triton
backend through ``ops/_eager.py``; the cpu and cuda backends, for the projection, through
``fusionops::_tf_projected_eager``, whose autograd is in C++ (csrc/cpu/eager_autograd.cpp; its
double backward calls ``_tf_projected_reference_grads``, registered here), or straight to the
forward kernel when no gradient is recorded.

Dropout on Z (``dropout`` > 0): the projected kernels mask the tiles of Z and dZ as they form
them, with the counter-based mask of ``fusionops.reference.tensor_fusion`` (seed, row, feature),
regenerated in backward; the features form returns Z, which is materialised anyway, so its
dropout is the reference's ``feature_dropout`` applied to the fused features. The CUDA C++
kernels have no dropout: such calls go to the triton backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from fusionops import _backend, _extension, reference
from fusionops._backend import BackendUnavailableError, entry_kernels
from fusionops._checks import (
    check_grad,
    check_like,
    check_mask,
    check_modalities,
    check_rows,
    check_shape,
    feature_count,
    plain_cpu_like,
    plain_cpu_modalities,
)
from fusionops.ops import _autocast, _eager
from fusionops.ops._dropout import check_dropout, check_seed, draw_seed
from fusionops.ops._eager import EagerCall
from fusionops.ops._kernels import TensorFusionKernels, empty_grad
from fusionops.reference.tensor_fusion import feature_dropout
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
        self,
        xs: list[Tensor],
        weight: Tensor,
        bias: Tensor | None,
        mask: Tensor | None,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> Tensor:
        return torch.ops.fusionops._tf_projected_fwd.default(xs, weight, bias, mask, dropout, seed)

    def projected_backward(
        self,
        grad: Tensor,
        xs: list[Tensor],
        weight: Tensor,
        mask: Tensor | None,
        need_dx: bool,
        need_dw: bool,
        need_db: bool,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
        dxs, dw, db = torch.ops.fusionops._tf_projected_bwd.default(
            grad, xs, weight, mask, need_dx, need_dw, need_db, dropout, seed
        )
        return list(dxs), dw, db


# Automatic choice on CPU, on N * K (elements of Z). With gradients the fused path was never
# lost at any measured size (N*K from 2000; 0.86-3.5x, no size below 1x in both runs).
# Inference (forward only): with two or three modalities of width 16-64 the reference's one
# GEMM on a materialised Z beat the fused forward up to N*K = 1257728 (0.54-0.97x), so
# smaller inference calls go to the reference.
# The rule: a size is "lost" when fused[cpu] was slower than the reference there in both of two
# runs of `python -m benchmarks.crossover` (a single reading is within this machine's run-to-run
# noise of about 10%); each threshold is the smallest measured size from which nothing is lost.
# Re-measured after the small-problem kernel path and the C++ autograd (issue 15), on a quiet
# machine: benchmarks/results/crossover_tensor_fusion_cpu_2026-12-04_run{3,4}.csv.
# Below that, modalities at most 8 wide won at every measured size (4x4x4 and 8x8x8: 1.24-2.56x
# in both runs; the small-problem kernel path serves them), while wider ones lost (16x16 0.86-1.05x,
# 16x16x16 0.54-0.65x): inference calls whose modalities are all at most 8 wide are fused.
# Re-measured with plain calls (the sweep's fused way is now the public call a user makes, not a
# backend('cpu') block per call; runs 3 and 4, *_run{3,4}_plain.csv): inference still lost up to
# N*K = 5030912 in both (16x16x16 0.91-0.94x there), so the inference threshold moved from 1679616
# to the next measured size, 6718464. With gradients one shape lost mid-range in both (32x32 at
# 1115136: 0.81-0.88x) while every shape won below it (1.14-2.51x) and above it: still fused at
# every size, since no single threshold keeps the wins below.
CPU_FUSED_MIN_ELEMENTS = 0
CPU_FUSED_MIN_ELEMENTS_FORWARD = 6718464
CPU_NARROW_WIDTH_FORWARD = 8

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
        cpu_narrow_width_forward=CPU_NARROW_WIDTH_FORWARD,
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
    xs: list[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    backend: str,
    dropout: float = 0.0,
    seed: int = 0,
) -> Tensor:
    kernels = _entry(xs, weight, bias, mask, backend, dropout=dropout, seed=seed)
    return kernels.projected_forward(xs, weight, bias, mask, dropout, seed).contiguous()


@_projected.register_fake
def _projected_fake(
    xs: list[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    backend: str,
    dropout: float = 0.0,
    seed: int = 0,
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
    dropout: float = 0.0,
    seed: int = 0,
) -> tuple[list[Tensor], Tensor, Tensor]:
    kernels = _entry(xs, weight, None, mask, backend, grad, dropout=dropout, seed=seed)
    dxs, dw, db = kernels.projected_backward(grad, xs, weight, mask, need_dx, need_dw, need_db, dropout, seed)
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
    dropout: float = 0.0,
    seed: int = 0,
) -> tuple[list[Tensor], Tensor, Tensor]:
    dxs = [x.new_empty(x.shape) for x in xs] if need_dx else []
    dw = weight.new_empty(weight.shape) if need_dw else empty_grad(weight)
    db = weight.new_empty(weight.shape[0]) if need_db else empty_grad(weight)
    return dxs, dw, db


def _projected_setup(ctx, inputs, output) -> None:
    xs, weight, bias, mask, backend, dropout, seed = inputs
    ctx.n_xs = len(xs)
    ctx.backend = backend
    ctx.dropout, ctx.seed = dropout, seed
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*xs, weight, mask)


def _projected_grad(ctx, grad: Tensor):
    saved = ctx.saved_tensors
    n = ctx.n_xs
    xs, weight, mask = list(saved[:n]), saved[n], saved[n + 1]
    need_dx = any(ctx.needs_input_grad[0])  # a list: one flag per modality
    need_dw = bool(ctx.needs_input_grad[1])
    need_db = ctx.has_bias and bool(ctx.needs_input_grad[2])
    drop = (ctx.dropout, ctx.seed)
    # The dispatcher drops trailing arguments equal to their defaults (dropout=0., seed=0), and
    # the gradients must match the arguments as given: None for each non-tensor one.
    rest = (None,) * (len(ctx.needs_input_grad) - 3)
    if torch.is_grad_enabled():  # create_graph=True
        *dxs, dw = _projected_reference_grads(
            grad, xs, weight, mask, [*ctx.needs_input_grad[0], need_dw], *drop
        )
        return dxs, dw, grad.sum(0) if need_db else None, *rest
    dxs, dw, db = torch.ops.fusionops.tensor_fusion_projected_backward(
        grad, xs, weight, mask, need_dx, need_dw, need_db, ctx.backend, *drop
    )
    return (list(dxs) if need_dx else [None] * n, dw if need_dw else None, db if need_db else None, *rest)


_projected.register_autograd(_projected_grad, setup_context=_projected_setup)


class _ProjectedCall(EagerCall):
    """Eager projection: flat = (*xs, weight, bias, mask); dropout on Z of (p, seed)."""

    op = OP

    __slots__ = ("m", "dropout", "seed")

    def __init__(self, kernels: TensorFusionKernels, m: int, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__(kernels)
        self.m = m
        self.dropout, self.seed = dropout, seed

    def forward(self, flat):
        m = self.m
        xs, w, b, mask = list(flat[:m]), flat[m], flat[m + 1], flat[m + 2]
        if self.dropout == 0:  # the call of every layer in eval mode: no extra arguments
            return self.kernels.projected_forward(xs, w, b, mask).contiguous()
        return self.kernels.projected_forward(xs, w, b, mask, self.dropout, self.seed).contiguous()

    def saved(self, flat):
        return (*flat[: self.m + 1], None, flat[self.m + 2])  # the bias is not read by backward

    def backward(self, grad, flat, needs):
        m = self.m
        need_dx, need_dw, need_db = any(needs[:m]), needs[m], needs[m + 1]
        dxs, dw, db = self.kernels.projected_backward(
            grad, list(flat[:m]), flat[m], flat[m + 2], need_dx, need_dw, need_db, self.dropout, self.seed
        )
        dxs = (
            [d.contiguous() if n else None for d, n in zip(dxs, needs, strict=False)]
            if need_dx
            else [None] * m
        )
        return (*dxs, dw.contiguous() if need_dw else None, db.contiguous() if need_db else None, None)

    def reference_grads(self, grad, flat, needs):
        m = self.m
        grads = _projected_reference_grads(
            grad, list(flat[:m]), flat[m], flat[m + 2], needs[: m + 1], self.dropout, self.seed
        )
        return (*grads, grad.sum(0) if needs[m + 1] else None, None)  # bias: not saved; dy/db = 1


def _projected_reference_grads(
    grad: Tensor,
    xs: list[Tensor],
    weight: Tensor,
    mask: Tensor | None,
    needs,
    dropout: float = 0.0,
    seed: int = 0,
) -> list[Tensor | None]:
    """Second order: gradients of xs and weight through the reference (same dropout mask),
    without the bias (it only shifts y). This materialises Z, as the reference does."""
    return _eager.grads_through(
        lambda: reference.tensor_fusion(xs, weight, None, mask, dropout, seed), grad, [*xs, weight], needs
    )


def _reference_grads_kernel(
    grad: Tensor,
    xs: list[Tensor],
    weight: Tensor,
    mask: Tensor | None,
    needs: list[int],
    dropout: float,
    seed: int,
) -> list[Tensor]:
    """``fusionops::_tf_projected_reference_grads``: the second-order path of the C++ eager op
    (csrc/cpu/eager_autograd.cpp), whose backward calls it when create_graph=True. The gradients
    of xs and weight through the reference, one per nonzero flag of ``needs``, as a graph."""
    flags = [bool(n) for n in needs]
    grads = _projected_reference_grads(grad, list(xs), weight, mask, flags, dropout, seed)
    inputs = [*xs, weight]
    # allow_unused gives None for an input outside the graph: its gradient is zero
    return [
        g if g is not None else torch.zeros_like(t) for g, t, n in zip(grads, inputs, flags, strict=True) if n
    ]


def _kernel_fwd_fake(
    xs: list[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    dropout: float = 0.0,
    seed: int = 0,
) -> Tensor:
    return xs[0].new_empty(xs[0].shape[0], weight.shape[0])


def _kernel_bwd_fake(
    grad: Tensor,
    xs: list[Tensor],
    weight: Tensor,
    mask: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    dropout: float = 0.0,
    seed: int = 0,
) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    dxs = [x.new_empty(x.shape) for x in xs] if need_dx else []
    dw = weight.new_empty(weight.shape) if need_dw else None
    return dxs, dw, weight.new_empty(weight.shape[0]) if need_db else None


# Kept alive for the registrations' lifetime. The schemas live in the extension (csrc/ops.cpp).
_LIB = torch.library.Library("fusionops", "IMPL")
if _extension.extension_loaded():
    _LIB.impl("_tf_projected_reference_grads", _reference_grads_kernel, "CompositeImplicitAutograd")
    # Fake kernels of the C++ kernels that the eager op calls, so that it runs on fake tensors
    # too (torch.library.opcheck; the public function never hands it one: _eager.traced).
    torch.library.register_fake("fusionops::_tf_projected_fwd", _kernel_fwd_fake, lib=_LIB)
    torch.library.register_fake("fusionops::_tf_projected_bwd", _kernel_bwd_fake, lib=_LIB)


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


def _check_dropout(dropout: object, seed: object) -> float:
    """``dropout``: a real number in [0, 1) (returned as a float); ``seed``: None or an int in
    [0, 2**31) (None: drawn per call)."""
    p = check_dropout(OP, "dropout", dropout)
    check_seed(OP, seed)
    return p


def _no_cuda_dropout(backend: str, dropout: float) -> str | None:
    """Why ``backend`` cannot serve a call with this dropout (None when it can)."""
    if backend == "cuda" and dropout > 0:
        return "the CUDA C++ kernels have no dropout on Z (the triton backend has)"
    return None


def _entry(
    xs: list[Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    backend: str,
    grad: Tensor | None = None,
    *,
    dropout: float = 0.0,
    seed: int = 0,
) -> TensorFusionKernels:
    """A registered op's checks (its arguments are rows; ``grad``: a backward op's upstream
    gradient), then the kernels of ``backend``."""
    lead, k = _check_args(xs, weight, bias, mask)
    _check_dropout(dropout, seed)
    n = check_rows(OP, lead)
    if grad is not None:
        check_grad(OP, grad, (n, k if weight is None else weight.shape[0]), xs[0])
    kernels = entry_kernels(OPDEF, backend, xs[0].device, xs[0].dtype, len(xs))
    if (why := _no_cuda_dropout(backend, dropout)) is not None:
        raise BackendUnavailableError(f"{OP}: backend 'cuda' cannot serve this call:\n  - {why}")
    return cast(TensorFusionKernels, kernels)


def _choose(
    first: Tensor, m: int, size: int, training: bool, dropout: float, widest: int | None = None
) -> str:
    """The backend of a call (``_backend.choose``), never the cuda one with dropout: forced,
    that is an error with the reason; chosen automatically, triton (else the reference) serves."""
    backend = _backend.choose(OPDEF, first.device, first.dtype, m, size, training, widest)
    why = _no_cuda_dropout(backend, dropout)
    if why is None:
        return backend
    if _backend.forced_backend() == "cuda":
        raise BackendUnavailableError(
            f"{OP}: the forced backend 'cuda' cannot serve this call:\n  - {why}\n"
            "Backends that could: triton, reference"
        )
    usable = not _backend.reasons(OPDEF, "triton", first.device, first.dtype, m)
    return "triton" if usable else "reference"


# --- public function ----------------------------------------------------------------------


def _eager_cpu_rows(xs: Sequence[Tensor], weight: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """The common eager call, served at a fraction of the full path's cost (issue 15: the
    Python before the kernel cost more than the kernel at research sizes): the projection of
    plain CPU tensors, rows (N, d_m >= 1) of one float dtype, weight (O, K) and bias (O,) or
    None of that dtype, no mask, no dropout, no autocast, not traced. One pass accepts exactly
    such a call; anything else (every malformed call included: the full path names what is
    wrong) returns None and takes the full path, which decides the same way."""
    dtype = plain_cpu_modalities(xs)
    if dtype is None or not plain_cpu_like(weight, dtype):
        return None
    if bias is not None and not plain_cpu_like(bias, dtype):
        return None
    n, k, widest = -1, 1, 0
    for x in xs:
        s = x.shape
        if len(s) != 2 or s[1] == 0 or (s[0] != n and n >= 0):
            return None
        n, k, widest = s[0], k * (s[1] + 1), max(widest, s[1])
    ws = weight.shape
    if len(ws) != 2 or ws[1] != k or (bias is not None and bias.shape != ws[:1]):
        return None
    training = needs_grad(xs, weight, bias)
    backend = _backend.choose_cpu_eager(OPDEF, len(xs), n * k, training, widest)
    if backend is None:
        return None
    if backend == "reference":
        return reference.tensor_fusion(xs, weight, bias)
    return _compiled_projected(xs, weight, bias, None, 0.0, 0, training)


def _compiled_projected(
    xs: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    dropout: float,
    seed: int,
    training: bool,
) -> Tensor:
    """An eager projection on the cpu or cuda backend (rows): autograd in C++
    (csrc/cpu/eager_autograd.cpp) when a gradient is recorded, else the forward kernel alone."""
    if training:
        return torch.ops.fusionops._tf_projected_eager.default(xs, weight, bias, mask, dropout, seed)
    return torch.ops.fusionops._tf_projected_fwd.default(xs, weight, bias, mask, dropout, seed)


# The common eager call of the projection, chosen and served in C++
# (csrc/cpu/eager_entry.cpp: the reference's own ATen ops or the kernels below, as
# _eager_cpu_rows would); None without the extension.
_COMPILED_ENTRY = _backend.compiled_entry(OPDEF, "_tensor_fusion_eager", ("reference", "cpu"))


def tensor_fusion(
    xs: Sequence[Tensor],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    dropout: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """Tensor fusion of M modalities (Zadeh et al. 2017; DESIGN.md section 1).

    Args:
        xs: M >= 1 tensors ``x_m`` of shape ``(*, d_m)`` sharing the leading shape ``*``,
            dtype and device.
        weight: optional ``(O, K)`` with ``K = prod(d_m + 1)``, as ``nn.Linear(K, O)`` stores it.
        bias: optional ``(O,)``; only with ``weight``.
        mask: optional bool ``(*, M)``; False marks a missing modality, which contributes
            ``[1, 0…0]`` (its values are ignored, NaN included) and gets zero gradient.
        dropout: probability in [0, 1) of inverted dropout on the features Z: each feature of
            each row is zeroed with this probability, the others scaled by ``1 / (1 - dropout)``
            (always applied when > 0: the layer passes 0 in eval mode). The mask is a function
            of (seed, flattened row, feature index), ``fusionops.reference.tensor_fusion
            .dropout_keep``, regenerated in backward; the projected form never holds it or Z.
        seed: the mask's seed, an int in [0, 2**31); None draws one from torch's default CPU
            generator (``torch.manual_seed`` makes it reproducible). Ignored when dropout is 0.

    Returns:
        ``Z = flatten(z_1 ⊗ … ⊗ z_M)`` of shape ``(*, K)`` when ``weight`` is None, with
        ``z_m = [1, x_m]`` and modality 1 the slowest index; otherwise ``Z Wᵀ + b`` of shape
        ``(*, O)``, computed without ever holding ``Z`` (forward or backward).

    The backend is chosen by ``fusionops.backend`` / ``FUSIONOPS_BACKEND`` or automatically
    (see ``python -m fusionops.info``).
    """
    if mask is None and dropout == 0 and seed is None:
        entry = _COMPILED_ENTRY
        if entry is not None and _backend.entries_allowed():
            out = entry(xs, weight, bias)
            if out is not None:
                return out
        out = _eager_cpu_rows(xs, weight, bias)
        if out is not None:
            return out
    lead, k = _check_args(xs, weight, bias, mask)
    dropout = _check_dropout(dropout, seed)
    if dropout > 0 and seed is None:
        seed = draw_seed()
    seed = 0 if dropout == 0 else cast(int, seed)
    if dropout > 0 and weight is None:  # Z is the output, materialised anyway: mask it whole
        return feature_dropout(tensor_fusion(xs, mask=mask), dropout, seed)
    first = xs[0]
    if _autocast.enabled(first.device):  # features: elementwise products, kept in their dtype
        rule = "keep" if weight is None else OPDEF.autocast
        return _autocast.call_without_autocast(
            rule, first.device, tensor_fusion, xs, weight, bias, mask=mask, dropout=dropout, seed=seed
        )

    n = math.prod(lead)
    training = needs_grad(xs, weight, bias)
    widest = max(int(x.shape[-1]) for x in xs)
    backend = _choose(first, len(xs), n * k, training, dropout, widest)
    if backend == "reference":
        return reference.tensor_fusion(xs, weight, bias, mask, dropout, seed)

    if len(lead) == 1:  # rows already: no reshape (a view, but a call each)
        xs2, mask2 = list(xs), mask
    else:
        xs2 = [x.reshape(n, x.shape[-1]) for x in xs]
        mask2 = None if mask is None else mask.reshape(n, len(xs))
    if _eager.traced(first):  # the custom ops: what compiled graphs, exports and fake tensors take
        if weight is None:
            out = torch.ops.fusionops.tensor_fusion_features(xs2, mask2, backend)
        elif dropout == 0:  # the graph of a call without dropout stays what it was
            out = torch.ops.fusionops.tensor_fusion_projected(xs2, weight, bias, mask2, backend)
        else:
            drop = (dropout, seed)
            out = torch.ops.fusionops.tensor_fusion_projected(xs2, weight, bias, mask2, backend, *drop)
    elif weight is None:
        out = _eager.apply(_FeaturesCall(_kernels(backend), len(xs)), (*xs2, mask2))
    elif backend == "triton":
        call = _ProjectedCall(_kernels(backend), len(xs), dropout, seed)
        out = _eager.apply(call, (*xs2, weight, bias, mask2))
    else:  # cpu, cuda
        out = _compiled_projected(xs2, weight, bias, mask2, dropout, seed, training)
    return out if len(lead) == 1 else out.reshape(*lead, out.shape[-1])
