"""Where the fused C++ kernels start beating the reference on CPU (the evidence behind
``fusionops.ops.tensor_fusion.CPU_FUSED_MIN_ELEMENTS``, the automatic choice's threshold).

    python -m benchmarks.crossover [--out DIR]

Times fused[cpu] against the reference (materialise Z, then one GEMM) in forward and
fwd+bwd over a sweep of small shapes, prints speed-ups against N * K, and writes a CSV. The
threshold should sit where fused[cpu] stops losing in both modes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
from pathlib import Path

from benchmarks import cases, env, timing
from benchmarks.cases import REFERENCE, Case

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [
    ((4, 4, 4), 16),
    ((8, 8, 8), 32),
    ((16, 16), 32),
    ((32, 32), 64),
    ((16, 16, 16), 64),
    ((64, 64), 64),
    ((8, 8, 8, 8), 32),
]
NS = (16, 64, 256, 1024, 4096)
MAX_Z_ELEMENTS = 1 << 24  # larger shapes are the report's business, not the crossover's


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.crossover", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    fused, ref = cases.way_by_name("fused[cpu]"), cases.way_by_name(REFERENCE)
    info = env.describe("cpu")
    rows = []
    print(f"{'dims':<14}{'O':>4}{'N':>6}{'N*K':>11}  fwd speed-up  fwd+bwd speed-up")
    for dims, out in SHAPES:
        for n in NS:
            case = Case(f"x{n}", n, dims, out)
            if n * case.k > MAX_Z_ELEMENTS:
                continue
            inp = cases.make_inputs(case, "cpu", requires_grad=True)
            speedup = {}
            for mode in ("forward", "fwd+bwd"):
                t = timing.measure(
                    {w.name: cases.make_step(w, inp, mode) for w in (fused, ref)},
                    "cpu",
                    target_s=0.2,
                    min_repeats=15,
                )
                speedup[mode] = t[ref.name].median_ms / t[fused.name].median_ms
            rows.append(
                {
                    **info,
                    "dims": "x".join(map(str, dims)),
                    "out": out,
                    "n": n,
                    "z_elements": n * case.k,
                    "speedup_forward": round(speedup["forward"], 3),
                    "speedup_fwd_bwd": round(speedup["fwd+bwd"], 3),
                }
            )
            print(
                f"{str(dims):<14}{out:>4}{n:>6}{n * case.k:>11}  {speedup['forward']:>12.2f}"
                f"  {speedup['fwd+bwd']:>16.2f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"crossover_cpu_{datetime.date.today().isoformat()}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"CSV: {path}")


if __name__ == "__main__":
    main()
