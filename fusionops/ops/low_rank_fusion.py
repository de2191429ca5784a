"""Low-rank fusion op (DESIGN.md section 2): checks, backend choice, autograd, fake kernels.

``fusionops::low_rank_fusion(xs, factors, rank_weight, bias, mask, backend) -> y`` and its
backward op carry the fused implementations; the ``reference`` backend is served by
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
from fusionops._checks import (
    check_grad,
    check_like,
    check_mask,
    check_modalities,
    check_rows,
    check_shape,
    plain_cpu_like,
    plain_cpu_modalities,
)
from fusionops.ops import _autocast, _eager
from fusionops.ops._eager import EagerCall
from fusionops.ops._kernels import LowRankFusionKernels, empty_grad
from fusionops.registry import OpDef, needs_grad, register

OP = "low_rank_fusion"


class _CompiledKernels:
    """The kernels of ``fusionops._C`` behind the kernel contract: one schema each, C++ for CPU
    tensors and CUDA C++ for CUDA tensors (the dispatcher picks by device)."""

    def forward(
        self,
        xs: list[Tensor],
        factors: list[Tensor],
        rank_weight: Tensor,
        bias: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        return torch.ops.fusionops._lmf_fwd.default(xs, factors, rank_weight, bias, mask)

    def backward(
        self,
        grad: Tensor,
        xs: list[Tensor],
        factors: list[Tensor],
        rank_weight: Tensor,
        mask: Tensor | None,
        need_dx: bool,
        need_dfactors: bool,
        need_dw: bool,
        need_db: bool,
    ) -> tuple[list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
        dxs, dfs, dw, db = torch.ops.fusionops._lmf_bwd.default(
            grad, xs, factors, rank_weight, mask, need_dx, need_dfactors, need_dw, need_db
        )
        return list(dxs), list(dfs), dw, db


# Automatic choice on CPU, on N * R * O * M: the fused kernels were never lost at any measured
# size (from 3072), forward or with gradients (1.0-2.1x).
# The rule: a size is "lost" when fused[cpu] was slower than the reference there in both of two
# runs of `python -m benchmarks.crossover` (a single reading is within this machine's run-to-run
# noise of about 10%); each threshold is the smallest measured size from which nothing is lost.
# CSVs: benchmarks/results/crossover_<op>_cpu_2026-12-04_run{1,2}.csv.
CPU_FUSED_MIN_ELEMENTS = 0
CPU_FUSED_MIN_ELEMENTS_FORWARD = 0

OPDEF = register(
    OpDef(
        name=OP,
        reference=reference.low_rank_fusion,
        compiled=_CompiledKernels(),
        kernels=("_lmf_fwd", "_lmf_bwd"),
        triton_module="low_rank_fusion",
        size_metric="N*R*O*M",
        cpu_min_size=CPU_FUSED_MIN_ELEMENTS,
        cpu_min_size_forward=CPU_FUSED_MIN_ELEMENTS_FORWARD,
        cuda_kernels=True,
        autocast="lower",
    )
)


def _kernels(backend: str) -> LowRankFusionKernels:
    return cast(LowRankFusionKernels, OPDEF.kernels_for(backend))


class _Call(EagerCall):
    """Eager low-rank fusion: flat = (*xs, *factors, rank_weight, bias, mask)."""

    op = OP

    __slots__ = ("m",)

    def __init__(self, kernels: LowRankFusionKernels, m: int) -> None:
        super().__init__(kernels)
        self.m = m

    def forward(self, flat):
        m = self.m
        xs, factors = list(flat[:m]), list(flat[m : 2 * m])
        return self.kernels.forward(xs, factors, flat[2 * m], flat[2 * m + 1], flat[2 * m + 2]).contiguous()

    def saved(self, flat):
        m = self.m
        return (*flat[: 2 * m + 1], None, flat[2 * m + 2])  # the bias is not read by backward

    def backward(self, grad, flat, needs):
        m = self.m
        need_dx, need_df = any(needs[:m]), any(needs[m : 2 * m])
        need_dw, need_db = needs[2 * m], needs[2 * m + 1]
        dxs, dfs, dw, db = self.kernels.backward(
            grad, list(flat[:m]), list(flat[m : 2 * m]), flat[2 * m], flat[2 * m + 2],
            need_dx, need_df, need_dw, need_db,
        )  # fmt: skip
        dxs = (
            [d.contiguous() if n else None for d, n in zip(dxs, needs, strict=False)]
            if need_dx
            else [None] * m
        )
        dfs = (
            [d.contiguous() if n else None for d, n in zip(dfs, needs[m:], strict=False)]
            if need_df
            else [None] * m
        )
        return (*dxs, *dfs, dw.contiguous() if need_dw else None, db.contiguous() if need_db else None, None)

    def reference_grads(self, grad, flat, needs):
        m = self.m
        grads = _reference_grads(
            grad, list(flat[:m]), list(flat[m : 2 * m]), flat[2 * m], flat[2 * m + 2], needs[: 2 * m + 1]
        )
        return (*grads, grad.sum(0) if needs[2 * m + 1] else None, None)  # bias: not saved; dy/db = 1


def _reference_grads(
    grad: Tensor, xs: list[Tensor], factors: list[Tensor], rank_weight: Tensor, mask: Tensor | None, needs
) -> list[Tensor | None]:
    """Second order: gradients of xs, factors and rank_weight through the reference, without the
    bias (it only shifts y; see ops/_eager.py)."""
    return _eager.grads_through(
        lambda: reference.low_rank_fusion(xs, factors, rank_weight, None, mask),
        grad,
        [*xs, *factors, rank_weight],
        needs,
    )


@torch.library.custom_op("fusionops::low_rank_fusion", mutates_args=())
def _fused(
    xs: list[Tensor],
    factors: list[Tensor],
    rank_weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    backend: str,
) -> Tensor:
    kernels = _entry(xs, factors, rank_weight, bias, mask, backend)
    return kernels.forward(xs, factors, rank_weight, bias, mask).contiguous()


@_fused.register_fake
def _fused_fake(
    xs: list[Tensor],
    factors: list[Tensor],
    rank_weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    backend: str,
) -> Tensor:
    return xs[0].new_empty(xs[0].shape[0], factors[0].shape[2])


@torch.library.custom_op("fusionops::low_rank_fusion_backward", mutates_args=())
def _fused_backward(
    grad: Tensor,
    xs: list[Tensor],
    factors: list[Tensor],
    rank_weight: Tensor,
    mask: Tensor | None,
    need_dx: bool,
    need_dfactors: bool,
    need_dw: bool,
    need_db: bool,
    backend: str,
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    kernels = _entry(xs, factors, rank_weight, None, mask, backend, grad)
    dxs, dfs, dw, db = kernels.backward(
        grad, xs, factors, rank_weight, mask, need_dx, need_dfactors, need_dw, need_db
    )
    return (
        [d.contiguous() for d in dxs] if need_dx else [],
        [d.contiguous() for d in dfs] if need_dfactors else [],
        dw.contiguous() if need_dw else empty_grad(rank_weight),
        db.contiguous() if need_db else empty_grad(rank_weight),
    )


@_fused_backward.register_fake
def _fused_backward_fake(
    grad: Tensor,
    xs: list[Tensor],
    factors: list[Tensor],
    rank_weight: Tensor,
    mask: Tensor | None,
    need_dx: bool,
    need_dfactors: bool,
    need_dw: bool,
    need_db: bool,
    backend: str,
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    return (
        [x.new_empty(x.shape) for x in xs] if need_dx else [],
        [f.new_empty(f.shape) for f in factors] if need_dfactors else [],
        rank_weight.new_empty(rank_weight.shape) if need_dw else empty_grad(rank_weight),
        rank_weight.new_empty(factors[0].shape[2]) if need_db else empty_grad(rank_weight),
    )


def _setup(ctx, inputs, output) -> None:
    xs, factors, rank_weight, bias, mask, backend = inputs
    ctx.n_xs = len(xs)
    ctx.backend = backend
    ctx.has_bias = bias is not None
    # The inputs only: the kernels recompute the projections in backward.
    ctx.save_for_backward(*xs, *factors, rank_weight, mask)


def _grad(ctx, grad: Tensor):
    saved = ctx.saved_tensors
    m = ctx.n_xs
    xs, factors = list(saved[:m]), list(saved[m : 2 * m])
    rank_weight, mask = saved[2 * m], saved[2 * m + 1]
    need_dx = any(ctx.needs_input_grad[0])  # lists: one flag per tensor
    need_df = any(ctx.needs_input_grad[1])
    need_dw = bool(ctx.needs_input_grad[2])
    need_db = ctx.has_bias and bool(ctx.needs_input_grad[3])
    if torch.is_grad_enabled():  # create_graph=True
        needs = [*ctx.needs_input_grad[0], *ctx.needs_input_grad[1], need_dw]
        grads = _reference_grads(grad, xs, factors, rank_weight, mask, needs)
        return grads[:m], grads[m : 2 * m], grads[2 * m], grad.sum(0) if need_db else None, None, None
    dxs, dfs, dw, db = torch.ops.fusionops.low_rank_fusion_backward(
        grad, xs, factors, rank_weight, mask, need_dx, need_df, need_dw, need_db, ctx.backend
    )
    return (
        list(dxs) if need_dx else [None] * m,
        list(dfs) if need_df else [None] * m,
        dw if need_dw else None,
        db if need_db else None,
        None,
        None,
    )


_fused.register_autograd(_grad, setup_context=_setup)
for _name in ("low_rank_fusion", "low_rank_fusion_backward"):
    _autocast.register(_name, OPDEF.autocast)


def check_factors(op: str, factors: Sequence[Tensor], dims: Sequence[int], like: Tensor) -> tuple[int, int]:
    """``factors[m]`` must be ``(R, d_m + 1, O)`` with one R and one O; returns ``(R, O)``."""
    if isinstance(factors, Tensor) or not isinstance(factors, (list, tuple)):
        raise TypeError(
            f"{op}: factors must be a list or tuple of tensors (one (R, d_m + 1, O) per modality), "
            f"got {type(factors).__name__}"
        )
    if len(factors) != len(dims):
        raise ValueError(
            f"{op}: factors has {len(factors)} tensors but xs has {len(dims)} modalities; "
            "expected one factor (R, d_m + 1, O) per modality"
        )
    rank = out = None
    for m, (factor, d) in enumerate(zip(factors, dims, strict=True)):
        name = f"factors[{m}]"
        check_like(op, name, factor, like)
        if factor.dim() != 3 or factor.shape[1] != d + 1:
            raise ValueError(
                f"{op}: {name} must have shape (R, d_{m} + 1, O) = (R, {d + 1}, O) for xs[{m}] of "
                f"width {d}, got {tuple(factor.shape)}"
            )
        if rank is None:
            rank, out = int(factor.shape[0]), int(factor.shape[2])
            if rank < 1 or out < 1:
                raise ValueError(
                    f"{op}: factors[0] must have rank R >= 1 and output O >= 1, got {tuple(factor.shape)}"
                )
        elif factor.shape[0] != rank or factor.shape[2] != out:
            raise ValueError(
                f"{op}: {name} has shape {tuple(factor.shape)}, so rank {factor.shape[0]} and output "
                f"{factor.shape[2]}, but factors[0] has rank {rank} and output {out}; every factor "
                "must share R and O"
            )
    assert rank is not None and out is not None
    return rank, out


def _check_args(
    xs: Sequence[Tensor],
    factors: Sequence[Tensor],
    rank_weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
) -> tuple[torch.Size, int, int]:
    """Every argument of a call; returns the leading shape, R and O."""
    lead, dims = check_modalities(OP, xs)
    first = xs[0]
    rank, out = check_factors(OP, factors, dims, first)
    check_like(OP, "rank_weight", rank_weight, first)
    check_shape(OP, "rank_weight", rank_weight, (rank,), " (R, the rank of the factors)")
    if bias is not None:
        check_like(OP, "bias", bias, first)
        check_shape(OP, "bias", bias, (out,), " (O, the last dim of the factors)")
    check_mask(OP, mask, lead, len(xs), first.device)
    return lead, rank, out


def _entry(
    xs: list[Tensor],
    factors: list[Tensor],
    rank_weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    backend: str,
    grad: Tensor | None = None,
) -> LowRankFusionKernels:
    """A registered op's checks (its arguments are rows; ``grad``: the backward op's upstream
    gradient), then the kernels of ``backend``."""
    lead, _, out = _check_args(xs, factors, rank_weight, bias, mask)
    n = check_rows(OP, lead)
    if grad is not None:
        check_grad(OP, grad, (n, out), xs[0])
    return cast(LowRankFusionKernels, entry_kernels(OPDEF, backend, xs[0].device, xs[0].dtype, len(xs)))


def _eager_cpu(
    xs: Sequence[Tensor], factors: Sequence[Tensor], rank_weight: Tensor, bias: Tensor | None
) -> Tensor | None:
    """The common eager call at a fraction of the full path's cost (issue 15: the full checks
    cost about 7 µs a call): plain CPU tensors of one float dtype, rows ``(N, d_m >= 1)``,
    factors ``(R, d_m + 1, O)`` with R, O >= 1, ``rank_weight (R,)``, bias ``(O,)`` or None, no
    mask, no autocast, not traced. One pass accepts exactly such a call; anything else (every
    malformed call included: the full path names what is wrong) returns None and takes the full
    path, which decides the same way."""
    dtype = plain_cpu_modalities(xs)
    if dtype is None or not plain_cpu_like(rank_weight, dtype):
        return None
    if bias is not None and not plain_cpu_like(bias, dtype):
        return None
    if (type(factors) is not list and type(factors) is not tuple) or len(factors) != len(xs):
        return None
    first = factors[0]
    if not plain_cpu_like(first, dtype) or first.dim() != 3:
        return None
    rank, _, out = first.shape
    if rank < 1 or out < 1 or rank_weight.shape != (rank,) or (bias is not None and bias.shape != (out,)):
        return None
    n = -1
    for x, factor in zip(xs, factors, strict=True):
        s = x.shape
        if len(s) != 2 or s[1] == 0 or (s[0] != n and n >= 0) or not plain_cpu_like(factor, dtype):
            return None
        n = s[0]
        if factor.shape != (rank, s[1] + 1, out):
            return None
    m = len(xs)
    backend = _backend.choose_cpu_eager(
        OPDEF, m, n * rank * out * m, needs_grad(xs, factors, rank_weight, bias)
    )
    if backend is None:
        return None
    if backend == "reference":
        return reference.low_rank_fusion(xs, factors, rank_weight, bias)
    return _eager.apply(_Call(_kernels(backend), m), (*xs, *factors, rank_weight, bias, None))


def low_rank_fusion(
    xs: Sequence[Tensor],
    factors: Sequence[Tensor],
    rank_weight: Tensor,
    bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Low-rank multimodal fusion of M modalities (Liu et al. 2018; DESIGN.md section 2).

    ``y = Σ_r w_r · Π_m (z_m F_m[r]) + b`` with ``z_m = [1, x_m]`` and ``Π`` elementwise: the
    tensor-fusion projection whose weight is the rank-R CP tensor ``Σ_r w_r ⊗_m F_m[r]``.

    Args:
        xs: M >= 1 tensors ``x_m`` of shape ``(*, d_m)`` sharing the leading shape, dtype and
            device.
        factors: M tensors ``F_m`` of shape ``(R, d_m + 1, O)`` (the original LMF layout; row
            0 of the middle dim multiplies the prepended 1).
        rank_weight: ``(R,)``, the weights ``w_r`` of the rank-1 terms.
        bias: optional ``(O,)``.
        mask: optional bool ``(*, M)``; False marks a missing modality, which contributes
            ``[1, 0…0]`` (its values are ignored, NaN included) and gets zero gradient.

    Returns:
        ``(*, O)``. The fused kernels never hold every row's projections ``(*, R, O)``: they
        work on blocks of rows and recompute in backward.
    """
    if mask is None:
        y = _eager_cpu(xs, factors, rank_weight, bias)
        if y is not None:
            return y
    lead, rank, out = _check_args(xs, factors, rank_weight, bias, mask)
    first = xs[0]

    if _autocast.enabled(first.device):
        return _autocast.call_without_autocast(
            OPDEF.autocast, first.device, low_rank_fusion, xs, factors, rank_weight, bias, mask=mask
        )
    n = math.prod(lead)
    backend = _backend.choose(
        OPDEF,
        first.device,
        first.dtype,
        len(xs),
        n * rank * out * len(xs),
        needs_grad(xs, factors, rank_weight, bias),
    )
    if backend == "reference":
        return reference.low_rank_fusion(xs, factors, rank_weight, bias, mask)
    xs2 = [x.reshape(n, x.shape[-1]) for x in xs]
    mask2 = None if mask is None else mask.reshape(n, len(xs))
    if _eager.traced(xs2[0]):  # the custom op: what compiled graphs, exports and fake tensors take
        y = torch.ops.fusionops.low_rank_fusion(xs2, list(factors), rank_weight, bias, mask2, backend)
    else:
        call = _Call(_kernels(backend), len(xs))
        y = _eager.apply(call, (*xs2, *factors, rank_weight, bias, mask2))
    return y.reshape(*lead, out)
