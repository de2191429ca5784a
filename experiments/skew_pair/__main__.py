"""CLI: ``python -m experiments.skew_pair [--quick] [--out DIR] [--seed N] ...``."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from experiments.skew_pair.study import RESULTS, StudyConfig, render, run_study


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.skew_pair",
        description="Skew-pair fusion sweep (skew × density) and bootstrapped-sparsity selection on a "
        "synthetic two-encoder task; writes results.json, results.md and sweep.png.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="about a minute: fewer examples, skews and seeds"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {RESULTS}, with --quick {RESULTS}/quick)",
    )
    parser.add_argument(
        "--seed", type=_count(0), default=0, help="base seed of data, encoders, heads, bootstrap"
    )
    parser.add_argument(
        "--seeds",
        type=_count(1),
        default=None,
        help="head seeds per sweep configuration (default 2, quick 1)",
    )
    parser.add_argument(
        "--compare-seeds",
        type=_count(1),
        default=None,
        help="head seeds of the SSFN / late / pairwise comparison (default 8, quick 3; an interval needs 2)",
    )
    parser.add_argument(
        "--workers", type=_count(1), default=None, help="training processes (default: min(2, CPU count))"
    )
    parser.add_argument(
        "--render", action="store_true", help="only redraw sweep.png and results.md from results.json"
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=["reference", "cpu", "triton"],
        help="force a fusionops backend (default: automatic choice, or FUSIONOPS_BACKEND)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    changes: dict[str, object] = {"seed": args.seed, "workers": args.workers or min(2, os.cpu_count() or 1)}
    if args.seeds is not None:
        changes["n_seeds"] = args.seeds
    if args.compare_seeds is not None:
        changes["n_compare_seeds"] = args.compare_seeds
    if args.backend is not None:
        changes["backend"] = args.backend
    cfg = replace(cfg, **changes)
    out = args.out if args.out is not None else (RESULTS / "quick" if args.quick else RESULTS)
    if args.render:
        if not (out / "results.json").is_file():
            sys.exit(f"--render: no results.json in {out} (run the study with this --out first)")
        render(out)
        return 0
    run_study(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
