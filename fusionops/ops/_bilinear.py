"""What the bilinear pooling ops (MFB/MLB in ``ops/mfb.py``, MFH in ``ops/mfh.py``, MUTAN/BLOCK
in ``ops/block_fusion.py``; DESIGN.md section 6) share: the kernel contract, the compiled kernels,
the eager call and the argument checks.

One kernel pair serves the family. ``x (N, C·dx)`` and ``t (N, C·dt)`` are cut into C chunks;
chunk c is projected to ``P = R·S`` columns, ``A_c = x_c Wx[c]ᵀ + bx[c]``,
``B_c = t_c Wt[c]ᵀ + bt[c]``; ``p[c·S + j] = Σ_r act(A_c)[i] act(B_c)[i]`` with ``i = r·S + j``
(``rank_major``: MUTAN, BLOCK) or ``i = j·R + r`` (MFB's pooled index ``j·k + i``); ``z = n(p)``
(signed square root then L2, over each chunk or over the row) or ``p``; ``y = z Woᵀ + bo``.
MFB is C = 1, R = k, S = o. MFH is ``chain``: ``x (N, dx)`` and ``t (N, dt)`` are read whole by
every chunk (its p blocks) and the products are chained before pooling, chunk c's product
``e_c = (act(A_c) act(B_c)) e_{c−1}`` (``e_{−1} = 1``).

Dropout (``drop_in`` on act(A) and act(B), ``drop_prod`` on each product e_c, ``drop_out`` on z
before the output projection) is inverted and hashed from ``seed``: the masks of
``fusionops.reference.bilinear.hashed_dropout``, regenerated in backward, never stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from fusionops._checks import check_like, check_shape
from fusionops.ops import _eager
from fusionops.ops._eager import EagerCall
from fusionops.ops._kernels import empty_grad

# Codes of the kernels' int arguments.
ACTIVATION_CODES: dict[str | None, int] = {None: 0, "relu": 1, "tanh": 2}
NORM_NONE, NORM_PER_CHUNK, NORM_WHOLE_ROW = 0, 1, 2
# The gradients, in this order: x, t, wx, bx, wt, bt, wo, bo.
N_GRADS = 8


class BilinearKernels(Protocol):
    """The op layer guarantees: ``x (N, C·dx)``, ``t (N, C·dt)``, N >= 0, of one dtype (float16,
    bfloat16, float32, float64) and device, any strides (stride 0 included); ``wx (C, R·S, dx)``,
    ``wt (C, R·S, dt)``, ``wo (O, C·S)``; ``bx, bt (C, R·S)`` and ``bo (O,)`` or None; all any
    strides; ``rank = R >= 1``; ``activation`` a value of :data:`ACTIVATION_CODES`,
    ``normalize`` one of the ``NORM_*`` codes. Kernels accumulate in float32 (float64 for
    float64) and never hold the ``(N, C·R·S)`` projections or their product for all rows.
    ``chain`` (MFH): ``x (N, dx)``, ``t (N, dt)`` shared by the C chunks, products chained.
    ``drop_in``, ``drop_prod``, ``drop_out`` in [0, 1) and ``seed`` in [0, 2**31): the dropouts
    (module docstring)."""

    def forward(
        self, x: Tensor, t: Tensor, wx: Tensor, bx: Tensor | None, wt: Tensor, bt: Tensor | None,
        wo: Tensor, bo: Tensor | None, rank: int, rank_major: bool, activation: int, normalize: int,
        chain: bool = False, drop_in: float = 0.0, drop_prod: float = 0.0, drop_out: float = 0.0,
        seed: int = 0,
    ) -> Tensor:  # fmt: skip
        """``y`` (N, O), contiguous."""

    def backward(
        self, grad: Tensor, x: Tensor, t: Tensor, wx: Tensor, bx: Tensor | None, wt: Tensor,
        bt: Tensor | None, wo: Tensor, rank: int, rank_major: bool, activation: int, normalize: int,
        needs: list[bool], chain: bool = False, drop_in: float = 0.0, drop_prod: float = 0.0,
        drop_out: float = 0.0, seed: int = 0,
    ) -> list[Tensor]:  # fmt: skip
        """Eight gradients (x, t, wx, bx, wt, bt, wo, bo) given ``grad = dL/dy`` (N, O) of any
        strides; ``needs`` has eight flags in that order, and an entry whose flag is False (or
        whose bias is None) may be any tensor (it is ignored)."""


class CompiledKernels:
    """``torch.ops.fusionops._bilinear_fwd/_bwd`` (C++, csrc/cpu/bilinear.cpp)."""

    def forward(
        self, x, t, wx, bx, wt, bt, wo, bo, rank, rank_major, activation, normalize, chain=False,
        drop_in=0.0, drop_prod=0.0, drop_out=0.0, seed=0,
    ) -> Tensor:  # fmt: skip
        return torch.ops.fusionops._bilinear_fwd.default(
            x, t, wx, bx, wt, bt, wo, bo, rank, rank_major, activation, normalize, chain, drop_in, drop_prod,
            drop_out, seed,
        )  # fmt: skip

    def backward(
        self, grad, x, t, wx, bx, wt, bt, wo, rank, rank_major, activation, normalize, needs, chain=False,
        drop_in=0.0, drop_prod=0.0, drop_out=0.0, seed=0,
    ) -> list[Tensor]:  # fmt: skip
        return list(
            torch.ops.fusionops._bilinear_bwd.default(
                grad,
                x,
                t,
                wx,
                bx,
                wt,
                bt,
                wo,
                rank,
                rank_major,
                activation,
                normalize,
                needs,
                chain,
                drop_in,
                drop_prod,
                drop_out,
                seed,
            )  # fmt: skip
        )


def as_chunked(t: Tensor | None, chunked: bool) -> Tensor | None:
    """A parameter in the kernels' chunked layout: MFB's 2-D weights and 1-D biases get a
    leading chunk dim of 1 (a view)."""
    return t if t is None or chunked else t.unsqueeze(0)


# (drop_in, drop_prod, drop_out, seed): no dropout.
NO_DROPOUT = (0.0, 0.0, 0.0, 0)


def run_forward(
    kernels: BilinearKernels, flat, rank, rank_major, act, norm, chunked, chain=False, drops=NO_DROPOUT
) -> Tensor:
    x, t, wx, bx, wt, bt, wo, bo = flat
    wx3, bx2, wt3, bt2 = (as_chunked(w, chunked) for w in (wx, bx, wt, bt))
    y = kernels.forward(x, t, wx3, bx2, wt3, bt2, wo, bo, rank, rank_major, act, norm, chain, *drops)
    return y.contiguous()


def run_backward(
    kernels: BilinearKernels, grad, flat, needs, rank, rank_major, act, norm, chunked, chain=False,
    drops=NO_DROPOUT,
):  # fmt: skip
    """The eight gradients of ``flat`` (None where not needed), in the parameters' own shapes."""
    x, t, wx, bx, wt, bt, wo, _ = flat
    needs = [bool(n) for n in needs]
    needs[3] = needs[3] and bx is not None
    needs[5] = needs[5] and bt is not None
    wx3, bx2, wt3, bt2 = (as_chunked(w, chunked) for w in (wx, bx, wt, bt))
    grads = kernels.backward(
        grad, x, t, wx3, bx2, wt3, bt2, wo, rank, rank_major, act, norm, needs, chain, *drops
    )
    shapes = [x.shape, t.shape, wx.shape, None if bx is None else bx.shape, wt.shape,
              None if bt is None else bt.shape, wo.shape, (wo.shape[0],)]  # fmt: skip
    return [g.reshape(s).contiguous() if n else None for g, n, s in zip(grads, needs, shapes, strict=True)]


