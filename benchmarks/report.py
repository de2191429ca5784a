"""Benchmark report for tensor fusion: times, ratios, peak memory, CSV and plots.

    python -m benchmarks.report                 # default grid, ~1-2 min on 2 CPU cores
    python -m benchmarks.report --quick         # smaller, < 1 min
    python -m benchmarks.report --case headline # the issue's goal for this device
    python -m benchmarks.report --full          # default grid + headline

Each way (fused per available backend, reference eager, torch.compile(reference)) is timed in
each mode (forward, backward, fwd+bwd) by ``benchmarks.timing``; the peak memory of one
fwd+bwd call is measured in a fresh child by ``benchmarks.memory``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import cases, env, goals, memory, plots, timing
from benchmarks.cases import COMPILED, MODES, REFERENCE, Case

Row = dict[str, object]
RESULTS = Path(__file__).resolve().parent / "results"
# Time spent per (way, mode) after warm-up, by grid: more for the headline's verdict.
TIMING = {"quick": {"target_s": 0.1, "min_repeats": 3},
          "default": {"target_s": 0.3, "min_repeats": 5},
          "headline": {"target_s": 2.0, "min_repeats": 7}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest grid (< 1 min on CPU)")
    size.add_argument("--full", action="store_true", help="default grid plus the headline case")
    size.add_argument("--case", action="append", metavar="NAME",
                      help="run only these cases ('headline' = the issue's goal); repeatable")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for timing and the memory children "
                        "(default: torch's own; 1 is steadier on a shared machine)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and PNGs")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False here")
    args.modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in args.modes if m not in MODES]:
        p.error(f"--modes: unknown {bad}; expected some of {MODES}")
    return args


def select(args: argparse.Namespace) -> tuple[list[Case], str]:
    """The cases to run and a label for the file name ('' for the default grid)."""
    grids = cases.GRIDS[args.device]
    headline = cases.HEADLINE[args.device]
    if args.quick:
        return grids["quick"], "quick"
    if args.full:
        return grids["default"] + [headline], "full"
    if not args.case:
        return grids["default"], ""
    known = {c.name: c for c in cases.all_cases(args.device)}
    known["headline"] = headline
    if bad := [n for n in args.case if n not in known]:
        sys.exit(f"unknown case(s) {bad}; known on {args.device}: {sorted(known)}")
    picked = list({known[n].name: known[n] for n in args.case}.values())
    return picked, "headline" if picked == [headline] else "cases"


def _mb(nbytes: float) -> float:
    return round(nbytes / 1e6, 3)


def run_case(case: Case, device: str, modes: list[str], grid: str, with_memory: bool,
             info: dict[str, str]) -> list[Row]:
    ways, _ = cases.available_ways(device, case.dtype)
    inp = cases.make_inputs(case, device, requires_grad=True)
    # "full", "cases" and the default ("") grid time like the default; headline cases longer.
    knobs = TIMING["headline" if case.name.startswith("headline") else grid if grid in TIMING else "default"]
    base: Row = {**info, "case": case.name, "sweep": case.sweep, "n": case.n,
                 "dims": "x".join(map(str, case.dims)), "out": case.out, "dtype": case.dtype,
                 "k": case.k, "z_mb": _mb(case.z_bytes), "out_mb": _mb(case.out_bytes)}
    rows: list[Row] = []
    for mode in modes:
        # All ways of one mode side by side (interleaved), so load hits them alike.
        timed = timing.measure({w.name: cases.make_step(w, inp, mode) for w in ways}, device,
                               **knobs)
        for way in ways:
            row: Row = {**base, "way": way.name, "backend": way.backend or "", "mode": mode,
                        "error": "", "peak_extra_mb": "", "mem_method": ""}
            t = timed[way.name]
            if isinstance(t, Exception):
                row["error"] = f"{type(t).__name__}: {str(t).splitlines()[0][:200]}"
                print(f"  ! {case.name} {way.name} {mode}: {row['error']}")
            else:
                row.update(median_ms=round(t.median_ms, 4), min_ms=round(t.min_ms, 4),
                           iqr_ms=round(t.iqr_ms, 4), repeats=t.repeats,
                           tflops=round(case.flops(mode) / (t.median_ms * 1e-3) / 1e12, 4))
            rows.append(row)
    if with_memory and "fwd+bwd" in modes:
        for row in rows:
            if row["mode"] != "fwd+bwd" or row["error"]:
                continue
            try:
                peak = memory.peak_extra(case, str(row["way"]), device)
                row.update(peak_extra_mb=_mb(peak.extra_bytes), mem_method=peak.method)
            except Exception as exc:  # noqa: BLE001 - one failing way must not end the report
                print(f"  ! {case.name} {row['way']} memory: {exc}")
    return rows


def add_ratios(rows: list[Row]) -> None:
    """Speed-ups (baseline time / way time: > 1 is faster) and memory ratio vs reference."""
    by_key = {(r["case"], r["way"], r["mode"]): r for r in rows if not r["error"]}
    for r in rows:
        for base, col in ((REFERENCE, "speedup_vs_reference"), (COMPILED, "speedup_vs_compile")):
            b = by_key.get((r["case"], base, r["mode"]))
            ok = b is not None and not r["error"]
            r[col] = round(float(b["median_ms"]) / float(r["median_ms"]), 3) if ok else ""  # type: ignore[index,arg-type]
        b = by_key.get((r["case"], REFERENCE, r["mode"]))
        ok = b is not None and r["peak_extra_mb"] != "" and b["peak_extra_mb"] != ""
        r["mem_vs_reference"] = (round(float(b["peak_extra_mb"]) / max(float(r["peak_extra_mb"]), 1e-3), 2)  # type: ignore[index,arg-type]
                                 if ok else "")


def print_table(rows: list[Row], device: str) -> None:
    gpu = device.startswith("cuda")
    head = ["case", "way", "mode", "median ms", "vs ref", "vs compile", "peak MB", "Z MB"]
    head += ["TFLOP/s"] if gpu else []
    lines = [head]
    for r in rows:
        def x(v: object) -> str:
            return f"{v:.2f}x" if v != "" else "-"

        if r["error"]:
            lines.append([str(r["case"]), str(r["way"]), str(r["mode"]), "error", "", "", "",
                          f"{r['z_mb']:.1f}"] + ([""] if gpu else []))
            continue
        line = [str(r["case"]), str(r["way"]), str(r["mode"]), f"{r['median_ms']:.3f}",
                x(r["speedup_vs_reference"]), x(r["speedup_vs_compile"]),
                f"{r['peak_extra_mb']:.1f}" if r["peak_extra_mb"] != "" else "-",
                f"{r['z_mb']:.1f}"]
        lines.append(line + ([f"{r['tflops']:.1f}"] if gpu else []))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) if j < 3 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(line, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("vs ref / vs compile: speed-up (baseline median / this median; > 1 is faster). "
          "peak MB: extra peak of one fwd+bwd (fresh child process).")


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the memory children
    chosen, label = select(args)
    info = env.describe(args.device)
    print(f"tensor fusion benchmarks on {info['device_name']}: torch {info['torch']}, "
          f"triton {info['triton']}, CUDA {info['cuda']}, fusionops._C {info['fusionops_C']}, "
          f"commit {info['git_commit']}")
    cores = os.cpu_count() or 1
    if args.device == "cpu" and float(info["loadavg_1min"]) > 0.5:
        print(f"warning: load average {info['loadavg_1min']} on {cores} cores before starting: "
              "other processes share the CPU, so times will be noisy")
    skipped: dict[str, str] = {}
    for dtype in dict.fromkeys(c.dtype for c in chosen):
        ways, skip = cases.available_ways(args.device, dtype)
        print(f"ways on {args.device}/{dtype}: {', '.join(w.name for w in ways)}")
        for name, why in skip:
            print(f"  skipped {name}: {why}")
            skipped[name] = why

    start = time.perf_counter()
    rows: list[Row] = []
    for case in chosen:
        t0 = time.perf_counter()
        print(f"- {case.name}: N={case.n} dims={case.dims} O={case.out} {case.dtype} "
              f"K={case.k} Z={case.z_bytes / 1e6:.1f} MB", flush=True)
        rows += run_case(case, args.device, args.modes, label, not args.no_memory, info)
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    add_ratios(rows)

    print()
    print_table(rows, args.device)
    date = datetime.date.today().isoformat()
    path = args.out / f"tensor_fusion_{args.device}_{date}{'_' + label if label else ''}.csv"
    write_csv(rows, path)
    print(f"\nCSV: {path}")
    if not args.no_plots:
        for png in plots.plot(rows, path):
            print(f"plot: {png}")
    print()
    for line in goals.check(rows, args.device, skipped):
        print(line)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
