"""Multiple kernel fusion op (DESIGN.md section 5): checks, backend choice, autograd, fake kernels.

``fusionops::multiple_kernel(xs_a, xs_b, beta, kinds, params, degrees, backend) -> K`` and its
backward op carry the fused implementations; the ``reference`` backend is served by
``fusionops.reference`` directly, with PyTorch's own autograd. Base kernels are given as
described in :mod:`fusionops.base_kernels`; the op passes them to the kernels as kind codes,
one parameter tensor (γ or c per modality, so gradients reach tensor parameters) and degrees.
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
    check_modalities,
    check_shape,
    plain_cpu_like,
    plain_cpu_modalities,
    values_readable,
)
from fusionops.base_kernels import KIND_CODES, BaseKernel, KernelSpec, as_base_kernels, kernel_params
from fusionops.ops import _autocast, _eager
from fusionops.ops._eager import EagerCall
from fusionops.ops._kernels import MultipleKernelKernels, empty_grad
from fusionops.registry import OpDef, needs_grad, register

OP = "multiple_kernel"


class _CompiledKernels:
    """The C++ kernels of ``fusionops._C`` behind the kernel contract (no CUDA C++ ones yet)."""

    def forward(
        self,
        xs_a: list[Tensor],
        xs_b: list[Tensor],
        beta: Tensor,
        kinds: list[int],
        params: Tensor,
        degrees: list[int],
    ) -> Tensor:
        return torch.ops.fusionops._mkl_fwd.default(xs_a, xs_b, beta, kinds, params, degrees)

    def backward(
        self,
        grad: Tensor,
        xs_a: list[Tensor],
        xs_b: list[Tensor],
        beta: Tensor,
        kinds: list[int],
        params: Tensor,
        degrees: list[int],
        needs: list[bool],
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        dxa, dxb, dbeta, dparams = torch.ops.fusionops._mkl_bwd.default(
            grad, xs_a, xs_b, beta, kinds, params, degrees, needs
        )
        return list(dxa), list(dxb), dbeta, dparams


# Automatic choice on CPU: below CPU_FUSED_MIN_ELEMENTS output elements (N_a * N_b) the
# reference is used. The reference's cost per output element (one pass over an (N_a, N_b)
# matrix per step of every base kernel) is what the fused kernel saves, so output elements,
# not GEMM work, predict the crossover.
# `python -m benchmarks.crossover --op multiple_kernel` (CSV in benchmarks/results/).
# With gradients, mixed kinds on widths (128, 64, 300) lost by 2-4% up to N_a*N_b = 2^18 in both
# runs (RBF and narrow widths won from 64); forward alone is never lost from 2^14.
# The rule: a size is "lost" when fused[cpu] was slower than the reference there in both of two
# runs of `python -m benchmarks.crossover` (a single reading is within this machine's run-to-run
# noise of about 10%); each threshold is the smallest measured size from which nothing is lost.
# CSVs: benchmarks/results/crossover_<op>_cpu_2026-12-04_run{1,2}.csv.
# With gradients, modalities at most 32 wide (16x8x32, mixed and RBF) won at every measured size
# from 64 output elements in both runs (1.03-2.45x): such calls are fused at any size.
# Re-measured with plain calls (the sweep's fused way is the public call a user makes, not a
# backend('cpu') block per call, about 5 µs less a call; *_run{3,4}_plain.csv): inference lost only
# at 64 output elements in both (mixed kinds, 0.90-0.96x), so its threshold moved from 2^14 to the
# next measured size, 1024. With gradients nothing was lost in both of these runs, but runs 1 and 2
# lost by 2-4% up to 2^18 (mixed, widths 128x64x300): the rule with gradients is kept.
# With the eager call's parameter vector cached (2026-12-05, about 8 µs a call less), inference
# was never lost at any measured size in either of two runs (1.04-9.9x from 64 output elements,
# *_2026-12-05_run{1,2}.csv): inference is fused at every size. With gradients one run lost by
# 2-3% at 65536 and 147456 (mixed, 128x64x300) and the other nothing: the rule is kept.
# With the small-problem forward (plain loops, runs 3 and 4 of 2026-12-05): inference 1.13-17x
# everywhere; with gradients 128x64x300 mixed lost at 147456 in both (0.97-0.99x) and won from
# 262144, which runs 1 and 2 of 2026-12-04 lost: the rule with gradients stays.
CPU_FUSED_MIN_ELEMENTS = 1 << 20
CPU_FUSED_MIN_ELEMENTS_FORWARD = 0
CPU_NARROW_WIDTH = 32

OPDEF = register(
    OpDef(
        name=OP,
        reference=reference.multiple_kernel,
        compiled=_CompiledKernels(),
        kernels=("_mkl_fwd", "_mkl_bwd"),
        triton_module="multiple_kernel",
        size_metric="N_a*N_b",
        cpu_min_size=CPU_FUSED_MIN_ELEMENTS,
        cpu_min_size_forward=CPU_FUSED_MIN_ELEMENTS_FORWARD,
        cpu_narrow_width=CPU_NARROW_WIDTH,
        autocast="keep",
    )
)


def _kernels(backend: str) -> MultipleKernelKernels:
    return cast(MultipleKernelKernels, OPDEF.kernels_for(backend))


class _Call(EagerCall):
    """Eager multiple kernel fusion: flat = (*xs_a, *xs_b, beta, params). In the symmetric
    case (``xs_b`` holds the tensors of ``xs_a``) the kernels get ``xs_a`` twice, so they see
    it; autograd adds the gradients of both uses."""

    op = OP

    __slots__ = ("m", "kinds", "degrees", "symmetric")

    def __init__(self, kernels, m: int, kinds: list[int], degrees: list[int], symmetric: bool) -> None:
        super().__init__(kernels)
        self.m, self.kinds, self.degrees, self.symmetric = m, kinds, degrees, symmetric

    def _sides(self, flat):
        m = self.m
        xs_a = list(flat[:m])
        return xs_a, (xs_a if self.symmetric else list(flat[m : 2 * m]))

    def forward(self, flat):
        xs_a, xs_b = self._sides(flat)
        m = self.m
        return self.kernels.forward(
            xs_a, xs_b, flat[2 * m], self.kinds, flat[2 * m + 1], self.degrees
        ).contiguous()

    def backward(self, grad, flat, needs):
        m = self.m
        xs_a, xs_b = self._sides(flat)
        flags = [any(needs[:m]), any(needs[m : 2 * m]), bool(needs[2 * m]), bool(needs[2 * m + 1])]
        dxa, dxb, dbeta, dparams = self.kernels.backward(
            grad, xs_a, xs_b, flat[2 * m], self.kinds, flat[2 * m + 1], self.degrees, flags
        )
        dxa = (
            [d.contiguous() if n else None for d, n in zip(dxa, needs, strict=False)]
            if flags[0]
            else [None] * m
        )
        dxb = (
            [d.contiguous() if n else None for d, n in zip(dxb, needs[m:], strict=False)]
            if flags[1]
            else [None] * m
        )
        return (
            *dxa,
            *dxb,
            dbeta.contiguous() if flags[2] else None,
            dparams.contiguous() if flags[3] else None,
        )


@torch.library.custom_op("fusionops::multiple_kernel", mutates_args=())
def _fused(
    xs_a: list[Tensor],
    xs_b: list[Tensor],
    beta: Tensor,
    kinds: list[int],
    params: Tensor,
    degrees: list[int],
    backend: str,
) -> Tensor:
    kernels = _entry(xs_a, xs_b, beta, kinds, params, degrees, backend)
    return kernels.forward(xs_a, xs_b, beta, kinds, params, degrees).contiguous()


@_fused.register_fake
def _fused_fake(
    xs_a: list[Tensor],
    xs_b: list[Tensor],
    beta: Tensor,
    kinds: list[int],
    params: Tensor,
    degrees: list[int],
    backend: str,
) -> Tensor:
    return xs_a[0].new_empty(xs_a[0].shape[0], xs_b[0].shape[0])


@torch.library.custom_op("fusionops::multiple_kernel_backward", mutates_args=())
def _fused_backward(
    grad: Tensor,
    xs_a: list[Tensor],
    xs_b: list[Tensor],
    beta: Tensor,
    kinds: list[int],
    params: Tensor,
    degrees: list[int],
    needs: list[bool],
    backend: str,
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    kernels = _entry(xs_a, xs_b, beta, kinds, params, degrees, backend, grad)
    dxa, dxb, dbeta, dparams = kernels.backward(grad, xs_a, xs_b, beta, kinds, params, degrees, needs)
    return (
        [d.contiguous() for d in dxa] if needs[0] else [],
        [d.contiguous() for d in dxb] if needs[1] else [],
        dbeta.contiguous() if needs[2] else empty_grad(beta),
        dparams.contiguous() if needs[3] else empty_grad(params),
    )


@_fused_backward.register_fake
def _fused_backward_fake(
    grad: Tensor,
    xs_a: list[Tensor],
    xs_b: list[Tensor],
    beta: Tensor,
    kinds: list[int],
    params: Tensor,
    degrees: list[int],
    needs: list[bool],
    backend: str,
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    return (
        [x.new_empty(x.shape) for x in xs_a] if needs[0] else [],
        [x.new_empty(x.shape) for x in xs_b] if needs[1] else [],
        beta.new_empty(beta.shape) if needs[2] else empty_grad(beta),
        params.new_empty(params.shape) if needs[3] else empty_grad(params),
    )


def _setup(ctx, inputs, output) -> None:
    xs_a, xs_b, beta, kinds, params, degrees, backend = inputs
    ctx.m = len(xs_a)
    ctx.kinds, ctx.degrees, ctx.backend = kinds, degrees, backend
    # The inputs only: backward recomputes the Gram tiles.
    ctx.save_for_backward(*xs_a, *xs_b, beta, params)


def _grad(ctx, grad: Tensor):
    if torch.is_grad_enabled():  # create_graph=True
        raise _eager.no_double_backward(OP)
    saved = ctx.saved_tensors
    m = ctx.m
    xs_a, xs_b = list(saved[:m]), list(saved[m : 2 * m])
    beta, params = saved[2 * m], saved[2 * m + 1]
    needs = [
        any(ctx.needs_input_grad[0]),  # lists: one flag per tensor
        any(ctx.needs_input_grad[1]),
        bool(ctx.needs_input_grad[2]),
        bool(ctx.needs_input_grad[4]),
    ]
    dxa, dxb, dbeta, dparams = torch.ops.fusionops.multiple_kernel_backward(
        grad, xs_a, xs_b, beta, ctx.kinds, params, ctx.degrees, needs, ctx.backend
    )
    return (
        list(dxa) if needs[0] else [None] * m,
        list(dxb) if needs[1] else [None] * m,
        dbeta if needs[2] else None,
        None,
        dparams if needs[3] else None,
        None,
        None,
    )


_fused.register_autograd(_grad, setup_context=_setup)
for _name in ("multiple_kernel", "multiple_kernel_backward"):
    _autocast.register(_name, OPDEF.autocast)


def _check_sides(xs_a: Sequence[Tensor], xs_b: Sequence[Tensor]) -> list[int]:
    """Both sides are lists of 2-D modality tensors that agree in count, widths, dtype, device."""
    _, dims = check_modalities(OP, xs_a, "xs_a")
    check_modalities(OP, xs_b, "xs_b")
    if len(xs_b) != len(xs_a):
        raise ValueError(
            f"{OP}: xs_b has {len(xs_b)} modalities but xs_a has {len(xs_a)}; "
            "both sides must hold the same modalities"
        )
    for m, (a, b) in enumerate(zip(xs_a, xs_b, strict=True)):
        for name, x in (("xs_a", a), ("xs_b", b)):
            if x.dim() != 2:
                raise ValueError(f"{OP}: {name}[{m}] must have shape (N, d_{m}), got {tuple(x.shape)}")
        if b.shape[1] != a.shape[1]:
            raise ValueError(
                f"{OP}: xs_b[{m}] has width {b.shape[1]} but xs_a[{m}] has {a.shape[1]}; a "
                "modality's base kernel compares vectors of one width"
            )
        check_like(OP, f"xs_b[{m}]", b, xs_a[0])
    return dims


def _check_beta(beta: Tensor, modalities: int, like: Tensor) -> None:
    check_like(OP, "beta", beta, like)
    check_shape(OP, "beta", beta, (modalities,), " (one weight per modality)")
    _check_beta_values(beta)


def _check_beta_values(beta: Tensor) -> None:
    """beta's weights are finite and >= 0 (where its values can be read)."""
    if not values_readable(beta):  # traced, meta or vmapped: no values to check here
        return
    values = beta.detach().tolist()  # M numbers: one transfer, checked on the host
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{OP}: beta must be finite, got {values}")
    if any(v < 0 for v in values):
        raise ValueError(
            f"{OP}: beta must be >= 0 (a negative weight can make the combined kernel "
            f"indefinite), got {values}"
        )


