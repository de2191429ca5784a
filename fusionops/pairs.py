"""Which layers of two encoders a skew-pair set pairs (DESIGN.md section 4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pair_count(depth: int, density: float) -> int:
    """``P = round(η · depth)``, halves rounded up (Python's ``round`` would send 1.5 and 2.5
    both to 2)."""
    return math.floor(density * depth + 0.5)


def skew_pairs(la: int, lb: int, skew: int, density: float) -> Tensor:
    """Zero-based ``(P, 2)`` int64 pairs ``(i, i - skew)`` of layer i of encoder A (depth
    ``la``) with layer ``i - skew`` of encoder B (depth ``lb``).

    The pairs are consecutive, starting from the lowest layers that exist, and there are
    ``P = round(density · min(la, lb))`` of them, fewer when the stacks end first. E.g.
    12 and 12 layers, skew +7, density 5/12: (7, 0) (8, 1) (9, 2) (10, 3) (11, 4) (the paper's
    1-based (8, 1) … (12, 5)).

    Raises ValueError on depths below 1, a density outside (0, 1], or no pair at all (the
    message lists the skews that give pairs for these depths).
    """
    for name, depth in (("la", la), ("lb", lb)):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"skew_pairs: {name} must be a layer count >= 1, got {depth!r}")
    if isinstance(skew, bool) or not isinstance(skew, int):
        raise TypeError(f"skew_pairs: skew must be an int, got {type(skew).__name__}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"skew_pairs: density must be in (0, 1], got {density!r}")
    count = pair_count(min(la, lb), density)
    if count == 0:
        raise ValueError(
            f"skew_pairs: density {density} of min(la, lb) = {min(la, lb)} layers rounds to 0 pairs; "
            f"the smallest density giving a pair is {0.5 / min(la, lb):.4g}"
        )
    first_a = max(0, skew)  # the lowest i with i - skew >= 0
    pairs = [(i, i - skew) for i in range(first_a, first_a + count) if i < la and i - skew < lb]
    if not pairs:
        raise ValueError(
            f"skew_pairs: skew {skew} pairs no layers of stacks with la = {la} and lb = {lb}; "
            f"possible skews are {-(lb - 1)} to {la - 1}"
        )
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