def fake_grads(flat, needs) -> list[Tensor]:
    """The backward custom op's fake outputs: the inputs' shapes where needed, else empty."""
    x, t, wx, bx, wt, bt, wo, _ = flat
    like = (x, t, wx, bx, wt, bt, wo, None)
    out = []
    for i, (p, n) in enumerate(zip(like, needs, strict=True)):
        if i == 7:
            out.append(wo.new_empty(wo.shape[0]) if n else empty_grad(wo))
        elif n and p is not None:
            out.append(p.new_empty(p.shape))
        else:
            out.append(empty_grad(wo))
    return out


class BilinearCall(EagerCall):
    """Eager call of a bilinear op: flat = (x, t, wx, bx, wt, bt, wo, bo)."""

    __slots__ = ("op", "rank", "rank_major", "act", "norm", "chunked", "chain", "drops", "reference")

    def __init__(
        self, kernels, op: str, rank, rank_major, act, norm, chunked, reference: Callable,
        chain: bool = False, drops: tuple[float, float, float, int] = NO_DROPOUT,
    ) -> None:  # fmt: skip
        super().__init__(kernels)
        self.op = op
        self.rank, self.rank_major, self.act, self.norm, self.chunked = rank, rank_major, act, norm, chunked
        self.chain, self.drops = chain, drops
        self.reference = reference  # reference(*flat) -> y, for second order

    def _args(self) -> tuple:
        return self.rank, self.rank_major, self.act, self.norm, self.chunked, self.chain, self.drops

    def forward(self, flat):
        return run_forward(self.kernels, flat, *self._args())

    def saved(self, flat):
        return (*flat[:7], None)  # the output bias is not read by backward

    def backward(self, grad, flat, needs):
        return tuple(run_backward(self.kernels, grad, flat, needs, *self._args()))

    def reference_grads(self, grad, flat, needs):
        grads = _eager.grads_through(lambda: self.reference(*flat[:7], None), grad, list(flat[:7]), needs[:7])
        return (*grads, grad.sum(0) if needs[7] else None)


