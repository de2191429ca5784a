"""Inputs and the reference check shared by the bilinear ops' tests (MFB, MFH, BLOCK)."""

from __future__ import annotations

import math

import torch
from conftest import TOL, assert_close_to
from inputs import detached64, make_grad

import fusionops
from fusionops import reference

PARAM_LAYOUTS = ("contiguous", "transposed", "broadcast")


def _leaf(shape, dtype, device, gen, scale=1.0) -> torch.Tensor:
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale
    return t.to(dtype).to(device).requires_grad_(True)


def _weight(
    rows: int, cols: int, dtype, device, layout: str, gen, lead: tuple[int, ...] = ()
) -> torch.Tensor:
    """A random ``(*lead, rows, cols)`` weight scaled like nn.Linear: ``transposed`` stores it
    column-major, ``broadcast`` repeats one row (stride 0)."""
    scale = 1 / math.sqrt(cols)
    if layout == "contiguous":
        return _leaf((*lead, rows, cols), dtype, device, gen, scale)
    if layout == "transposed":
        w = _leaf((*lead, cols, rows), dtype, device, gen, scale).transpose(-1, -2)
    elif layout == "broadcast":
        w = _leaf((*lead, 1, cols), dtype, device, gen, scale).expand(*lead, rows, cols)
    else:
        raise ValueError(layout)
    w.retain_grad()
    return w


def _bias(shape: tuple[int, ...], dtype, device, layout: str, gen) -> torch.Tensor:
    """``transposed``: every other element of a longer vector; ``broadcast``: stride 0."""
    if layout == "contiguous":
        return _leaf(shape, dtype, device, gen)
    if layout == "transposed":
        b = _leaf((*shape[:-1], 2 * shape[-1]), dtype, device, gen)[..., ::2]
    elif layout == "broadcast":
        b = _leaf((), dtype, device, gen).expand(*shape)
    else:
        raise ValueError(layout)
    b.retain_grad()
    return b


def make_mfb_params(dx, dt, k, o, out, dtype=torch.float32, device="cpu", layout="contiguous", seed=4):
    """``[u_weight (k·o, d_x), u_bias, v_weight (k·o, d_t), v_bias, out_weight (O, o), out_bias]``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        _weight(k * o, dx, dtype, device, layout, gen),
        _bias((k * o,), dtype, device, layout, gen),
        _weight(k * o, dt, dtype, device, layout, gen),
        _bias((k * o,), dtype, device, layout, gen),
        _weight(out, o, dtype, device, layout, gen),
        _bias((out,), dtype, device, layout, gen),
    ]


def make_mfh_params(
    dx, dt, k, o, out, blocks, dtype=torch.float32, device="cpu", layout="contiguous", seed=4
):  # fmt: skip
    """``[u_weight (p, k·o, d_x), u_bias (p, k·o), v_weight (p, k·o, d_t), v_bias, out_weight
    (O, p·o), out_bias]`` with ``p = blocks``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        _weight(k * o, dx, dtype, device, layout, gen, (blocks,)),
        _bias((blocks, k * o), dtype, device, layout, gen),
        _weight(k * o, dt, dtype, device, layout, gen, (blocks,)),
        _bias((blocks, k * o), dtype, device, layout, gen),
        _weight(out, blocks * o, dtype, device, layout, gen),
        _bias((out,), dtype, device, layout, gen),
    ]


def make_block_params(chunks, rank, s, out, dtype=torch.float32, device="cpu", layout="contiguous", seed=4):
    """``[merge_weight0 (C, R·s, s), merge_bias0 (C, R·s), merge_weight1, merge_bias1,
    out_weight (O, C·s), out_bias (O,)]``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        _weight(rank * s, s, dtype, device, layout, gen, (chunks,)),
        _bias((chunks, rank * s), dtype, device, layout, gen),
        _weight(rank * s, s, dtype, device, layout, gen, (chunks,)),
        _bias((chunks, rank * s), dtype, device, layout, gen),
        _weight(out, chunks * s, dtype, device, layout, gen),
        _bias((out,), dtype, device, layout, gen),
    ]


def _perturbed(ts: list[torch.Tensor | None], eps: float, seed: int) -> list[torch.Tensor | None]:
    """float64 copies with every element scaled by ``1 + eps·u``, ``u`` uniform in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        u = torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1
        out.append((t.detach().to(torch.float64).cpu() * (1 + eps * u)).to(t.device).requires_grad_(True))
    return out


def _outputs(fn, ins, g64):
    y = fn(*ins)
    grads = torch.autograd.grad(y, [i for i in ins if i is not None], g64) if y.numel() else ()
    return [y, *grads]


def check_against_reference(
    op, backend, x, t, params, kwargs, dtype, grad_layout="contiguous", conditioned=False, ref_kwargs=None
):
    """Forward and every gradient of ``backend`` against the float64 reference.

    ``conditioned``: the signed square root makes the output's sensitivity to rounding
    unbounded near a pooled 0 (its derivative is 1 / (2√|p|)), so for normalised calls the
    allowance adds 8x the change of the float64 reference when every input is perturbed by the
    dtype's own tolerance (the error any implementation makes just by rounding its inputs).
    ``ref_kwargs``: more keyword arguments for the reference only (``training=True`` with
    dropouts)."""
    fn = getattr(fusionops, op)
    ref_kw = {**kwargs, **(ref_kwargs or {})}
    ref = getattr(reference, op)
    with fusionops.backend(backend):
        y = fn(x, t, *params, **kwargs)
    ins64 = detached64([x, t, *params])
    yr = ref(*ins64, **ref_kw)
    assert y.dtype == dtype
    names = ["forward", "grad of x", "grad of t"] + [f"grad of params[{i}]" for i in range(len(params))]
    present = [True, True, True, *(p is not None for p in params)]
    if y.numel() == 0:
        assert y.shape == yr.shape
        return y
    g = make_grad(tuple(y.shape), dtype, y.device, grad_layout)
    y.backward(g)
    got = [y, x.grad, t.grad, *(p.grad for p in params if p is not None)]
    expected = _outputs(lambda *a: ref(*a, **ref_kw), ins64, g.to(torch.float64))
    slack = [None] * len(expected)
    if conditioned:
        moved = _outputs(lambda *a: ref(*a, **ref_kw), _perturbed(ins64, TOL[dtype], 11), g.to(torch.float64))
        slack = [(m - e).abs().max().item() for m, e in zip(moved, expected, strict=True)]
    for a, e, s, what in zip(
        got, expected, slack, [n for n, p in zip(names, present, strict=True) if p], strict=True
    ):
        if s is None:
            assert_close_to(a, e, dtype, what)
        else:
            a64 = a.detach().to(torch.float64).cpu()
            e64 = e.detach().cpu()
            assert not torch.isnan(a64).any(), f"{what}: NaN in the result"
            tol = TOL[dtype]
            atol = tol * e64.abs().max().item() + 8 * s + 1e-300
            torch.testing.assert_close(a64, e64, rtol=tol, atol=atol, msg=lambda m, w=what: f"{w}: {m}")
    return y
