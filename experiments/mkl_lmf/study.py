"""The whole study: MKL on two data sets, then LMF vs tensor fusion; JSON, markdown, PNGs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import fusionops
from experiments import atomic, provenance
from experiments.mkl_lmf import plots, report
from experiments.mkl_lmf.lmf_part import LMFConfig, run_lmf
from experiments.mkl_lmf.mkl_part import MKLConfig, run_dataset

RESULTS = Path(__file__).resolve().parent / "results"
FILES = ("results.json", "results.md", "kpca_digits.png", "kpca_simulated.png", "lmf_loss.png")


@dataclass(frozen=True)
class StudyConfig:
    """Everything a run depends on. Seed ``k`` of ``n_seeds`` is ``seed + k``: it draws the
    split (digits), the sample (simulated sets) and the model initialisation."""

    mkl: MKLConfig = field(default_factory=MKLConfig)
    lmf: LMFConfig = field(default_factory=LMFConfig)
    n_seeds: int = 8
    seed: int = 0
    threads: int = 2
    parts: tuple[str, ...] = ("mkl", "lmf")

    @classmethod
    def quick(cls, **changes: Any) -> StudyConfig:
        """Well under a minute: smaller sets, fewer steps and epochs, four seeds (an interval)."""
        base = cls(
            mkl=MKLConfig(steps=10, digits_train=300, sim_train=200, sim_test=200, plot_points=200),
            lmf=LMFConfig(
                n_train=800,
                n_val=200,
                n_test=400,
                epochs=12,
                tfn_timing_batches=1,
                timing_batches=4,
                timing_rounds=2,
            ),
            n_seeds=4,
        )
        return replace(base, **changes)

    def __post_init__(self) -> None:
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {self.n_seeds}")
        unknown = set(self.parts) - {"mkl", "lmf"}
        if unknown or not self.parts:
            raise ValueError(f"parts must be a non-empty subset of ('mkl', 'lmf'), got {self.parts}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mkl": self.mkl.to_dict(),
            "lmf": self.lmf.to_dict(),
            "n_seeds": self.n_seeds,
            "seed": self.seed,
            "threads": self.threads,
            "parts": list(self.parts),
        }


def run_study(cfg: StudyConfig, out: Path = RESULTS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the parts ``cfg.parts`` and write results.json, results.md and the PNGs into ``out``."""
    wall = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    seeds = [cfg.seed + k for k in range(cfg.n_seeds)]
    out = Path(out)
    timings: dict[str, float] = {}
    before = fusionops.dispatch_counts()
    res: dict[str, Any] = {
        "study": "from MKL to low-rank tensors (experiments/mkl_lmf)",
        "config": cfg.to_dict(),
        "seeds": seeds,
    }
    if "mkl" in cfg.parts:
        start = time.perf_counter()
        log(f"MKL: digits views and simulated modalities, {len(seeds)} seed(s)")
        res["mkl"] = {kind: run_dataset(kind, cfg.mkl, seeds, log) for kind in ("digits", "simulated")}
        timings["mkl_s"] = time.perf_counter() - start
    if "lmf" in cfg.parts:
        start = time.perf_counter()
        log(f"LMF: rank {cfg.lmf.rank}, one output, {cfg.lmf.epochs} epochs, {len(seeds)} seed(s)")
        res["lmf"] = run_lmf(cfg.lmf, seeds, log)
        timings["lmf_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - wall
    res["timings_s"] = timings
    res["environment"] = provenance.environment(("scikit-learn", "matplotlib"))
    res["environment"]["threads"] = cfg.threads
    # which fusionops backend served each op in this study (calls, eager)
    res["backends"] = provenance.count_delta(before, fusionops.dispatch_counts())
    _write(res, out, log)
    return res


def _plots(res: dict[str, Any], out: Path) -> None:
    if "mkl" in res:
        plots.plot_kpca(
            res["mkl"]["digits"],
            out / "kpca_digits.png",
            f"scikit-learn digits (real images, three views), test rows of seed {res['seeds'][0]} (one of "
            f"{len(res['seeds'])}): kernel PCA of each view's RBF kernel and of the combined kernels",
        )
        plots.plot_kpca(
            res["mkl"]["simulated"],
            out / "kpca_simulated.png",
            "synthetic modalities (ours: visual strong, audio weak, text noise), seed "
            f"{res['seeds'][0]} (one of {len(res['seeds'])}): kernel PCA of single and combined kernels",
        )
    if "lmf" in res:
        plots.plot_losses(
            res["lmf"],
            out / "lmf_loss.png",
            f"synthetic (ours) (128, 64, 300) regression, {res['config']['lmf']['n_train']} training rows: "
            f"MSE per epoch; line = mean, band = ± 1 sd over {len(res['seeds'])} seed(s)",
        )


def _write(res: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    _plots(res, out)
    res["claims"] = report.claims(res)
    res["verdicts"] = report.verdicts(res)
    atomic.write_json(out / "results.json", res)
    atomic.write_text(out / "results.md", report.markdown(res))
    log(f"wrote {out} ({res['timings_s']['total_s']:.0f} s)")
    for line in res["verdicts"].values():
        log(f"  {line}")


def render(out: Path = RESULTS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Redraw the PNGs and results.md and recompute the verdicts from ``out/results.json``."""
    res = json.loads((Path(out) / "results.json").read_text())
    _write(res, Path(out), log)
    return res