# ---- checks ---------------------------------------------------------------------------------


def check_pair(op: str, x: object, t: object, names: tuple[str, str] = ("x", "t")) -> torch.Size:
    """``x (*, d_x)`` and ``t (*, d_t)``: floating tensors of one leading shape, dtype and
    device; returns the leading shape. ``names``: what the messages call them (the layers'
    ``forward([x0, x1])`` says ``x[0]``, ``x[1]``)."""
    nx, nt = names
    for name, v in ((nx, x), (nt, t)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(v).__name__}")
        if v.dim() == 0:
            raise ValueError(f"{op}: {name} must have shape (*, d), got a 0-d tensor")
        if not v.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {v.dtype}")
        if v.shape[-1] == 0:
            raise ValueError(f"{op}: {name} has feature width 0; expected d >= 1")
    assert isinstance(x, Tensor) and isinstance(t, Tensor)
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {nt} has dtype {t.dtype}, expected {x.dtype} (the dtype of {nx})")
    if t.device != x.device:
        raise ValueError(f"{op}: {nt} is on {t.device}, expected {x.device} (the device of {nx})")
    if t.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"{op}: {nt} has leading (batch) shape {tuple(t.shape[:-1])}, expected {tuple(x.shape[:-1])} "
            f"(the leading shape of {nx}): both modalities must describe the same rows"
        )
    return x.shape[:-1]


def check_param(op: str, name: str, p: object, shape: tuple[int, ...], like: Tensor, why: str = "") -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(p).__name__}")
    check_like(op, name, p, like)
    check_shape(op, name, p, shape, why)


def check_positive_int(op: str, name: str, v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int ({what}), got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{op}: {name} must be >= 1 ({what}), got {v}")
    return v


def check_activation(op: str, activation: object) -> int:
    if activation == "none":
        activation = None
    if activation not in ACTIVATION_CODES:
        raise ValueError(
            f"{op}: activation must be one of {list(ACTIVATION_CODES)} (the fused kernels'; the layers "
            f"run others on the reference), got {activation!r}"
        )
    return ACTIVATION_CODES[activation]  # type: ignore[index]
