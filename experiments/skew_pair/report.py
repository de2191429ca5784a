"""The study's markdown report (files are written by ``experiments.atomic``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiments import stats


def _density(d: float, depth: int) -> str:
    k = d * depth
    return f"{round(k)}/{depth}" if abs(k - round(k)) < 1e-9 else f"{d:.3g}"


def sweep_table(rows: Sequence[dict[str, Any]], depth: int) -> str:
    """Markdown: test accuracy (mean ± sd over seeds; the value alone for one seed) per skew
    (rows) and density (columns); ``†`` marks the configurations whose pairs reach both planted
    depths (``task.reaches``)."""
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
            spread = f" ± {r['test_acc_std']:.3f}" if len(r.get("test_acc_seeds", ())) > 1 else ""
            parts.append(f"{r['test_acc']:.3f}{spread}{mark}")
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


def comparison_table(comparison: dict[str, Any]) -> str:
    """Markdown: the three models' test accuracy over the comparison seeds."""
    lines = ["| model | pairs | test accuracy (mean ± sd) | per seed |", "|---|---:|---:|---|"]
    for m in comparison["models"].values():
        sd = f" ± {m['test_acc_std']:.3f}" if m["test_acc_std"] is not None else ""
        seeds = ", ".join(f"{x:.3f}" for x in m["test_acc_seeds"])
        n_pairs = len(m["pairs"]) or "— (final layers)"
        lines.append(f"| {m['label']} | {n_pairs} | {m['test_acc']:.3f}{sd} | {seeds} |")
    return "\n".join(lines)


def comparison_lines(comparison: dict[str, Any]) -> list[str]:
    """The verdict section of results.md: the rule, the three models, the paired differences."""
    n = len(comparison["seeds"])
    lines = [
        "## The paper's comparison: SSFN against late and pairwise fusion",
        "",
        f'Claim (seed README, findings 3–4: SSFN "outperforms late- and pairwise-fusion counterparts"): '
        f"**{comparison['verdict']}**. {n} head seeds ({', '.join(map(str, comparison['seeds']))}), the same "
        "for the three models; test split.",
        "",
        comparison["rule"],
        "",
        comparison_table(comparison),
        "",
        "| difference (per seed, test accuracy) | mean [95% interval] | seeds | verdict |",
        "|---|---:|---:|---|",
    ]
    for name, iv in comparison["ssfn_minus"].items():
        label = comparison["models"][name]["label"]
        lines.append(f"| SSFN − {label} | {stats.fmt(iv)} | {iv['n']} | {iv['verdict']} |")
    return lines
