"""``python -m experiments.reproduce [--quick] [--out DIR] [--seeds N]``: the tweet fusion comparison
and robustness studies (Michaels, Zhang & Fiterau, MOSS@ICML 2025) with the fusionops layers.

Runs on the built-in synthetic task by default (``--real`` uses the paper's tweet embeddings in
``--data-dir``); writes ``results.json``, ``results.md``, ``accuracy_vs_size.png``,
``robustness.png`` and ``roc.png`` and prints the summary answering the paper's two claims.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments.tweet.studies import FUSIONS, RESULTS, StudyConfig, render, run_study


def _size(text: str) -> int | None:
    return None if text == "all" else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce",
        description="Tweet fusion comparison (clean accuracy vs training-set size, ROC) and robustness "
        "to test-time noise, for concat / product / tensor / low-rank fusion.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="about a minute: 5 sizes, 2 seeds, 4 σ, ≤ 100 epochs"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {RESULTS}, with --quick {RESULTS}/quick)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per (fusion, size) (default 5, quick 2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--fusions", nargs="+", choices=FUSIONS, default=None, help="fusions to compare")
    parser.add_argument(
        "--sizes", nargs="+", type=_size, default=None, help="training-set sizes ('all' = every)"
    )
    parser.add_argument("--sigmas", nargs="+", type=float, default=None, help="noise σ grid (× modality std)")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on training epochs per run")
    parser.add_argument(
        "--real", action="store_true", help="the paper's tweet data instead of the synthetic task"
    )
    parser.add_argument("--data-dir", default=None, help="real data: dataset folder or .npz (with --real)")
    parser.add_argument(
        "--paper-faithful", action="store_true", help="the paper's double softmax and batch-flipping product"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only redraw results.md, the PNGs and the summary from results.json",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")
    return parser.parse_args(argv)


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` the arguments ask for."""
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    changes: dict[str, Any] = {"seed": args.seed, "real": args.real, "threads": args.threads}
    overrides = dict(cfg.overrides)
    if args.seeds is not None:
        changes["n_seeds"] = args.seeds
    if args.fusions is not None:
        changes["fusions"] = tuple(args.fusions)
    if args.sizes is not None:
        sizes = tuple(args.sizes)
        changes["sizes"] = sizes
        if cfg.robust_size not in sizes:
            changes["robust_size"] = changes["roc_size"] = max(
                sizes, key=lambda s: float("inf") if s is None else s
            )
    if args.sigmas is not None:
        changes["sigmas"] = tuple(args.sigmas)
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    if args.paper_faithful:
        overrides["paper_faithful"] = True
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    changes["overrides"] = overrides
    return replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = study_config(args)
    out = args.out if args.out is not None else (RESULTS / "quick" if args.quick else RESULTS)
    if args.render:
        render(out)
        return 0
    t0 = time.perf_counter()
    run_study(cfg, out)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
