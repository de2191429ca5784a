"""The studies' figures (matplotlib, Agg): accuracy/AUC against training-set size, robustness
panels (noise on img / text / both) and ROC curves. Each PNG is written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import atomic  # noqa: E402
from experiments.tweet.report import LABELS  # noqa: E402

COLORS = {"concat": "tab:blue", "product": "tab:red", "tensorfusion": "tab:green", "lowrank": "tab:purple"}
MARKERS = {"concat": "o", "product": "s", "tensorfusion": "^", "lowrank": "D"}


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically and close it."""
    try:
        return atomic.save_figure(fig, path)
    finally:
        plt.close(fig)


def _fusions(res: dict[str, Any]) -> list[str]:
    present = {r["fusion"] for r in res["accuracy_vs_size"]}
    return [f for f in res["config"]["fusions"] if f in present]


def _band(ax: Any, x: list[float], mean: list[float], sd: list[float], fusion: str) -> None:
    color = COLORS.get(fusion)
    ax.plot(x, mean, marker=MARKERS.get(fusion, "o"), color=color, label=LABELS.get(fusion, fusion), ms=4)
    lo = [m - s for m, s in zip(mean, sd, strict=True)]
    hi = [m + s for m, s in zip(mean, sd, strict=True)]
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)


def plot_accuracy_vs_size(res: dict[str, Any], path: Path) -> Path:
    """Two panels: clean test accuracy and ROC AUC (mean ± sd band) against the training-set size."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(
        axes, ("accuracy", "roc_auc"), ("test accuracy", "test ROC AUC"), strict=True
    ):
        for f in _fusions(res):
            rows = sorted(
                (r for r in res["accuracy_vs_size"] if r["fusion"] == f and r[f"{metric}_mean"] is not None),
                key=lambda r: r["n_train"],
            )
            if rows:
                _band(
                    ax,
                    [r["n_train"] for r in rows],
                    [r[f"{metric}_mean"] for r in rows],
                    [r[f"{metric}_sd"] or 0.0 for r in rows],
                    f,
                )
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training examples")
        ax.set_ylabel(title)
        ax.set_title(f"clean {title} vs training-set size")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_robustness(res: dict[str, Any], path: Path) -> Path:
    """Three panels (noise on img, on text, on both): test accuracy against σ / std."""
    conds = ("img", "text", "both")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, cond in zip(axes, conds, strict=True):
        for f in _fusions(res):
            rows = sorted(
                (r for r in res["robustness"] if r["fusion"] == f and r["condition"] == cond),
                key=lambda r: r["sigma"],
            )
            if rows:
                _band(
                    ax,
                    [r["sigma"] for r in rows],
                    [r["accuracy_mean"] for r in rows],
                    [r["accuracy_sd"] or 0.0 for r in rows],
                    f,
                )
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("noise σ / modality std")
        ax.set_title(f"noise on {cond}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"robustness (models trained on n = {res['robustness_size']})")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc(res: dict[str, Any], path: Path) -> Path:
    """ROC curves of every fusion (one size, one seed) with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for f, c in res["roc"]["curves"].items():
        ax.plot(c["fpr"], c["tpr"], color=COLORS.get(f), label=f"{LABELS.get(f, f)} (AUC {c['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC, n = {res['roc']['size']}, seed {res['roc']['seed']}")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_all(res: dict[str, Any], out: Path) -> list[Path]:
    """Write ``accuracy_vs_size.png``, ``robustness.png`` and ``roc.png`` into ``out``."""
    out = Path(out)
    return [
        plot_accuracy_vs_size(res, out / "accuracy_vs_size.png"),
        plot_robustness(res, out / "robustness.png"),
        plot_roc(res, out / "roc.png"),
    ]
