"""The study's figure: score against skew, one line per density (as in the SSFN paper's figures),
plus the per-layer probes that show where the task planted each bit."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.atomic import save_figure  # noqa: E402


def density_label(density: float, depth: int = 12) -> str:
    """``"3/12"`` when ``density`` is a multiple of ``1/depth``, else three digits."""
    k = density * depth
    return f"{round(k)}/{depth}" if abs(k - round(k)) < 1e-9 else f"{density:.3g}"


def plot_study(
    rows: Sequence[dict[str, Any]],
    selection: dict[str, Any],
    probes: dict[str, list[float]],
    lines: dict[str, float],
    path: Path,
    title: str,
    test_lines: dict[str, float] | None = None,
) -> None:
    """Write the three-panel PNG to ``path``.

    ``rows``: sweep summaries (skew, density, n_pairs, test_acc, test_acc_std, …).
    ``selection``: the selection's table rows (skew, density, mean, low, high, best, chosen).
    ``probes``: ``{"bit a from A": [...], "bit b from B": [...]}`` accuracies per layer.
    ``lines``: horizontal reference lines ``{label: accuracy}`` on both accuracy panels (chance,
    ceiling); ``test_lines``: lines on the test panel only (the baselines' test accuracy).
    """
    densities = sorted({r["density"] for r in rows})
    colors = dict(
        zip(densities, plt.get_cmap("viridis")([0.1, 0.5, 0.85, 0.3, 0.7][: len(densities)]), strict=False)
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), width_ratios=[1.2, 1.2, 1])

    ax = axes[0]
    for d in densities:
        pts = sorted((r for r in rows if r["density"] == d), key=lambda r: r["skew"])
        n_pairs = max(r["n_pairs"] for r in pts)
        ax.errorbar(
            [r["skew"] for r in pts],
            [r["test_acc"] for r in pts],
            yerr=[r["test_acc_std"] for r in pts],
            marker="o",
            capsize=3,
            color=colors[d],
            label=f"η = {density_label(d)} ({n_pairs} pair{'s' if n_pairs > 1 else ''})",
        )
    ax.set_title("test accuracy (mean ± 1 sd over seeds; no bar for one seed)", fontsize=10)

    ax = axes[1]
    table = [r for r in selection["table"] if not r["skipped"]]
    for d in densities:
        pts = sorted((r for r in table if abs(r["density"] - d) < 1e-12), key=lambda r: r["skew"])
        x = [r["skew"] for r in pts]
        y = [r["mean"] for r in pts]
        err = [[r["mean"] - r["low"] for r in pts], [r["high"] - r["mean"] for r in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colors[d], label=f"η = {density_label(d)}")
    best, chosen = selection["best"], selection["chosen"]
    ax.axhspan(best["low"], best["high"], color="0.85", zorder=0, label="best's bootstrap interval")
    ax.plot(
        [chosen["skew"]],
        [chosen["mean"]],
        marker="*",
        markersize=18,
        color="crimson",
        linestyle="none",
        label=f"chosen: s = {chosen['skew']:+d}, η = {density_label(chosen['density'])}",
    )
    ax.set_title("validation accuracy (seed mean, 95% bootstrap) and selection")

    styles = [(":", "0.4"), ("--", "0.4"), ("-.", "tab:orange"), ((0, (5, 1)), "tab:brown")]
    for i, ax in enumerate(axes[:2]):
        shown = {**lines, **(test_lines or {})} if i == 0 else lines
        for k, (label, value) in enumerate(shown.items()):
            style, color = styles[k % len(styles)]
            ax.axhline(value, color=color, linestyle=style, linewidth=1.2, label=label)
        ax.set_xlabel("skew s (layer i of A with layer i − s of B)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="center left")
    axes[1].legend(fontsize=8, loc="center left")

    ax = axes[2]
    for label, accs in probes.items():
        ax.plot(range(len(accs)), accs, marker="o", label=label)
    ax.set_xlabel("layer (zero-based, embeddings dropped)")
    ax.set_ylabel("held-out accuracy of a linear probe")
    ax.set_title("where each bit can be read")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    fig.suptitle("\n".join(textwrap.wrap(title, 170)), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
