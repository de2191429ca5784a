"""Tensor fusion (Zadeh et al., EMNLP 2017), DESIGN.md section 1, as plain torch ops.

Dropout on Z (``tensor_fusion(..., dropout=p, seed=s)``) is defined here, once: feature ``k``
of row ``n`` (``n`` the flattened row index, ``k`` the flat feature index of Z) is kept iff
``dropout_hash(s, n, k) >> 8 >= floor(p · 2^24)``, and kept features are scaled by
``1 / (1 - p)``. The hash is 32-bit integer arithmetic (murmur3's finaliser ``fmix32``)::

    seed_key = fmix32(s ^ 0x27D4EB2F)
    row_key  = fmix32(seed_key ^ (n · 0x9E3779B1 mod 2^32))
    hash     = fmix32(row_key + k · 0x85EBCA77 mod 2^32)

so the C++ and Triton kernels regenerate the same mask bit for bit, tile by tile, in forward
and backward, without storing it. Both maps are bijections (of ``n`` for one seed, of ``k``
for one row), so no two features of a row, and no two rows, share their random bits by
construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SEED_SALT = 0x27D4EB2F
ROW_MUL = 0x9E3779B1
COL_MUL = 0x85EBCA77
_M32 = 0xFFFFFFFF


def _mul32(a: Tensor, c: int) -> Tensor:
    """``a · c mod 2^32`` for int64 ``a`` in [0, 2^32) and a 32-bit constant ``c``, in two
    16-bit halves of ``c`` so that no int64 product overflows."""
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """Features whose 24-bit hash is below this are dropped: ``floor(p · 2^24)``."""
    return int(p * 16777216.0)


def dropout_keep(seed: int, rows: Tensor, cols: Tensor, p: float) -> Tensor:
    """The keep mask (bool) at rows ``rows`` (int64, any shape) and features ``cols`` (int64,
    broadcast against ``rows``), for dropout probability ``p`` and ``seed`` in [0, 2^31)."""
    seed_key = fmix32(torch.tensor(seed ^ SEED_SALT, dtype=torch.int64))
    row_key = fmix32(seed_key ^ _mul32(rows & _M32, ROW_MUL))
    h = fmix32((row_key + _mul32(cols & _M32, COL_MUL)) & _M32)
    return (h >> 8) >= dropout_threshold(p)


def dropout_mask(seed: int, n: int, k: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """The keep mask of Z for rows ``0..n-1`` and features ``0..k-1``: bool ``(n, k)``."""
    rows = torch.arange(n, dtype=torch.int64, device=device)[:, None]
    cols = torch.arange(k, dtype=torch.int64, device=device)[None, :]
    return dropout_keep(seed, rows, cols, p)


def feature_dropout(z: Tensor, p: float, seed: int) -> Tensor:
    """Inverted dropout of ``Z (*, K)`` with the mask above: kept features times ``1/(1-p)``,
    dropped ones exactly 0 (selected, never multiplied, so a dropped inf or NaN is gone)."""
    if p == 0:
        return z
    flat = z.reshape(-1, z.shape[-1])
    keep = dropout_mask(seed, flat.shape[0], flat.shape[1], p, z.device)
    scale = 1.0 / (1.0 - p)
    return torch.where(keep, flat * scale, torch.zeros((), dtype=z.dtype, device=z.device)).reshape(z.shape)


def tensor_fusion_features(xs: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """``Z = flatten(z_1 ⊗ … ⊗ z_M)`` with ``z_m = [1, x_m]``, modality 1 slowest.

    ``mask (*, M)`` bool: a missing modality contributes ``[1, 0…0]`` whatever ``x_m`` holds.
    """
    z: Tensor | None = None
    for m, x in enumerate(xs):
        if mask is not None:
            x = torch.where(mask[..., m, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        zm = torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)
        z = zm if z is None else (z.unsqueeze(-1) * zm.unsqueeze(-2)).flatten(-2)
    assert z is not None, "xs must hold at least one modality"
    return z


def tensor_fusion(
    xs: Sequence[Tensor],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    dropout: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Features ``Z`` when ``weight`` is None, else ``Z Wᵀ + b`` (materialises ``Z``), with
    ``Z`` under inverted dropout of probability ``dropout`` (mask: :func:`dropout_keep`)."""
    z = feature_dropout(tensor_fusion_features(xs, mask), dropout, seed)
    return z if weight is None else F.linear(z, weight, bias)
