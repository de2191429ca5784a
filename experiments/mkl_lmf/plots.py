"""The study's figures: kernel-PCA scatter panels (one PNG per MKL data set) and the LMF / TFN
loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.atomic import save_figure  # noqa: E402

LABELS = {
    "lmf_direct": "LMF rank 4 on the features",
    "lmf_encoded": "linear encoders + LMF rank 4",
    "tfn_encoded": "linear encoders + tensor fusion",
}


def plot_kpca(result: dict[str, Any], path: Path, title: str) -> None:
    """One panel per kernel: the test rows in the top two kernel principal components,
    coloured by class, with the panel's Fisher ratio."""
    kp = result["kpca"]
    labels = np.asarray(kp["labels"])
    panels = kp["panels"]
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6))
    for ax, panel in zip(np.atleast_1d(axes), panels, strict=True):
        xy = np.asarray(panel["coords"])
        for k, c in enumerate(classes):
            pts = xy[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=7, color=cmap(k % cmap.N), label=str(c), alpha=0.75)
        ax.set_title(f"{panel['name']}\nFisher ratio {panel['fisher']:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("kPC 1", fontsize=8)
        ax.set_ylabel("kPC 2", fontsize=8)
    np.atleast_1d(axes)[-1].legend(
        fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class"
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_losses(lmf: dict[str, Any], path: Path, title: str) -> None:
    """Training loss and validation MSE per epoch (mean over seeds, band = ± sd), one panel per
    model, with the noise floor (best possible MSE) drawn in."""
    runs = lmf["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), sharey=True)
    floor = 1 - lmf["best_r2"]
    for ax, (name, rs) in zip(np.atleast_1d(axes), runs.items(), strict=True):
        for key, label, color, start in (
            ("train_loss", "train (epoch mean)", "tab:blue", 1),
            ("val_mse", "validation", "tab:orange", 0),
        ):
            curves = np.asarray([r[key] for r in rs])
            x = np.arange(start, start + curves.shape[1])
            mean, sd = curves.mean(0), curves.std(0)
            ax.plot(x, mean, color=color, label=label)
            ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2)
        ax.axhline(floor, color="0.4", linestyle=":", label=f"noise floor {floor:.2f}")
        s = lmf["summary"][name]
        ax.set_title(
            f"{LABELS.get(name, name)}\n{s['params']:,} params, test R² {s['test_r2']['mean']:.3f}",
            fontsize=9,
        )
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
    np.atleast_1d(axes)[0].set_ylabel("MSE (target variance 1)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
