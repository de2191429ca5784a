"""Where the fused C++ kernels start beating the reference on CPU, per op (the evidence behind
each op's ``cpu_min_size`` (with gradients) and ``cpu_min_size_forward`` (inference) in the registry).

    python -m benchmarks.crossover [--op NAME ...] [--out DIR]

Times the fused C++ kernels against the op's reference in forward (inference, under no_grad)
and fwd+bwd over its sweep of small shapes (``crossover_cases`` in ``benchmarks/ops/<op>.py``),
prints speed-ups against the size the op's rule compares (tensor fusion N·K, low-rank fusion
N·R·O·M, product fusion N·d), and writes ``crossover_<op>_cpu_<date>.csv``. The threshold should
sit where the fused kernels stop losing in both modes; the summary line gives the smallest size
from which they never lose.

The fused way is the call a user makes: the public function, with the op's size rule set to the
fused kernels for the duration of the sweep (``always_fused``), so it takes the same one-pass
path an automatic choice of them takes. (Before 2026-12-05 it was ``fused[cpu]``, a
``fusionops.backend('cpu')`` block entered around every call: about 5 µs a call more than a
plain call, which tipped tiny calls towards the reference; ``--forced`` measures it so again.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import fusionops
from benchmarks import csvfile, env, ops, timing, ways
from benchmarks.spec import OpSpec, Row
from fusionops import _backend, registry

MODES = ("forward", "fwd+bwd")


@contextlib.contextmanager
def always_fused(op: str) -> Iterator[None]:
    """The op's CPU size rule set to the fused kernels at every size (its module's ``OPDEF``,
    which the public function reads at each call, the registry's entry, and the copy of its
    compiled eager entry)."""
    old = registry.OPS[op]
    modules = [m for m in list(sys.modules.values()) if getattr(m, "OPDEF", None) is old]
    if not modules:
        raise RuntimeError(f"no module holds the registry entry of {op}")
    new = dataclasses.replace(
        old, cpu_min_size=0, cpu_min_size_forward=0, cpu_min_modalities=1, cpu_narrow_width=0,
        cpu_narrow_width_forward=0,
    )  # fmt: skip
    for m in modules:
        m.OPDEF = new  # type: ignore[attr-defined]
    registry.OPS[op] = new
    _backend.hand_rule_to_entry(new)
    try:
        yield
    finally:
        for m in modules:
            m.OPDEF = old  # type: ignore[attr-defined]
        registry.OPS[op] = old
        _backend.hand_rule_to_entry(old)


def _served_by_cpu(spec: OpSpec, fn, inp) -> None:
    """The plain call took the fused kernels (the patched rule reached the op)."""
    fusionops.reset_dispatch_counts()
    fn(*inp.args)
    served = fusionops.dispatch_counts().get(spec.name, {})
    if set(served) != {"cpu"}:
        raise RuntimeError(f"{spec.name}: the plain call was served by {served}, expected the cpu kernels")


def measure(spec: OpSpec, info: dict[str, str], forced: bool = False) -> list[Row]:
    ref = ways.way_by_name(spec, spec.reference)
    if forced:
        fused = ways.way_by_name(spec, "fused[cpu]")
        rule: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        fused = ways.Way("fused[cpu]", spec.fused, "cpu")
        rule = always_fused(spec.name)
    rows: list[Row] = []
    with rule:
        if not forced:
            _served_by_cpu(spec, fused.fn, spec.make_inputs(spec.crossover_cases[0], "cpu", True))
        rows = _sweep(spec, info, fused, ref)
    return rows


def _sweep(spec: OpSpec, info: dict[str, str], fused: ways.Way, ref: ways.Way) -> list[Row]:
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
    p.add_argument(
        "--forced",
        action="store_true",
        help="time fused[cpu] in a backend('cpu') block per call (the old way)",
    )
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
        rows = measure(spec, info, args.forced)
        path = csvfile.result_path(args.out, f"crossover_{spec.name}", "cpu", "")
        csvfile.write_csv(rows, path)
        print(f"CSV: {path}")
        lines += summary(spec, rows)
    print()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
