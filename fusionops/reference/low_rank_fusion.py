"""Low-rank multimodal fusion (Liu et al., ACL 2018), DESIGN.md section 2, as plain torch ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def low_rank_fusion(
    xs: Sequence[Tensor],
    factors: Sequence[Tensor],
    rank_weight: Tensor,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``y = Σ_r w_r · Π_m (z_m F_m[r]) + b`` with ``z_m = [1, x_m]``.

    ``xs[m]`` ``(*, d_m)``, ``factors[m]`` ``(R, d_m + 1, O)``, ``rank_weight`` ``(R,)``,
    ``bias`` ``(O,)``; ``mask (*, M)`` bool: a missing modality contributes ``[1, 0…0]``.
    Holds every modality's projections ``(*, R, O)`` (as the original LMF code does).
    """
    fused: Tensor | None = None
    for m, (x, factor) in enumerate(zip(xs, factors, strict=True)):
        if mask is not None:
            x = torch.where(mask[..., m, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        z = torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)
        projection = torch.einsum("...d,rdo->...ro", z, factor)
        fused = projection if fused is None else fused * projection
    assert fused is not None, "xs must hold at least one modality"
    y = torch.einsum("...ro,r->...o", fused, rank_weight)
    return y if bias is None else y + bias
