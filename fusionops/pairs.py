"""Which layers of two encoders a skew-pair set pairs (DESIGN.md section 4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


PairList = tuple[tuple[int, int], ...]


def pair_list(owner: str, pairs: object) -> PairList:
    """``pairs`` (a ``(P, 2)`` integer tensor or a sequence of ``(i, j)``) as a tuple of int
    pairs, P >= 1, no negative index. A tuple is what ``torch.compile`` can treat as a constant;
    a tensor is read back to the host (a graph break under ``torch.compile``)."""
    if isinstance(pairs, Tensor):
        if pairs.dtype.is_floating_point or pairs.dtype.is_complex or pairs.dtype == torch.bool:
            raise TypeError(
                f"{owner}: pairs must be an integer tensor of (i, j) layer indices, got {pairs.dtype}"
            )
        if pairs.dim() != 2 or pairs.shape[1] != 2:
            raise ValueError(
                f"{owner}: pairs must have shape (P, 2) of zero-based (i, j), got {tuple(pairs.shape)}"
            )
        rows = pairs.tolist()
    elif isinstance(pairs, Sequence) and not isinstance(pairs, (str, bytes)):
        rows = [tuple(p) if isinstance(p, Sequence) and not isinstance(p, (str, bytes)) else p for p in pairs]
        for p, row in enumerate(rows):
            if not isinstance(row, tuple) or len(row) != 2:
                raise ValueError(f"{owner}: pairs[{p}] must be an (i, j) pair, got {row!r}")
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in row):
                raise TypeError(
                    f"{owner}: pairs[{p}] = {row!r} must hold two ints (zero-based layer indices)"
                )
    else:
        raise TypeError(
            f"{owner}: pairs must be a (P, 2) tensor or a list of (i, j), got {type(pairs).__name__}"
        )
    if not rows:
        raise ValueError(f"{owner}: pairs is empty; expected at least one (i, j) pair")
    for p, (i, j) in enumerate(rows):
        if i < 0 or j < 0:
            raise ValueError(
                f"{owner}: pairs[{p}] = ({i}, {j}) has a negative layer index; pairs are zero-based"
            )
    return tuple((int(i), int(j)) for i, j in rows)


def check_pairs_fit(owner: str, pairs: PairList, la: int, lb: int) -> None:
    """Every ``(i, j)`` indexes a layer of stacks with ``la`` and ``lb`` layers."""
    for p, (i, j) in enumerate(pairs):
        for what, k, depth, stack in (("i", i, la, "ha"), ("j", j, lb, "hb")):
            if k >= depth:
                raise ValueError(
                    f"{owner}: pairs[{p}] = ({i}, {j}): {what} = {k} is out of range for {stack} with "
                    f"{depth} layers (expected 0 <= {what} < {depth}; pairs are zero-based)"
                )