_KIND_NAMES = {code: kind for kind, code in KIND_CODES.items()}  # what the kernels' codes mean


def _check_codes(kinds: list[int], params: Tensor, degrees: list[int], modalities: int, like: Tensor) -> None:
    """The registered op's encoded base kernels (what :func:`kernel_params` and
    ``BaseKernel.code`` produce): one kind code, parameter and degree per modality."""
    codes = _KIND_NAMES
    if len(kinds) != modalities or any(k not in codes for k in kinds):
        raise ValueError(
            f"{OP}: kinds must hold one code per modality ({modalities}) from {codes}, got {list(kinds)}"
        )
    if len(degrees) != modalities:
        raise ValueError(f"{OP}: degrees must hold one int per modality ({modalities}), got {list(degrees)}")
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if not isinstance(params, Tensor) or params.dtype != dtype or params.device != like.device:
        raise TypeError(
            f"{OP}: params must be a {dtype} tensor on {like.device} (γ or c per modality, as "
            f"kernel_params builds it), got "
            + (f"{params.dtype} on {params.device}" if isinstance(params, Tensor) else type(params).__name__)
        )
    check_shape(OP, "params", params, (modalities,), " (one γ or c per modality)")
    values = params.detach().tolist()
    for m, (kind, value, degree) in enumerate(zip(kinds, values, degrees, strict=True)):
        if not math.isfinite(value):
            raise ValueError(f"{OP}: params[{m}] must be finite, got {value}")
        if codes[kind] == "rbf" and value <= 0:
            raise ValueError(f"{OP}: params[{m}] (γ of an RBF kernel) must be > 0, got {value:g}")
        if codes[kind] == "polynomial" and degree < 1:
            raise ValueError(f"{OP}: degrees[{m}] (of a polynomial kernel) must be >= 1, got {degree}")


