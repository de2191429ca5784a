"""Sparse skew-pair alignment (Hu et al. 2024, SSFN), DESIGN.md section 4, as plain torch ops.

Written for clarity: one pair at a time, one head at a time, exactly as the definition reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
    heads: int = 1,
    window: int = 0,
) -> Tensor:
    """``out[n, p] = ha[n, i_p] + (Σ_{j ∈ J_p} α_j v_j) Woᵀ + bo`` of shape ``(N, P, D)``.

    ``ha (N, La, D)``, ``hb (N, Lb, D)``: per-layer summaries of two encoders; ``pairs (P, 2)``
    (or a list of tuples) zero-based ``(i_p, j_p)``; ``w* (D, D)`` as ``nn.Linear`` stores
    them. Per pair, ``q`` is projected from ``ha[:, i_p]``; keys and values from the layers of
    B within ``window`` of
    ``j_p`` (clipped to the stack); per head, ``α = softmax(q·k / sqrt(D / heads))``. Every
    sample attends within itself only.
    """
    n, _, d = ha.shape
    dh = d // heads
    outs = []
    for i, j in pairs.tolist() if isinstance(pairs, Tensor) else pairs:
        band = list(range(max(0, j - window), min(hb.shape[1], j + window + 1)))
        q = F.linear(ha[:, i], wq, bq)  # (N, D)
        k = F.linear(hb[:, band], wk, bk)  # (N, |J|, D)
        v = F.linear(hb[:, band], wv, bv)
        mixed = []
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            scores = torch.einsum("nc,njc->nj", q[:, cols], k[:, :, cols]) / math.sqrt(dh)
            alpha = torch.softmax(scores, dim=-1)  # over the band
            mixed.append(torch.einsum("nj,njc->nc", alpha, v[:, :, cols]))
        outs.append(ha[:, i] + F.linear(torch.cat(mixed, dim=-1), wo, bo))
    if not outs:
        return ha.new_empty(n, 0, d)
    return torch.stack(outs, dim=1)
