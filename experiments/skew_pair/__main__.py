"""CLI: ``python -m experiments.skew_pair [--quick] [--out DIR] [--seed N] ...``."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from experiments.skew_pair.study import RESULTS, StudyConfig, run_study


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
    parser.add_argument("--seed", type=int, default=0, help="base seed of data, encoders, heads, bootstrap")
    parser.add_argument("--seeds", type=int, default=None, help="head seeds per configuration")
    parser.add_argument(
        "--workers", type=int, default=None, help="training processes (default: min(2, CPU count))"
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
    if args.backend is not None:
        changes["backend"] = args.backend
    cfg = replace(cfg, **changes)
    out = args.out if args.out is not None else (RESULTS / "quick" if args.quick else RESULTS)
    run_study(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
