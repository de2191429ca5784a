"""Product fusion and concatenation (Michaels, Zhang & Fiterau, MOSS@ICML 2025), DESIGN.md
section 3, as plain torch ops."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def product_fusion(xs: Sequence[Tensor]) -> Tensor:
    """``p = x_1 ⊙ x_2 ⊙ … ⊙ x_M`` of modalities of one shape ``(*, d)``."""
    p = xs[0]
    for x in xs[1:]:
        p = p * x
    return p
