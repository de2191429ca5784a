"""Product fusion and concatenation layers (Michaels, Zhang & Fiterau, MOSS@ICML 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusionops.ops.product_fusion import product_fusion


class ProductFusion(nn.Module):
    """``x_1 ⊙ x_2 ⊙ … ⊙ x_M`` of modalities of one shape ``(*, d)``, fused (one kernel)."""

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        return product_fusion(xs)


class ProductConcat(nn.Module):
    """The paper's ``ProductConcat``, exactly: ``cat([v ⊙ t, v ⊙ t.flip(0)], dim=1)``.

    ``forward([v, t])`` takes two modalities of one shape ``(B, d)``. Note what ``flip(0)``
    does: it reverses the **batch**, so the second half of sample i's features is
    ``v[i] ⊙ t[B-1-i]``, a product with *another sample's* second modality. A sample's output
    therefore depends on the rest of its batch and on the batch order (and on the batch size:
    with B = 1 both halves are equal). We reproduce it because the paper's numbers were
    obtained with it; use :class:`ProductFusion` for a per-sample product.

    ``dim`` (default 1, as in their code) is the dimension the two halves are joined on.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        if not isinstance(xs, (list, tuple)) or len(xs) != 2:
            got = len(xs) if isinstance(xs, (list, tuple)) else type(xs).__name__
            raise ValueError(f"ProductConcat: expected two modalities [v, t], got {got}")
        v, t = xs
        if isinstance(t, Tensor) and t.dim() == 0:
            raise ValueError("ProductConcat: t must have a batch dimension, got a 0-d tensor")
        flipped = t.flip(0) if isinstance(t, Tensor) else t
        return torch.cat([product_fusion([v, t]), product_fusion([v, flipped])], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Concat(nn.Module):
    """MultiBench's ``Concat``: every modality flattened from dim 1, then all concatenated on
    dim 1, so ``(B, d_1)``, ``(B, T, d_2)`` give ``(B, d_1 + T·d_2)``; ``forward(modalities,
    training=False)`` as theirs. On ``(B, d)`` features it is also Michaels et al.'s
    concatenation baseline (``cat(xs, dim=1)``).
    """

    def forward(self, modalities: Sequence[Tensor], training: bool = False) -> Tensor:
        if isinstance(modalities, Tensor) or not isinstance(modalities, (list, tuple)) or not modalities:
            raise ValueError(
                "Concat: modalities must be a non-empty list or tuple of tensors, "
                f"got {type(modalities).__name__}"
            )
        for i, x in enumerate(modalities):
            if not isinstance(x, Tensor) or x.dim() < 2:
                what = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"Concat: modalities[{i}] must be a (B, ...) tensor, 2+ dims, got {what}")
        return torch.cat([torch.flatten(x, start_dim=1) for x in modalities], dim=1)
