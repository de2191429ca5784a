"""Tensor fusion (Zadeh et al., EMNLP 2017), DESIGN.md section 1, as plain torch ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
) -> Tensor:
    """Features ``Z`` when ``weight`` is None, else ``Z Wᵀ + b`` (materialises ``Z``)."""
    z = tensor_fusion_features(xs, mask)
    return z if weight is None else F.linear(z, weight, bias)
