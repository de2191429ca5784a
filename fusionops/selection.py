"""Choosing a skew-pair set by "bootstrapping sparsity" (Hu et al. 2024, SSFN; DESIGN.md section 4).

:func:`select_skew_pairs` scores every ``(skew, density)`` configuration on validation examples
and returns the sparsest one whose bootstrapped score is statistically tied with the best.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fusionops.pairs import pair_count, skew_pairs

NAME = "select_skew_pairs"
# Bootstrap resamples are drawn in blocks of at most this many indices (bounds the memory).
_BLOCK_ELEMENTS = 1 << 22


def selection_markdown(table: Sequence[dict[str, Any]], level: float) -> str:
    """A selection table (``SkewPairSelection.table``, or its JSON rows) as GitHub markdown,
    best and chosen rows marked."""
    pct = f"{100 * level:g}%"
    lines = [
        f"| skew | density | pairs | mean | {pct} low | {pct} high | note |",
        "|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for row in table:
        if row["skipped"]:
            lines.append(f"| {row['skew']} | {row['density']:.4g} | 0 | — | — | — | skipped: {row['note']} |")
            continue
        marks = [m for m, on in (("best", row["best"]), ("chosen", row["chosen"])) if on]
        if not marks and row["tied"]:
            marks.append("tied")
        note = ", ".join(marks + ([row["note"]] if row["note"] else []))
        lines.append(
            f"| {row['skew']} | {row['density']:.4g} | {row['n_pairs']} | {row['mean']:.4f} | "
            f"{row['low']:.4f} | {row['high']:.4f} | {note} |"
        )
    return "\n".join(lines)


@dataclass
class SkewPairSelection:
    """What :func:`select_skew_pairs` chose, and the table it chose from.

    ``skew``, ``density``, ``pairs`` (zero-based ``(P, 2)`` int64), ``mean``, ``low``, ``high``:
    the chosen configuration and its bootstrap interval. ``best``: the table row of the
    configuration with the highest mean. ``table``: one dict per configuration, in the order
    tried, with keys ``skew``, ``density``, ``n_pairs``, ``pairs`` (tuple of ``(i, j)``),
    ``mean``, ``low``, ``high`` (None when skipped), ``best``, ``chosen``, ``tied`` (interval
    overlaps the best's), ``skipped`` and ``note`` (why skipped, or which configuration has the
    same pairs).
    """

    skew: int
    density: float
    pairs: Tensor
    mean: float
    low: float
    high: float
    best: dict[str, Any]
    table: list[dict[str, Any]] = field(repr=False)
    level: float = 0.95
    n_boot: int = 1000
    n_examples: int = 0

    def to_markdown(self) -> str:
        """The table as GitHub markdown, best and chosen rows marked."""
        return selection_markdown(self.table, self.level)


def _outcomes(value: object, where: str) -> np.ndarray:
    """``score``'s return value as a finite float64 1-d array of at least one outcome."""
    if isinstance(value, Tensor):
        arr = value.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{NAME}: score(pairs) for {where} returned {type(value).__name__}, not a 1-d sequence "
                "of per-example floats"
            ) from err
    if arr.ndim != 1:
        raise ValueError(
            f"{NAME}: score(pairs) for {where} returned shape {arr.shape}; expected a 1-d sequence of "
            "per-example validation outcomes (e.g. 0/1 correctness), not a single summary number"
        )
    if arr.size == 0:
        raise ValueError(f"{NAME}: score(pairs) for {where} returned no outcomes; expected at least one")
    bad = ~np.isfinite(arr)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{NAME}: score(pairs) for {where} returned a non-finite outcome ({arr[k]} at index {k}); "
            "expected finite per-example values"
        )
    return arr


