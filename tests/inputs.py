"""Random test inputs in every layout a kernel must honour (never zeros or ones)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

LAYOUTS = ("contiguous", "strided", "transposed", "broadcast")


def _rand(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype).to(device)


def make_x(lead, d, dtype, device, layout, gen) -> torch.Tensor:
    """A random ``(*lead, d)`` tensor laid out as ``layout`` that requires grad; its
    ``.grad`` is kept even when it is a view."""
    lead = tuple(lead)
    if layout == "contiguous":
        return _rand((*lead, d), dtype, device, gen).requires_grad_(True)
    if layout == "strided":  # every other column of a wider tensor
        x = _rand((*lead, 2 * d + 1), dtype, device, gen).requires_grad_(True)[..., 1::2]
    elif layout == "transposed":  # feature dim slowest in memory
        x = _rand((d, *lead), dtype, device, gen).requires_grad_(True).movedim(0, -1)
    elif layout == "broadcast":  # stride 0 over the rows
        x = _rand((d,), dtype, device, gen).requires_grad_(True).expand(*lead, d)
    else:
        raise ValueError(layout)
    x.retain_grad()
    return x


def make_xs(lead, dims, dtype=torch.float32, device="cpu", layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [make_x(lead, d, dtype, device, layout, gen) for d in dims]


def make_weight(dims, o, dtype=torch.float32, device="cpu", transposed=False, seed=1):
    """``weight (O, K)`` (a transposed view when asked) and ``bias (O,)``, both requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    k = math.prod(d + 1 for d in dims)
    shape = (k, o) if transposed else (o, k)
    w = (_rand(shape, dtype, device, gen) / math.sqrt(k)).to(dtype).requires_grad_(True)
    if transposed:
        w = w.t()
        w.retain_grad()
    b = _rand((o,), dtype, device, gen).requires_grad_(True)
    return w, b


def make_mask(lead, m, device="cpu", seed=2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(*lead, m, generator=gen) > 0.35).to(device)


def make_grad(shape, dtype, device, layout="contiguous", seed=3) -> torch.Tensor:
    """An upstream gradient: random, non-contiguous, or stride-0 (what ``y.sum()`` gives)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "broadcast":
        return _rand((), dtype, device, gen).expand(*shape)
    if layout == "transposed":
        return _rand(tuple(reversed(shape)), dtype, device, gen).permute(*reversed(range(len(shape))))
    return _rand(shape, dtype, device, gen)


def detached64(ts):
    """float64 copies requiring grad, for the reference."""
    return [None if t is None else t.detach().to(torch.float64).requires_grad_(True) for t in ts]


FACTOR_LAYOUTS = ("contiguous", "permuted", "broadcast")


def make_factors(dims, rank, o, dtype=torch.float32, device="cpu", layout="contiguous", seed=4):
    """Low-rank fusion parameters, all requiring grad (views keep their ``.grad``):
    ``factors[m] (R, d_m + 1, O)``, ``rank_weight (R,)`` and ``bias (O,)``.

    ``permuted``: factors stored as ``(O, d + 1, R)`` and rank weights every other element;
    ``broadcast``: factors stride 0 over R and rank weights stride 0."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(shape, scale=1.0):
        return (_rand(shape, dtype, device, gen) * scale).to(dtype).requires_grad_(True)

    factors = []
    for d in dims:
        scale = 1 / math.sqrt(d + 1)
        if layout == "contiguous":
            f = leaf((rank, d + 1, o), scale)
        elif layout == "permuted":
            f = leaf((o, d + 1, rank), scale).permute(2, 1, 0)
        elif layout == "broadcast":
            f = leaf((1, d + 1, o), scale).expand(rank, d + 1, o)
        else:
            raise ValueError(layout)
        if not f.is_leaf:
            f.retain_grad()
        factors.append(f)
    if layout == "permuted":
        w = leaf((2 * rank,))[::2]
    elif layout == "broadcast":
        w = leaf(()).expand(rank)
    else:
        w = leaf((rank,))
    if not w.is_leaf:
        w.retain_grad()
    return factors, w, leaf((o,))


STACK_LAYOUTS = ("contiguous", "transposed", "strided", "broadcast")
WEIGHT_LAYOUTS = ("contiguous", "transposed", "broadcast")


def make_stack(n, depth, d, dtype=torch.float32, device="cpu", layout="contiguous", gen=None):
    """A random ``(N, L, D)`` layer stack requiring grad (views keep their ``.grad``):
    ``transposed`` stores it as ``(D, L, N)``; ``strided`` takes every other layer of a deeper
    stack; ``broadcast`` is stride 0 over the rows."""
    if layout == "contiguous":
        return _rand((n, depth, d), dtype, device, gen).requires_grad_(True)
    if layout == "transposed":
        h = _rand((d, depth, n), dtype, device, gen).requires_grad_(True).permute(2, 1, 0)
    elif layout == "strided":
        h = _rand((n, 2 * depth, d), dtype, device, gen).requires_grad_(True)[:, 1::2]
    elif layout == "broadcast":
        h = _rand((1, depth, d), dtype, device, gen).requires_grad_(True).expand(n, depth, d)
    else:
        raise ValueError(layout)
    h.retain_grad()
    return h


def make_skew_pair_inputs(
    n, la, lb, d, dtype=torch.float32, device="cpu", layout="contiguous", weight_layout="contiguous", seed=0
):
    """``ha (N, La, D)``, ``hb (N, Lb, D)``, weights ``[wq, wk, wv, wo]`` (D, D) scaled like
    nn.Linear and biases ``[bq, bk, bv, bo]`` (D,), all random and requiring grad.

    ``weight_layout``: ``transposed`` weights are ``.t()`` views and biases every other element;
    ``broadcast`` weights repeat one row (stride 0) and biases are stride 0."""
    gen = torch.Generator().manual_seed(seed)
    ha = make_stack(n, la, d, dtype, device, layout, gen)
    hb = make_stack(n, lb, d, dtype, device, layout, gen)

    def leaf(shape, scale=1.0):
        return (_rand(shape, dtype, device, gen) * scale).to(dtype).requires_grad_(True)

    ws, bs = [], []
    for _ in range(4):
        if weight_layout == "contiguous":
            w, b = leaf((d, d), 1 / math.sqrt(d)), leaf((d,))
        elif weight_layout == "transposed":
            w, b = leaf((d, d), 1 / math.sqrt(d)).t(), leaf((2 * d,))[::2]
        elif weight_layout == "broadcast":
            w, b = leaf((1, d), 1 / math.sqrt(d)).expand(d, d), leaf(()).expand(d)
        else:
            raise ValueError(weight_layout)
        for t in (w, b):
            if not t.is_leaf:
                t.retain_grad()
        ws.append(w)
        bs.append(b)
    return ha, hb, ws, bs


@contextmanager
def saved_shapes() -> Iterator[list[tuple[int, ...]]]:
    """The shapes of the tensors autograd saves for backward inside the block (to check that a
    fused op keeps its inputs only, never Z or any ``(N, K)`` tensor)."""
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