def _entry(
    xs_a: list[Tensor],
    xs_b: list[Tensor],
    beta: Tensor,
    kinds: list[int],
    params: Tensor,
    degrees: list[int],
    backend: str,
    grad: Tensor | None = None,
) -> MultipleKernelKernels:
    """A registered op's checks (``grad``: the backward op's upstream gradient), then the
    kernels of ``backend``."""
    dims = _check_sides(xs_a, xs_b)
    first = xs_a[0]
    _check_beta(beta, len(dims), first)
    _check_codes(kinds, params, degrees, len(dims), first)
    if grad is not None:
        check_grad(OP, grad, (first.shape[0], xs_b[0].shape[0]), first)
    return cast(MultipleKernelKernels, entry_kernels(OPDEF, backend, first.device, first.dtype, len(dims)))


def multiple_kernel(
    xs_a: Sequence[Tensor],
    xs_b: Sequence[Tensor] | None,
    beta: Tensor,
    kernels: Sequence[KernelSpec],
) -> Tensor:
    """Multiple kernel fusion (Lanckriet et al. 2004; Gönen & Alpaydın 2011; DESIGN.md section 5).

    ``K[i, j] = Σ_m β_m k_m(xs_a[m][i], xs_b[m][j])``: one base kernel per modality, combined
    with non-negative weights.

    Args:
        xs_a: M >= 1 tensors ``(N_a, d_m)`` of one dtype and device.
        xs_b: M tensors ``(N_b, d_m)`` (same widths as ``xs_a``), or None for ``xs_a`` itself
            (the training Gram matrix; passing ``xs_a`` again is the same).
        beta: ``(M,)`` weights ``β_m >= 0`` of the dtype of xs.
        kernels: one base kernel per modality: ``"linear"``, ``"rbf"``, ``"polynomial"``, a
            :class:`fusionops.BaseKernel` or a dict (see :mod:`fusionops.base_kernels`). RBF is
            ``exp(-γ‖a - b‖²)`` (γ defaults to ``1/d_m``), polynomial ``(a·b + c)^p``.

    Returns:
        ``(N_a, N_b)``. The fused kernels build each output tile for all modalities at once and
        never hold the M Gram matrices. Gradients reach xs_a, xs_b, beta and tensor-valued γ/c.
    """
    if xs_b is None:
        xs_b = xs_a
    dims = _one_pass_sides(xs_a, xs_b, beta)
    # the common eager call: the full path's checks and choice, cheaper (not while torch.compile
    # traces, nor inside a torch.func transform: beta has no values to read there)
    if dims is not None and not (torch.compiler.is_compiling() or _backend.functorch_active()):
        # beta's values: one host read (a plain CPU tensor: readable); the full check names a bad one
        if not all(0.0 <= v < math.inf for v in beta.tolist()):  # type: ignore[union-attr]
            _check_beta_values(beta)
        specs = as_base_kernels(OP, kernels, len(dims))
        size = xs_a[0].shape[0] * xs_b[0].shape[0]
        training = _training(xs_a, xs_b, beta, specs)
        backend = _backend.choose_cpu_eager(OPDEF, len(dims), size, training, max(dims))
        if backend is not None:
            return _run(xs_a, xs_b, beta, specs, dims, backend)
    dims = _check_sides(xs_a, xs_b)
    first = xs_a[0]
    _check_beta(beta, len(dims), first)
    specs = as_base_kernels(OP, kernels, len(dims))
    if _autocast.enabled(first.device):
        return _autocast.call_without_autocast(
            OPDEF.autocast, first.device, multiple_kernel, xs_a, xs_b, beta, specs
        )
    size = first.shape[0] * xs_b[0].shape[0]
    training = _training(xs_a, xs_b, beta, specs)
    backend = _backend.choose(OPDEF, first.device, first.dtype, len(dims), size, training, max(dims))
    return _run(xs_a, xs_b, beta, specs, dims, backend)


