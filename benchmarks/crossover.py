"""Where the fused C++ kernels start beating the reference on CPU, per op (the evidence behind
each op's ``cpu_min_size`` (with gradients) and ``cpu_min_size_forward`` (inference) in the registry).

    python -m benchmarks.crossover [--op NAME ...] [--out DIR]

Times ``fused[cpu]`` against the op's reference in forward and fwd+bwd over its sweep of
small shapes (``crossover_cases`` in ``benchmarks/ops/<op>.py``), prints speed-ups against the
size the op's rule compares (tensor fusion N·K, low-rank fusion N·R·O·M, product fusion N·d),
and writes ``crossover_<op>_cpu_<date>.csv``. The threshold should sit where fused[cpu] stops
losing in both modes; the summary line gives the smallest size from which it never loses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import csvfile, env, ops, timing, ways
from benchmarks.spec import OpSpec, Row

MODES = ("forward", "fwd+bwd")


def measure(spec: OpSpec, info: dict[str, str]) -> list[Row]:
    fused, ref = ways.way_by_name(spec, "fused[cpu]"), ways.way_by_name(spec, spec.reference)
    rows: list[Row] = []
    print(f"{'case':<28}{spec.crossover_metric:>12}  fwd speed-up  fwd+bwd speed-up")
    for case in spec.crossover_cases:
        inp = spec.make_inputs(case, "cpu", True)
        speedup = {}
        for mode in MODES:
            steps = {w.name: ways.make_step(w, inp, mode) for w in (fused, ref)}
            t = timing.measure(steps, seconds=0.2, rounds=3)
            bad = [f"{name}: {r}" for name, r in t.items() if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"{case.name} {mode}: {'; '.join(bad)}")
            speedup[mode] = t[ref.name].median / t[fused.name].median  # type: ignore[union-attr]
        rows.append(
            {
                **info,
                "op": spec.name,
                "case": case.name,
                "sweep": case.sweep,
                "n": case.n,
                **case.columns(),
                "metric": spec.crossover_metric,
                "elements": case.crossover_elements,
                "speedup_forward": round(speedup["forward"], 3),
                "speedup_fwd_bwd": round(speedup["fwd+bwd"], 3),
            }
        )
        print(
            f"{case.name:<28}{case.crossover_elements:>12}  {speedup['forward']:>12.2f}"
            f"  {speedup['fwd+bwd']:>16.2f}",
            flush=True,
        )
    return rows


def never_loses_from(rows: list[Row], keys: tuple[str, ...]) -> int | None:
    """The smallest size from which fused[cpu] is at least as fast in every measured case and
    every mode of ``keys`` (None: it loses even at the largest size measured)."""
    sizes = sorted({int(r["elements"]) for r in rows}, reverse=True)  # type: ignore[call-overload]
    threshold = None
    for size in sizes:
        if any(float(r[k]) < 1.0 for r in rows if r["elements"] == size for k in keys):  # type: ignore[arg-type]
            break
        threshold = size
    return threshold


def summary(spec: OpSpec, rows: list[Row]) -> list[str]:
    """Per shape (sweep) and over all shapes: from which size fused[cpu] never loses."""
    both = ("speedup_forward", "speedup_fwd_bwd")

    def line(label: str, subset: list[Row]) -> str:
        parts = []
        for mode, keys in (("forward", both[:1]), ("fwd+bwd", both[1:]), ("both", both)):
            t = never_loses_from(subset, keys)
            parts.append(f"{mode} {'never' if t is None else f'>= {t}'}")
        return f"  {label:<34} " + ", ".join(parts)

    sweeps: dict[str, list[Row]] = {}
    for r in rows:
        sweeps.setdefault(str(r["sweep"]), []).append(r)
    out = [f"{spec.name}: fused[cpu] never slower than {spec.reference} from {spec.crossover_metric} ="]
    out += [line(sweep, subset) for sweep, subset in sweeps.items()]
    out.append(line("all shapes (the rule's threshold)", rows))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.crossover", description=__doc__.splitlines()[0])
    p.add_argument(
        "--op",
        action="append",
        metavar="NAME",
        help=f"ops, repeatable or a comma list (default: all of {', '.join(ops.OPS)})",
    )
    p.add_argument("--out", type=Path, default=csvfile.RESULTS)
    args = p.parse_args(argv)
    try:
        specs = ops.parse(args.op)
    except ValueError as exc:
        p.error(f"--op: {exc}")
    info = env.describe("cpu")
    lines = []
    for spec in specs:
        print(
            f"\n{spec.title} ({spec.name}): fused[cpu] vs {spec.reference}, fp32, {info['threads']} threads"
        )
        why = ways.fused_reasons(spec, "cpu", "cpu", "fp32")
        if why:
            print(f"  skipped: fused[cpu] cannot run here: {'; '.join(why)}")
            lines.append(f"{spec.name}: skipped (fused[cpu] unavailable)")
            continue
        rows = measure(spec, info)
        path = csvfile.result_path(args.out, f"crossover_{spec.name}", "cpu", "")
        csvfile.write_csv(rows, path)
        print(f"CSV: {path}")
        lines += summary(spec, rows)
    print()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
