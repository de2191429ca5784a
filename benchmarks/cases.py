"""Which cases a report run measures: a named grid, the headline, or cases picked by name.

The cases themselves (shapes, dtypes, inputs) are defined per op in ``benchmarks/ops/``.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.spec import CaseBase, OpSpec


def select(
    spec: OpSpec, device: str, *, quick: bool = False, full: bool = False, names: Sequence[str] = ()
) -> tuple[list[CaseBase], str]:
    """The cases of ``spec`` to run and a label for the file name ('' for the default grid).

    ``names`` may hold 'headline' (the op's goal cases) and case names; names this op does
    not know are ignored here (another op may know them, see :func:`unknown_names`).
    """
    grids, headline = spec.grids[device], list(spec.headline[device])
    if quick:
        return list(grids["quick"]), "quick"
    if full:
        return list(grids["default"]) + headline, "full"
    if not names:
        return list(grids["default"]), ""
    known = {c.name: c for c in spec.all_cases(device)}
    picked: dict[str, CaseBase] = {}
    for name in names:
        for case in headline if name == "headline" else [known[name]] if name in known else []:
            picked[case.name] = case
    cases = list(picked.values())
    return cases, "headline" if cases == headline else "cases"


def unknown_names(specs: Sequence[OpSpec], device: str, names: Sequence[str]) -> list[str]:
    """The names in ``names`` that no op in ``specs`` knows on ``device``."""
    known = {"headline"} | {c.name for s in specs for c in s.all_cases(device)}
    return [n for n in names if n not in known]


def is_headline(spec: OpSpec, device: str, case: CaseBase) -> bool:
    return any(c.name == case.name for c in spec.headline[device])