def _training(xs_a: Sequence[Tensor], xs_b: Sequence[Tensor], beta: Tensor, specs: list[BaseKernel]) -> bool:
    return needs_grad(xs_a, xs_b, beta, [k.gamma for k in specs], [k.offset for k in specs])


# Eager calls' constant parameter vectors (every γ and c a number), by their values, dtype and
# device: building one (torch.tensor) costs about 4 µs, a fifth of a tiny call's kernel (issue
# 15). The kernels only read it, and it never requires grad. Bounded: cleared when full.
_CONSTANT_PARAMS: dict[tuple[object, ...], Tensor] = {}
_CONSTANT_PARAMS_MAX = 64


def _eager_params(specs: list[BaseKernel], dims: list[int], like: Tensor) -> Tensor:
    """:func:`kernel_params` for an eager call, cached when no parameter is a tensor."""
    values = tuple(k.param(d) for k, d in zip(specs, dims, strict=True))
    if any(isinstance(v, Tensor) for v in values):
        return kernel_params(specs, dims, like)
    key = (values, like.dtype == torch.float64, like.device)
    params = _CONSTANT_PARAMS.get(key)
    if params is None:
        if len(_CONSTANT_PARAMS) >= _CONSTANT_PARAMS_MAX:
            _CONSTANT_PARAMS.clear()
        with torch.inference_mode(False):  # a later call that records a gradient saves it
            params = _CONSTANT_PARAMS[key] = kernel_params(specs, dims, like)
    return params