def _bootstrap_means(outcomes: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """``(C, n_boot)`` bootstrap means; resample b draws the same example indices for every
    configuration (a paired bootstrap: each interval depends only on its own outcomes and
    the seed, not on which other configurations are listed)."""
    data = np.stack(outcomes)  # (C, n)
    n = data.shape[1]
    rng = np.random.default_rng(seed)
    means = np.empty((data.shape[0], n_boot))
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[:, start:stop] = data[:, idx].mean(axis=-1)
    return means


def select_skew_pairs(
    score: Callable[[Tensor], Sequence[float] | np.ndarray | Tensor],
    la: int,
    lb: int,
    skews: Sequence[int],
    densities: Sequence[float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> SkewPairSelection:
    """Bootstrapping sparsity: the sparsest skew-pair set not worse than the best one.

    For every ``skew`` in ``skews`` and ``density`` in ``densities`` the pairs are
    ``fusionops.skew_pairs(la, lb, skew, density)``; a configuration that gives no pair is
    skipped (listed as such in the table). ``score(pairs)`` returns the per-example validation
    outcomes of a model fused over ``pairs`` (a 1-d list, array or tensor of floats, higher is
    better, e.g. 0/1 correctness; negate a loss), for the same examples every time. It is
    called once per distinct pair set (configurations giving the same pairs share the result).

    Rule: each configuration's mean gets a ``level`` percentile bootstrap interval from
    ``n_boot`` resamples of the examples (``numpy.random.default_rng(seed)``; the same
    resamples for every configuration). The *best* configuration has the highest mean. The
    *chosen* one is, among those whose interval overlaps the best's, the one with the fewest
    pairs; ties go to the higher mean, then the smaller ``|skew|``, then the smaller density,
    then the order listed. Sparser pair sets are cheaper and, per SSFN, generalise as well when
    their score is statistically indistinguishable from the best.

    Raises ValueError on empty ``skews`` or ``densities``, a density outside (0, 1], ``n_boot <
    1``, ``level`` outside (0, 1), no configuration giving pairs, or ``score`` returning
    something other than finite 1-d outcomes of one length for every configuration (the
    message names the configuration).
    """
    for label, depth in (("la", la), ("lb", lb)):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"{NAME}: {label} must be a layer count >= 1, got {depth!r}")
    skews, densities = list(skews), list(densities)
    if not skews:
        raise ValueError(f"{NAME}: skews is empty; expected at least one skew")
    if not densities:
        raise ValueError(f"{NAME}: densities is empty; expected at least one density")
    for s in skews:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"{NAME}: every skew must be an int, got {s!r}")
    for d in densities:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"{NAME}: every density must be in (0, 1], got {d!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"{NAME}: n_boot must be an int >= 1, got {n_boot!r}")
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"{NAME}: level must be in (0, 1), got {level!r}")
    if not callable(score):
        raise TypeError(f"{NAME}: score must be callable as score(pairs), got {type(score).__name__}")

    table: list[dict[str, Any]] = []
    pair_sets: dict[tuple[tuple[int, int], ...], int] = {}  # distinct pair set -> its index
    first_of: list[str] = []  # the configuration that first gave each distinct pair set
    outcomes: list[np.ndarray] = []
    for skew in skews:
        skew = int(skew)
        for density in densities:
            where = f"skew={skew}, density={density:.4g}"
            row: dict[str, Any] = {"skew": skew, "density": float(density), "n_pairs": 0, "pairs": ()}
            row |= {"mean": None, "low": None, "high": None, "best": False, "chosen": False}
            row |= {"tied": False, "skipped": False, "note": ""}
            table.append(row)
            pairs = _pairs_or_none(la, lb, skew, float(density))
            if pairs is None:
                row["skipped"] = True
                row["note"] = _why_no_pairs(la, lb, skew, float(density))
                continue
            key = tuple(tuple(p) for p in pairs.tolist())
            row["n_pairs"], row["pairs"] = len(key), key
            if key in pair_sets:
                row["set"] = pair_sets[key]
                row["note"] = f"same pairs as {first_of[pair_sets[key]]}"
                continue
            arr = _outcomes(score(pairs.clone()), where)
            if outcomes and arr.size != outcomes[0].size:
                raise ValueError(
                    f"{NAME}: score(pairs) for {where} returned {arr.size} outcomes but for "
                    f"{first_of[0]} it returned {outcomes[0].size}; every configuration must be scored "
                    "on the same validation examples"
                )
            pair_sets[key] = row["set"] = len(outcomes)
            first_of.append(where)
            outcomes.append(arr)
    if not outcomes:
        raise ValueError(
            f"{NAME}: no configuration gives pairs for la={la}, lb={lb} (possible skews are "
            f"{-(lb - 1)} to {la - 1}; the smallest density giving a pair is {0.5 / min(la, lb):.4g})"
        )

    means = _bootstrap_means(outcomes, n_boot, seed)
    tail = 100 * (1 - level) / 2
    lows, highs = np.percentile(means, [tail, 100 - tail], axis=1)
    for row in table:
        if not row["skipped"]:
            k = row["set"]
            row |= {"mean": float(outcomes[k].mean()), "low": float(lows[k]), "high": float(highs[k])}

    scored = [(k, row) for k, row in enumerate(table) if not row["skipped"]]
    best_at, best = min(scored, key=lambda kr: (-kr[1]["mean"], kr[0]))
    best["best"] = True
    for _, row in scored:
        row["tied"] = row["high"] >= best["low"] and row["low"] <= best["high"]
    tied = [(k, row) for k, row in scored if row["tied"]]
    _, chosen = min(
        tied, key=lambda kr: (kr[1]["n_pairs"], -kr[1]["mean"], abs(kr[1]["skew"]), kr[1]["density"], kr[0])
    )
    chosen["chosen"] = True
    for row in table:
        row.pop("set", None)
    return SkewPairSelection(
        skew=chosen["skew"],
        density=chosen["density"],
        pairs=torch.tensor(chosen["pairs"], dtype=torch.int64).reshape(-1, 2),
        mean=chosen["mean"],
        low=chosen["low"],
        high=chosen["high"],
        best=best,
        table=table,
        level=float(level),
        n_boot=n_boot,
        n_examples=int(outcomes[0].size),
    )


def _pairs_or_none(la: int, lb: int, skew: int, density: float) -> Tensor | None:
    """``skew_pairs(...)``, or None when the configuration gives no pair (arguments are valid)."""
    if pair_count(min(la, lb), density) == 0 or not -(lb - 1) <= skew <= la - 1:
        return None
    return skew_pairs(la, lb, skew, density)


def _why_no_pairs(la: int, lb: int, skew: int, density: float) -> str:
    if pair_count(min(la, lb), density) == 0:
        return f"density rounds to 0 of {min(la, lb)} layers (needs >= {0.5 / min(la, lb):.4g})"
    return f"skew outside {-(lb - 1)}..{la - 1} for la={la}, lb={lb}"


__all__ = ["SkewPairSelection", "select_skew_pairs", "selection_markdown"]
