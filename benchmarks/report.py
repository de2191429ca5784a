"""Benchmark report of the fusionops ops: times, ratios, peak memory, goals, CSV and plots.

    python -m benchmarks.report --quick                  # every op, smallest grids (~1 min on CPU)
    python -m benchmarks.report                          # every op, default grids
    python -m benchmarks.report --case headline          # every op's goal cases for this device
    python -m benchmarks.report --full                   # default grids + headline cases
    python -m benchmarks.report --op low_rank_fusion --case headline

Each way (fused per available backend, then the op's baselines) is timed in each mode
(forward, backward, fwd+bwd) it serves by ``benchmarks.timing`` (a forward-only baseline in
forward only); the peak memory of one fwd+bwd call is measured in fresh children by
``benchmarks.memory``. One CSV per op. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import cases, csvfile, env, limits, ops, plots, runner, table, ways
from benchmarks.spec import MODES, CaseBase, OpSpec, Row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest grids (~1 min on CPU for every op)")
    size.add_argument("--full", action="store_true", help="default grids plus the headline cases")
    size.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help="run only these cases ('headline' = each op's goal cases); repeatable",
    )
    p.add_argument(
        "--op",
        action="append",
        metavar="NAME",
        help=f"ops to run, repeatable or a comma list (default: all of {', '.join(ops.OPS)})",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for timing and the memory children "
        "(default: torch's own; 1 is steadier on a shared machine)",
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--out", type=Path, default=csvfile.RESULTS, help="folder for the CSVs and PNGs")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument(
        "--memory-jobs",
        type=int,
        default=None,
        help="memory children at a time (default: the CPU count on CPU, 1 on CUDA)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--no-limits",
        action="store_true",
        help="skip measuring the device's matmul rate and copy bandwidth (no frac_* columns)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False here")
    try:
        args.specs = ops.parse(args.op)
    except ValueError as exc:
        p.error(f"--op: {exc}")
    args.modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in args.modes if m not in MODES]:
        p.error(f"--modes: unknown {bad}; expected some of {MODES}")
    if args.case and (bad := cases.unknown_names(args.specs, args.device, args.case)):
        known = {s.name: sorted(c.name for c in s.all_cases(args.device)) for s in args.specs}
        p.error(f"--case: unknown {bad}; 'headline' or one of {known}")
    if args.memory_jobs is None:
        args.memory_jobs = 1 if args.device == "cuda" else os.cpu_count() or 1
    return args


def show_ways(spec: OpSpec, device: str, chosen: list[CaseBase]) -> dict[str, str]:
    """Print the ways of each dtype in ``chosen``; returns {way: why} for those skipped."""
    skipped: dict[str, str] = {}
    for dtype in dict.fromkeys(c.dtype for c in chosen):
        available, skip = ways.available_ways(spec, device, dtype)
        names = [
            w.name if set(w.modes) == set(MODES) else f"{w.name} ({', '.join(w.modes)} only)"
            for w in available
        ]
        print(f"{spec.name} ways on {device}/{dtype}: {', '.join(names)}")
        for name, why in skip:
            print(f"  skipped {name}: {why}")
            skipped[name] = why
    return skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the memory children
    info = env.describe(args.device)
    print(
        f"fusionops benchmarks on {info['device_name']}: torch {info['torch']}, triton {info['triton']}, "
        f"CUDA {info['cuda']}, fusionops._C {info['fusionops_C']}, commit {info['git_commit']}"
    )
    if not args.no_limits:
        lim = limits.measure(args.device)
        info.update(lim.columns())
        print(
            f"device limits (measured): {lim.matmul_dtype} matmul {lim.matmul_tflops:.3g} TFLOP/s, "
            f"copy {lim.bandwidth_gbps:.3g} GB/s"
        )
    if args.device == "cpu" and float(info["loadavg_1min"]) > 0.5:
        print(
            f"warning: load average {info['loadavg_1min']} on {os.cpu_count()} cores before starting: "
            "other processes share the CPU, so times will be noisy"
        )
    plan = []
    for spec in args.specs:
        chosen, label = cases.select(
            spec, args.device, quick=args.quick, full=args.full, names=args.case or ()
        )
        if chosen:
            plan.append((spec, chosen, label, show_ways(spec, args.device, chosen)))

    start = time.perf_counter()
    measured: list[tuple[OpSpec, CaseBase, list[Row]]] = []
    for spec, chosen, label, _ in plan:
        for case in chosen:
            t0 = time.perf_counter()
            print(f"- {spec.name} {case.name}: {case.describe()}", flush=True)
            grid = "headline" if cases.is_headline(spec, args.device, case) else label
            knobs = runner.TIMING.get(grid, runner.TIMING["default"])
            measured.append((spec, case, runner.time_case(spec, case, args.device, args.modes, knobs, info)))
            print(f"  timed in {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.no_memory and "fwd+bwd" in args.modes:
        t0 = time.perf_counter()
        runner.add_memory(measured, args.device, args.memory_jobs)
        print(f"  memory in {time.perf_counter() - t0:.1f} s", flush=True)

    summary: list[str] = []
    for spec, _, label, skipped in plan:
        rows = [r for s, _, rs in measured if s is spec for r in rs]
        runner.add_ratios(spec, rows)
        print(f"\n{spec.title} ({spec.name}):")
        table.print_table(spec, rows, args.device)
        path = csvfile.result_path(args.out, spec.name, args.device, label)
        csvfile.write_csv(rows, path)
        print(f"CSV: {path}")
        if not args.no_plots:
            for png in plots.plot(spec, rows, path):
                print(f"plot: {png}")
        summary += spec.goals(rows, args.device, skipped)
    print()
    for line in summary:
        print(line)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
