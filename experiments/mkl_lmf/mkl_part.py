"""Part (a): multiple kernel learning on the digit views and on the simulated modalities.

Per data set and seed: a seeded split, features standardized on the training rows, then
``fusionops.MultipleKernelRidgeClassifier`` with one RBF kernel (γ = 1/d) per view fit three
ways: β learned on the simplex, β uniform (``steps=0``), and each view alone. For every
seed, the kernel-PCA embeddings of (up to ``plot_points``) test rows under every single kernel
and under the combined kernels, and their Fisher ratios; the first seed's are plotted."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

import fusionops
from experiments.mkl_lmf import data
from experiments.mkl_lmf.kpca import fisher_ratio, kernel_pca


@dataclass(frozen=True)
class MKLConfig:
    """Estimator and split settings shared by both data sets."""

    alpha: float = 0.1  # ridge penalty λ (the estimator's default)
    steps: int = 30  # Adam steps on the β logits
    lr: float = 0.1
    digits_train: int = 500  # the rest of the 1797 digits are test rows
    sim_train: int = 400
    sim_test: int = 400
    plot_points: int = 400  # test rows embedded by kernel PCA (first seed)
    sim: data.SimulatedMKL = data.SimulatedMKL()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def _classifier(cfg: MKLConfig, count: int, steps: int) -> fusionops.MultipleKernelRidgeClassifier:
    return fusionops.MultipleKernelRidgeClassifier(["rbf"] * count, alpha=cfg.alpha, steps=steps, lr=cfg.lr)


def single_gram(x: Tensor) -> Tensor:
    """The RBF (γ = 1/d) Gram matrix of one view, through the fused op with β = (1,)."""
    return fusionops.multiple_kernel([x], None, torch.ones(1, dtype=x.dtype), ["rbf"])


def _embeddings(
    names: tuple[str, ...], test: list[Tensor], labels: Tensor, learned: Any, uniform: Any
) -> list[dict[str, Any]]:
    """Kernel-PCA panels: each single kernel, then uniform and learned β (normalized kernels,
    exactly the Gram matrices the classifiers use)."""
    panels = []
    with torch.no_grad():
        grams = [(name, single_gram(x)) for name, x in zip(names, test, strict=True)]
        grams.append(("combined, uniform β", uniform.fusion_(test)))
        grams.append(("combined, learned β", learned.fusion_(test)))
    for name, gram in grams:
        coords = kernel_pca(gram)
        rounded = [[round(v, 5) for v in row] for row in coords.tolist()]  # for the plot only
        panels.append({"name": name, "coords": rounded, "fisher": fisher_ratio(coords, labels)})
    return panels


def run_dataset(kind: str, cfg: MKLConfig, seeds: list[int], log: Callable[[str], None]) -> dict[str, Any]:
    """Fit and score one data set (``"digits"`` or ``"simulated"``) over ``seeds``."""
    runs = []
    panels: list[dict[str, Any]] = []
    plot_labels: list[int] = []
    for seed in seeds:
        start = time.perf_counter()
        if kind == "digits":
            full = data.digit_views()
            train, test = data.split(len(full), cfg.digits_train, seed)
        elif kind == "simulated":
            full = cfg.sim.make(cfg.sim_train + cfg.sim_test, seed)
            train, test = data.split(len(full), cfg.sim_train, seed)
        else:
            raise ValueError(f"unknown data set {kind!r}")
        views = data.standardize(full.views, train)
        xs_tr, xs_te = [v[train] for v in views], [v[test] for v in views]
        y_tr, y_te = full.labels[train], full.labels[test]
        m = len(views)
        learned = _classifier(cfg, m, cfg.steps).fit(xs_tr, y_tr)
        uniform = _classifier(cfg, m, 0).fit(xs_tr, y_tr)
        single = [
            _classifier(cfg, 1, 0).fit([x], y_tr).score([xt], y_te)
            for x, xt in zip(xs_tr, xs_te, strict=True)
        ]
        run = {
            "seed": seed,
            "n_train": len(train),
            "n_test": len(test),
            "beta": learned.beta_.tolist(),
            "steps_taken": len(learned.history_),
            "objective": learned.history_,
            "acc_learned": learned.score(xs_te, y_te),
            "acc_uniform": uniform.score(xs_te, y_te),
            "acc_single": single,
            "seconds": 0.0,
        }
        keep = torch.arange(min(cfg.plot_points, len(test)))
        seed_panels = _embeddings(full.names, [x[keep] for x in xs_te], y_te[keep], learned, uniform)
        run["fisher"] = {p["name"]: p["fisher"] for p in seed_panels}
        if not panels:  # the first seed's embeddings are plotted
            plot_labels, panels = y_te[keep].tolist(), seed_panels
        run["seconds"] = time.perf_counter() - start
        runs.append(run)
        log(
            f"  {kind} seed {seed}: β = {[round(b, 3) for b in run['beta']]}, "
            f"learned {run['acc_learned']:.3f}, uniform {run['acc_uniform']:.3f}, "
            f"single {[round(a, 3) for a in single]} ({run['seconds']:.1f} s)"
        )
    names = list(full.names)
    summary = {
        "beta": [_mean_sd([r["beta"][i] for r in runs]) for i in range(len(names))],
        "acc_learned": _mean_sd([r["acc_learned"] for r in runs]),
        "acc_uniform": _mean_sd([r["acc_uniform"] for r in runs]),
        "acc_single": [_mean_sd([r["acc_single"][i] for r in runs]) for i in range(len(names))],
        "beta_rank": sorted(range(len(names)), key=lambda i: -statistics.fmean(r["beta"][i] for r in runs)),
        "beta_rank_every_seed": [sorted(range(len(names)), key=lambda i, r=r: -r["beta"][i]) for r in runs],
    }
    kernels = list(runs[0]["fisher"])
    fisher = {k: _mean_sd([r["fisher"][k] for r in runs]) for k in kernels}

    def beats(r: dict[str, Any], combined: str) -> bool:
        return r["fisher"][combined] > max(r["fisher"][v] for v in names)

    learned_wins = sum(beats(r, "combined, learned β") for r in runs)
    uniform_wins = sum(beats(r, "combined, uniform β") for r in runs)
    return {
        "kind": kind,
        "views": names,
        "n_classes": int(len(torch.unique(full.labels))),
        "runs": runs,
        "summary": summary,
        "kpca": {"seed": seeds[0], "labels": plot_labels, "panels": panels},
        "separability": {
            "fisher": fisher,
            "learned_wins": learned_wins,
            "uniform_wins": uniform_wins,
            "n_seeds": len(runs),
            "learned_beats_every_single": learned_wins == len(runs),
            "uniform_beats_every_single": uniform_wins == len(runs),
        },
    }
