"""The study's markdown report (files are written by ``experiments.atomic``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _density(d: float, depth: int) -> str:
    k = d * depth
    return f"{round(k)}/{depth}" if abs(k - round(k)) < 1e-9 else f"{d:.3g}"


def sweep_table(rows: Sequence[dict[str, Any]], depth: int) -> str:
    """Markdown: test accuracy (mean ± sd over seeds) per skew (rows) and density (columns);
    ``†`` marks the configurations whose pairs reach both planted depths (``task.reaches``)."""
    densities = sorted({r["density"] for r in rows})
    skews = sorted({r["skew"] for r in rows})
    cell = {(r["skew"], r["density"]): r for r in rows}
    head = "| skew | " + " | ".join(f"η = {_density(d, depth)}" for d in densities) + " |"
    lines = [head, "|---:|" + "---:|" * len(densities)]
    for s in skews:
        parts = []
        for d in densities:
            r = cell.get((s, d))
            if r is None:
                parts.append("—")
                continue
            mark = " †" if r.get("reaches") else ""
            parts.append(f"{r['test_acc']:.3f} ± {r['test_acc_std']:.3f}{mark}")
        lines.append(f"| {s:+d} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def probe_table(probes: dict[str, list[float]]) -> str:
    """Markdown: probe accuracy per layer (rows) for each probe (columns)."""
    names = list(probes)
    depth = max(len(v) for v in probes.values())
    lines = ["| layer | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for layer in range(depth):
        vals = [f"{probes[n][layer]:.3f}" if layer < len(probes[n]) else "—" for n in names]
        lines.append(f"| {layer} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
