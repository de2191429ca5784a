"""Sparse skew-pair attention op (DESIGN.md section 4): checks, backend choice, autograd, fakes.

``fusionops::skew_pair_attention(ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window,
backend) -> out`` and its backward op carry the fused implementations; the ``reference``
backend is served by ``fusionops.reference`` directly, with PyTorch's own autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fusionops import _backend, reference
from fusionops._backend import FLOAT_DTYPES, entry_kernels
from fusionops._checks import check_grad, check_like, check_shape, plain_cpu_like, plain_cpu_modalities
from fusionops.ops import _autocast, _eager
from fusionops.ops._eager import EagerCall
from fusionops.ops._kernels import SkewPairKernels, empty_grad
from fusionops.pairs import PairList, check_pairs_fit, pair_list
from fusionops.registry import OpDef, needs_grad, register

OP = "skew_pair_attention"

# Order of the gradients the backward returns (the op's differentiable inputs).
GRAD_NAMES = ("ha", "hb", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo")


class _CompiledKernels:
    """The C++ kernels of ``fusionops._C`` behind the kernel contract (no CUDA C++ ones yet)."""

    def forward(self, ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window) -> Tensor:
        return torch.ops.fusionops._skew_pair_fwd.default(
            ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window
        )

    def backward(self, grad, ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, heads, window, needs) -> list[Tensor]:
        return list(
            torch.ops.fusionops._skew_pair_bwd.default(
                grad, ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, heads, window, needs
            )
        )


# Automatic choice on CPU: the fused kernels beat the reference's per-pair, per-head loop at
# every size measured (N*P*D from 1280; 2.3-14x), so there is no size rule.
# The rule: a size is "lost" when fused[cpu] was slower than the reference there in both of two
# runs of `python -m benchmarks.crossover` (a single reading is within this machine's run-to-run
# noise of about 10%); each threshold is the smallest measured size from which nothing is lost.
# CSVs: benchmarks/results/crossover_<op>_cpu_2026-12-04_run{1,2}.csv.
CPU_FUSED_MIN_ELEMENTS = 0
CPU_FUSED_MIN_ELEMENTS_FORWARD = 0

OPDEF = register(
    OpDef(
        name=OP,
        reference=reference.skew_pair_attention,
        compiled=_CompiledKernels(),
        kernels=("_skew_pair_fwd", "_skew_pair_bwd"),
        triton_module="skew_pair",
        size_metric="N*P*D",
        cpu_min_size=CPU_FUSED_MIN_ELEMENTS,
        cpu_min_size_forward=CPU_FUSED_MIN_ELEMENTS_FORWARD,
        autocast="lower",
    )
)


def _kernels(backend: str) -> SkewPairKernels:
    return cast(SkewPairKernels, OPDEF.kernels_for(backend))


class _Call(EagerCall):
    """Eager skew-pair attention: flat = (ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo)."""

    op = OP

    __slots__ = ("heads", "window", "has_bo")

    def __init__(self, kernels: SkewPairKernels, heads: int, window: int, has_bo: bool) -> None:
        super().__init__(kernels)
        self.heads, self.window, self.has_bo = heads, window, has_bo

    def saved(self, flat):
        return (*flat[:10], None)  # bo is not read by backward (its gradient is a sum of grad)

    def forward(self, flat):
        return self.kernels.forward(*flat, self.heads, self.window).contiguous()

    def backward(self, grad, flat, needs):
        ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, _ = flat
        flags = [bool(needs[k]) for k in (0, 1, 3, 4, 5, 6)]
        present = (bq is not None, bk is not None, bv is not None, self.has_bo)
        flags += [bool(needs[k]) and has for k, has in zip((7, 8, 9, 10), present, strict=True)]
        grads = self.kernels.backward(
            grad, ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, self.heads, self.window, flags
        )
        g = [t.contiguous() if need else None for t, need in zip(grads, flags, strict=True)]
        return g[0], g[1], None, *g[2:]


@torch.library.custom_op("fusionops::skew_pair_attention", mutates_args=())
def _fused(
    ha: Tensor,
    hb: Tensor,
    pairs: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    bq: Tensor | None,
    bk: Tensor | None,
    bv: Tensor | None,
    bo: Tensor | None,
    heads: int,
    window: int,
    backend: str,
) -> Tensor:
    kernels = _entry(ha, hb, pairs, (wq, wk, wv, wo), (bq, bk, bv, bo), heads, window, backend)
    out = kernels.forward(ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window)
    return out.contiguous()


@_fused.register_fake
def _fused_fake(ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window, backend) -> Tensor:
    return ha.new_empty(ha.shape[0], pairs.shape[0], ha.shape[2])


@torch.library.custom_op("fusionops::skew_pair_attention_backward", mutates_args=())
def _fused_backward(
    grad: Tensor,
    ha: Tensor,
    hb: Tensor,
    pairs: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    bq: Tensor | None,
    bk: Tensor | None,
    bv: Tensor | None,
    heads: int,
    window: int,
    needs: list[bool],
    backend: str,
) -> list[Tensor]:
    kernels = _entry(ha, hb, pairs, (wq, wk, wv, wo), (bq, bk, bv, None), heads, window, backend, grad)
    grads = kernels.backward(grad, ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, heads, window, list(needs))
    return [g.contiguous() if need else empty_grad(ha) for g, need in zip(grads, needs, strict=True)]


@_fused_backward.register_fake
def _fused_backward_fake(
    grad, ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, heads, window, needs, backend
) -> list[Tensor]:
    like = (ha, hb, wq, wk, wv, wo, wq[0], wq[0], wq[0], wq[0])
    return [t.new_empty(t.shape) if need else empty_grad(ha) for t, need in zip(like, needs, strict=True)]


def _setup(ctx, inputs, output) -> None:
    ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window, backend = inputs
    ctx.heads, ctx.window, ctx.backend = heads, window, backend
    ctx.has_bias = [b is not None for b in (bq, bk, bv, bo)]
    # The inputs only: the kernels recompute projections and attention in backward.
    ctx.save_for_backward(ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv)


def _grad(ctx, grad: Tensor):
    if torch.is_grad_enabled():  # create_graph=True
        raise _eager.no_double_backward(OP)
    ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv = ctx.saved_tensors
    flags = ctx.needs_input_grad
    needs = [bool(flags[k]) for k in (0, 1, 3, 4, 5, 6)]
    needs += [bool(flags[k]) and has for k, has in zip((7, 8, 9, 10), ctx.has_bias, strict=True)]
    grads = torch.ops.fusionops.skew_pair_attention_backward(
        grad, ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, ctx.heads, ctx.window, needs, ctx.backend
    )
    g = [t if need else None for t, need in zip(grads, needs, strict=True)]
    return g[0], g[1], None, *g[2:], None, None, None


_fused.register_autograd(_grad, setup_context=_setup)
for _name in ("skew_pair_attention", "skew_pair_attention_backward"):
    _autocast.register(_name, OPDEF.autocast)


def _check_stack(name: str, t: object, ref: Tensor | None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{OP}: {name} must be a tensor of shape (N, L, D), got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(
            f"{OP}: {name} must have shape (N, L, D) (rows, layers, width), got {tuple(t.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: {name} must have a floating dtype in {FLOAT_DTYPES}, got {t.dtype}")
    if ref is None:
        if t.shape[1] < 1 or t.shape[2] < 1:
            raise ValueError(
                f"{OP}: {name} must have at least one layer and width D >= 1, got {tuple(t.shape)}"
            )
        return
    if t.dtype != ref.dtype:
        raise TypeError(f"{OP}: {name} has dtype {t.dtype} but ha has {ref.dtype}; expected one dtype")
    if t.device != ref.device:
        raise ValueError(f"{OP}: {name} is on {t.device} but ha is on {ref.device}; expected one device")
    if t.shape[0] != ref.shape[0] or t.shape[2] != ref.shape[2]:
        raise ValueError(
            f"{OP}: {name} has shape {tuple(t.shape)} but ha has {tuple(ref.shape)}; the stacks "
            "must share N (rows) and D (width)"
        )
    if t.shape[1] < 1:
        raise ValueError(f"{OP}: {name} must have at least one layer, got {tuple(t.shape)}")


def _check_int(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{OP}: {name} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{OP}: {name} must be >= {least}, got {value}")
    return value


def _check_fake_pairs(pairs: Tensor, ha: Tensor) -> None:
    if pairs.dtype != torch.int64 or pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] < 1:
        raise ValueError(
            f"{OP}: pairs must be an int64 tensor (P, 2) with P >= 1, got {pairs.dtype} of shape "
            f"{tuple(pairs.shape)}"
        )
    if pairs.device != ha.device:
        raise ValueError(f"{OP}: pairs is on {pairs.device}, expected {ha.device} (the device of ha)")


def _check_args(
    ha: Tensor,
    hb: Tensor,
    pairs: object,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    bq: Tensor | None,
    bk: Tensor | None,
    bv: Tensor | None,
    bo: Tensor | None,
    heads: object,
    window: object,
) -> tuple[PairList | None, int, int]:
    """Every argument of a call; returns the pairs as a table (None for a fake pairs tensor,
    whose values are checked when the custom op runs on real tensors), heads and window."""
    _check_stack("ha", ha, None)
    _check_stack("hb", hb, ha)
    _, la, d = ha.shape
    lb = hb.shape[1]
    if isinstance(pairs, Tensor) and is_fake(pairs):  # no values: check what a fake tensor has
        _check_fake_pairs(pairs, ha)
        table = None
    else:
        table = pair_list(OP, pairs)
        check_pairs_fit(OP, table, la, lb)
    heads = _check_int("heads", heads, 1)
    window = _check_int("window", window, 0)
    if d % heads:
        raise ValueError(f"{OP}: heads = {heads} does not divide the width D = {d}")
    for name, w in (("wq", wq), ("wk", wk), ("wv", wv), ("wo", wo)):
        check_like(OP, name, w, ha)
        check_shape(OP, name, w, (d, d), f" (D, D) with D = {d}, as nn.Linear(D, D) stores it")
    for name, b in (("bq", bq), ("bk", bk), ("bv", bv), ("bo", bo)):
        if b is not None:
            check_like(OP, name, b, ha)
            check_shape(OP, name, b, (d,), f" (D,) with D = {d}")
    return table, heads, window


def _entry(
    ha: Tensor,
    hb: Tensor,
    pairs: Tensor,
    ws: tuple[Tensor, Tensor, Tensor, Tensor],
    bs: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None],
    heads: int,
    window: int,
    backend: str,
    grad: Tensor | None = None,
) -> SkewPairKernels:
    """A registered op's checks (``pairs``: the int64 ``(P, 2)`` index tensor on the device of
    ha, read back here to check its values; ``grad``: the backward op's upstream gradient),
    then the kernels of ``backend``."""
    _check_args(ha, hb, pairs, *ws, *bs, heads, window)
    if pairs.dtype != torch.int64 or pairs.device != ha.device or not pairs.is_contiguous():
        raise ValueError(
            f"{OP}: the registered op takes pairs as a contiguous int64 tensor on {ha.device} (the "
            f"device of ha), got a {'' if pairs.is_contiguous() else 'non-contiguous '}{pairs.dtype} "
            f"tensor on {pairs.device}"
        )
    if grad is not None:
        check_grad(OP, grad, (ha.shape[0], pairs.shape[0], ha.shape[2]), ha)
    return cast(SkewPairKernels, entry_kernels(OPDEF, backend, ha.device, ha.dtype, 2))


# Eager calls' pair index tensors (CPU), by their pairs: torch.tensor costs about 3 µs a call,
# a tenth of a small call (issue 15). The kernels only read it. Bounded: cleared when full.
_CPU_INDEX: dict[PairList, Tensor] = {}
_CPU_INDEX_MAX = 64


def _cpu_index(table: PairList) -> Tensor:
    index = _CPU_INDEX.get(table)
    if index is None:
        if len(_CPU_INDEX) >= _CPU_INDEX_MAX:
            _CPU_INDEX.clear()
        with torch.inference_mode(False):  # a later call that records a gradient saves it
            index = _CPU_INDEX[table] = torch.tensor(table, dtype=torch.int64, device="cpu")
    return index


def _plain_pairs(pairs: object, la: int, lb: int) -> PairList | None:
    """``pairs`` as a table when it is a non-empty list or tuple of ``(i, j)`` pairs of ints
    (lists or tuples) within stacks of ``la`` and ``lb`` layers, else None."""
    if (type(pairs) is not list and type(pairs) is not tuple) or not pairs:
        return None
    for row in pairs:
        if (type(row) is not tuple and type(row) is not list) or len(row) != 2:
            return None
        i, j = row
        if type(i) is not int or type(j) is not int or not (0 <= i < la and 0 <= j < lb):
            return None
    return tuple((i, j) for i, j in pairs)


def _eager_cpu(
    ha: Tensor,
    hb: Tensor,
    pairs: object,
    ws: tuple[Tensor, Tensor, Tensor, Tensor],
    bs: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None],
    heads: object,
    window: object,
) -> Tensor | None:
    """The common eager call at a fraction of the full path's cost (issue 15: the full checks
    cost about 11 µs a call): plain CPU stacks of one float dtype sharing N and D, pairs a list
    or tuple of int pairs within the stacks, int heads dividing D and window >= 0, (D, D)
    weights and (D,) or None biases of that dtype, no autocast, not traced. One pass accepts
    exactly such a call; anything else (every malformed call included: the full path names
    what is wrong) returns None and takes the full path, which decides the same way."""
    dtype = plain_cpu_modalities((ha, hb))
    if dtype is None:
        return None
    sa, sb = ha.shape, hb.shape
    if len(sa) != 3 or len(sb) != 3 or sa[0] != sb[0] or sa[2] != sb[2] or sa[2] < 1:
        return None
    d = sa[2]
    if type(heads) is not int or type(window) is not int or heads < 1 or window < 0 or d % heads:
        return None
    for w in ws:
        if not plain_cpu_like(w, dtype) or w.shape != (d, d):
            return None
    for b in bs:
        if b is not None and (not plain_cpu_like(b, dtype) or b.shape != (d,)):
            return None
    table = _plain_pairs(pairs, sa[1], sb[1])
    if table is None:
        return None
    backend = _backend.choose_cpu_eager(OPDEF, 2, sa[0] * len(table) * d, needs_grad(ha, hb, *ws, *bs))
    if backend is None:
        return None
    if backend == "reference":
        return reference.skew_pair_attention(ha, hb, table, *ws, *bs, heads=heads, window=window)
    call = _Call(_kernels(backend), heads, window, bs[3] is not None)
    return _eager.apply(call, (ha, hb, _cpu_index(table), *ws, *bs))


def skew_pair_attention(
    ha: Tensor,
    hb: Tensor,
    pairs: Tensor | Sequence[tuple[int, int]],
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    bq: Tensor | None = None,
    bk: Tensor | None = None,
    bv: Tensor | None = None,
    bo: Tensor | None = None,
    *,
    heads: int = 1,
    window: int = 0,
) -> Tensor:
    """Sparse skew-pair attention (Hu et al. 2024, SSFN; DESIGN.md section 4), ``(N, P, D)``.

    Per row n and pair ``p = (i, j)``: the query is layer i of A, ``q = ha[n, i] Wqᵀ + bq``;
    keys and values come from the layers of B within ``window`` of j (clipped to the stack),
    ``k = hb[n, j'] Wkᵀ + bk``, ``v = hb[n, j'] Wvᵀ + bv``; per head ``α = softmax(q·k /
    sqrt(D / heads))`` over that band; ``out[n, p] = ha[n, i] + (Σ α v) Woᵀ + bo``. Every
    sample attends within itself only. With ``window = 0`` this is SSFN's per-pair
    co-attention residual, ``ha[n, i] + (hb[n, j] Wvᵀ + bv) Woᵀ + bo``.

    Args:
        ha, hb: per-layer summaries ``(N, La, D)`` and ``(N, Lb, D)`` of two encoders (one dtype,
            device, N and D).
        pairs: ``(P, 2)`` zero-based ``(i, j)`` (e.g. from :func:`fusionops.skew_pairs`), or a
            list of such tuples; duplicates allowed. Under ``torch.compile`` pass a list or
            tuple (a constant): a tensor is read back to the host, which breaks the graph.
        wq, wk, wv, wo: ``(D, D)`` as ``nn.Linear`` stores them; ``bq, bk, bv, bo``: ``(D,)``
            or None.
        heads: attention heads, dividing D. window: band half-width ``>= 0``.

    The fused kernels read only the layers that the pairs and their bands touch and keep no
    per-pair intermediates; backward recomputes from the inputs.
    """
    out = _eager_cpu(ha, hb, pairs, (wq, wk, wv, wo), (bq, bk, bv, bo), heads, window)
    if out is not None:
        return out
    table, heads, window = _check_args(ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window)
    n, d = ha.shape[0], ha.shape[2]
    given = pairs if table is None else table  # a fake pairs tensor stays as it is
    count = pairs.shape[0] if table is None else len(table)

    if _autocast.enabled(ha.device):
        return _autocast.call_without_autocast(
            OPDEF.autocast, ha.device, skew_pair_attention, ha, hb, given, wq, wk, wv, wo, bq, bk, bv, bo,
            heads=heads, window=window,
        )  # fmt: skip
    backend = _backend.choose(
        OPDEF, ha.device, ha.dtype, 2, n * count * d, needs_grad(ha, hb, wq, wk, wv, wo, bq, bk, bv, bo)
    )
    if backend == "reference":
        return reference.skew_pair_attention(
            ha, hb, given, wq, wk, wv, wo, bq, bk, bv, bo, heads=heads, window=window
        )
    index = pairs if table is None else torch.tensor(table, dtype=torch.int64, device=ha.device)
    if _eager.traced(ha):  # the custom op: what compiled graphs, exports and fake tensors take
        return torch.ops.fusionops.skew_pair_attention(
            ha, hb, index, wq, wk, wv, wo, bq, bk, bv, bo, heads, window, backend
        )
    call = _Call(_kernels(backend), heads, window, bo is not None)
    return _eager.apply(call, (ha, hb, index, wq, wk, wv, wo, bq, bk, bv, bo))
