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


def caption(res: dict[str, Any], bands: bool = True) -> str:
    """The figure's source line: data (synthetic or real), seeds, what the bands are."""
    seeds = sorted({r["seed"] for r in res["runs"]})
    data = (
        "real data (the paper's tweet embeddings)"
        if res["config"].get("real")
        else "synthetic data (ours; label = sign of a sum of products of latents: favours product fusion)"
    )
    text = f"{data}; {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    if res["config"].get("val_size") is not None:
        text += f"; best epoch on {res['config']['val_size']:g} × n validation examples"
    if bands:
        text += "\nline = mean over seeds, band = ± 1 sd over seeds (verdicts: paired intervals, results.md)"
    return text


def _band(ax: Any, x: list[float], mean: list[float], sd: list[float], fusion: str) -> None:
    color = COLORS.get(fusion)
    ax.plot(x, mean, marker=MARKERS.get(fusion, "o"), color=color, label=LABELS.get(fusion, fusion), ms=4)
    lo = [m - s for m, s in zip(mean, sd, strict=True)]
    hi = [m + s for m, s in zip(mean, sd, strict=True)]
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)


def plot_accuracy_vs_size(res: dict[str, Any], path: Path) -> Path:
    """Two panels: clean test accuracy and ROC AUC (mean ± sd band) against the training-set size."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
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
        ax.set_title(f"clean {title} vs training-set size", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(caption(res), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_robustness(res: dict[str, Any], path: Path) -> Path:
    """Three panels (noise on img, on text, on both): test accuracy against σ / std."""
    conds = ("img", "text", "both")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), sharey=True)
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
    fig.suptitle(
        f"robustness: models trained on n = {res['robustness_size']}, Gaussian noise added at test time\n"
        + caption(res),
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _mean_auc(res: dict[str, Any], fusion: str, roc: dict[str, Any], noisy: bool) -> float | None:
    """Mean test ROC AUC over seeds for the panel's setting, when the results hold it."""
    if noisy:
        vals = [
            r["roc_auc"]
            for r in res.get("robustness_runs", [])
            if r["fusion"] == fusion
            and r["condition"] == roc.get("condition")
            and r["sigma"] == roc.get("sigma")
            and r.get("roc_auc") is not None
        ]
        return sum(vals) / len(vals) if vals else None
    row = next(
        (r for r in res["accuracy_vs_size"] if r["fusion"] == fusion and r["size"] == roc["size"]), None
    )
    return row["roc_auc_mean"] if row else None


def plot_roc(res: dict[str, Any], path: Path) -> Path:
    """ROC curves of every fusion, one seed: clean at the smallest size (where the fusions
    differ), and, when the run has noise, at the robustness size under noise on both modalities."""
    panels = [("roc", False)]
    if (res.get("roc_noisy") or {}).get("curves"):
        panels.append(("roc_noisy", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.6), squeeze=False)
    for ax, (key, noisy) in zip(axes[0], panels, strict=True):
        roc = res[key]
        for f, c in roc["curves"].items():
            mean = _mean_auc(res, f, roc, noisy)
            extra = f", mean over seeds {mean:.3f}" if mean is not None else ""
            ax.plot(
                c["fpr"],
                c["tpr"],
                color=COLORS.get(f),
                label=f"{LABELS.get(f, f)} (AUC {c['auc']:.3f}{extra})",
            )
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        where = f"n = {roc['size']}"
        if noisy:
            where += f", noise σ = {roc['sigma']:g} × std on {roc['condition']}"
        ax.set_title(f"ROC, {where}, seed {roc['seed']}", fontsize=10)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(caption(res, bands=False) + "; curves of one seed", fontsize=8)
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