def _run(
    xs_a: Sequence[Tensor],
    xs_b: Sequence[Tensor],
    beta: Tensor,
    specs: list[BaseKernel],
    dims: list[int],
    backend: str,
) -> Tensor:
    """A checked call on ``backend``."""
    first = xs_a[0]
    if backend == "reference":
        return reference.multiple_kernel(xs_a, xs_b, beta, specs)
    kinds = [k.code for k in specs]
    degrees = [k.degree if k.kind == "polynomial" else 0 for k in specs]
    if _eager.traced(first):  # the custom op: what compiled graphs, exports and fake tensors take
        params = kernel_params(specs, dims, first)
        return torch.ops.fusionops.multiple_kernel(
            list(xs_a), list(xs_b), beta, kinds, params, degrees, backend
        )
    params = _eager_params(specs, dims, first)
    symmetric = all(b is a for a, b in zip(xs_a, xs_b, strict=True))
    call = _Call(_kernels(backend), len(dims), kinds, degrees, symmetric)
    return _eager.apply(call, (*xs_a, *xs_b, beta, params))


def _one_pass_sides(xs_a: object, xs_b: object, beta: object) -> list[int] | None:
    """The widths when both sides and beta form the common eager call (issue 15: the full
    checks cost as much as the reference at research sizes): plain CPU tensors of one float
    dtype, rows (N_a, d_m) and (N_b, d_m) with d_m >= 1, beta (M,); else None, and the full
    path decides and names what is wrong. (beta's values are checked by the caller.)"""
    dtype = plain_cpu_modalities(xs_a)
    if dtype is None or not plain_cpu_like(beta, dtype):
        return None
    same = xs_b is xs_a
    if not same and (plain_cpu_modalities(xs_b) != dtype or len(xs_b) != len(xs_a)):  # type: ignore[arg-type]
        return None
    dims = []
    n_a = n_b = -1
    for m, a in enumerate(xs_a):  # type: ignore[arg-type]
        b = a if same else xs_b[m]  # type: ignore[index]
        sa, sb = a.shape, b.shape
        if len(sa) != 2 or len(sb) != 2 or sa[1] == 0 or sb[1] != sa[1]:
            return None
        if (n_a >= 0 and sa[0] != n_a) or (n_b >= 0 and sb[0] != n_b):
            return None
        n_a, n_b = sa[0], sb[0]
        dims.append(sa[1])
    if beta.shape != (len(dims),):  # type: ignore[union-attr]
        return None
    return dims
