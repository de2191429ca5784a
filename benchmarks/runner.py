"""One report run's measurements as CSV rows: timing per (case, mode), memory per (case, way).

Per (case, mode), all ways that serve the mode are timed side by side (``benchmarks.timing``);
a forward-only baseline (``Baseline.modes``) gets forward rows only, never an error row for
the modes it lacks. The peak of one fwd+bwd per (case, way) is measured afterwards in fresh
children (``benchmarks.memory``), so the children never share the CPU with a timed call; a
way without fwd+bwd has no such row and gets no child (no forward-only peak is mixed into the
fwd+bwd peak column).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from benchmarks import limits, memory, timing, ways
from benchmarks.spec import CaseBase, Inputs, OpSpec, Row, mb

# Time per (way, mode), in interleaved rounds (``timing.measure``), by grid: more for a
# headline's verdict.
TIMING = {
    "quick": {"seconds": 0.1, "rounds": 3},
    "default": {"seconds": 0.3, "rounds": 3},
    "headline": {"seconds": 2.0, "rounds": 5},
}


def base_row(spec: OpSpec, case: CaseBase, info: Mapping[str, str]) -> Row:
    return {**info, "op": spec.name, "case": case.name, "sweep": case.sweep, "n": case.n, **case.columns()}


def input_sets(spec: OpSpec, case: CaseBase, device: str) -> list[Inputs]:
    """The case's inputs; on CUDA, as many copies as it takes for every timed call to find its
    inputs outside L2 (``limits.rotation_copies``), as they would be in a model."""
    first = spec.make_inputs(case, device, True)
    if not device.startswith("cuda"):
        return [first]
    l2 = torch.cuda.get_device_properties(torch.device(device)).L2_cache_size
    size = sum(t.numel() * t.element_size() for t in (*first.leaves, first.grad_out))
    return [first] + [
        spec.make_inputs(case, device, True) for _ in range(limits.rotation_copies(size, l2) - 1)
    ]


def rotating(setups: list[timing.Setup]) -> timing.Setup:
    """One setup whose thunk uses the next input set at every call (a timed block makes many
    calls after one setup)."""
    if len(setups) == 1:
        return setups[0]

    def setup() -> Callable[[], object]:
        turn = itertools.cycle([s() for s in setups])
        return lambda: next(turn)()

    return setup


def time_case(
    spec: OpSpec,
    case: CaseBase,
    device: str,
    modes: Sequence[str],
    knobs: Mapping[str, Any],  # timing.measure's seconds and rounds
    info: Mapping[str, str],
) -> list[Row]:
    """One row per (way, mode) that can run on this device and dtype and that the way serves
    (``Way.modes``); failures as ``error``."""
    available, _ = ways.available_ways(spec, device, case.dtype)
    inputs = input_sets(spec, case, device)
    base = base_row(spec, case, info)
    rows: list[Row] = []
    for mode in modes:
        serving = [w for w in available if w.serves(mode)]
        if not serving:
            continue
        # All ways of one mode side by side (interleaved), so load hits them alike.
        steps = {w.name: rotating([ways.make_step(w, inp, mode) for inp in inputs]) for w in serving}
        timed = timing.measure(steps, **knobs)
        for way in serving:
            row: Row = {
                **base,
                "way": way.name,
                "backend": way.backend or "",
                "mode": mode,
                "error": "",
                "peak_extra_mb": "",
                "mem_method": "",
            }
            t = timed[way.name]
            if isinstance(t, Exception):
                row["error"] = f"{type(t).__name__}: {str(t).splitlines()[0][:200] if str(t) else ''}"
                print(f"  ! {case.name} {way.name} {mode}: {row['error']}")
            else:
                row.update(
                    median_ms=round(t.median * 1e3, 4),
                    min_ms=round(min(t.times) * 1e3, 4),
                    iqr_ms=round(t.iqr * 1e3, 4),
                    repeats=len(t.times),  # timed blocks; each the mean time of its calls
                )
                seconds = t.median
                if (flops := case.flops(mode)) is not None:
                    row["tflops"] = round(flops / seconds / 1e12, 4)
                if (moved := case.bytes_moved(mode)) is not None:
                    row.update(moved_mb=mb(moved), gbps=round(moved / seconds / 1e9, 2))
                row.update(limits.fractions(row, dict(info)))
            rows.append(row)
    return rows


def add_memory(jobs: Sequence[tuple[OpSpec, CaseBase, list[Row]]], device: str, workers: int) -> None:
    """Fill ``peak_extra_mb`` and ``mem_method`` of every fwd+bwd row that ran.

    Only ways that serve fwd+bwd have such rows: a forward-only baseline gets no memory child
    (its forward rows keep an empty peak, like every forward row), so the peak column stays
    one quantity, the extra peak of one fwd+bwd.
    """
    wanted: dict[memory.Job, Row] = {}
    for spec, case, rows in jobs:
        for row in rows:
            if (
                row["mode"] == "fwd+bwd"
                and not row["error"]
                and "fwd+bwd" in ways.way_modes(spec, str(row["way"]))
            ):
                wanted[(spec.name, case, str(row["way"]))] = row
    if not wanted:
        return
    print(f"memory: {len(wanted)} fresh child processes, {workers} at a time", flush=True)
    for job, peak in memory.peak_extra_many(list(wanted), device, workers).items():
        if isinstance(peak, Exception):
            print(f"  ! {job[0]} {job[1].name} {job[2]} memory: {peak}")
        else:
            wanted[job].update(peak_extra_mb=mb(peak.extra_bytes), mem_method=peak.method)


def add_ratios(spec: OpSpec, rows: list[Row]) -> None:
    """Per baseline: speed-up (its time / this time: > 1 is faster) and memory ratio (its peak /
    this peak), in columns ``speedup_vs_<column>`` and ``mem_vs_<column>``. A baseline's speed-up
    is empty in the modes it does not serve; a baseline without fwd+bwd (never measured for
    memory) has no ``mem_vs_<column>`` column."""
    by_key = {(r["case"], r["way"], r["mode"]): r for r in rows if not r["error"]}
    for r in rows:
        for b in spec.baselines:
            base = by_key.get((r["case"], b.name, r["mode"]))
            ok = base is not None and not r["error"]
            r[f"speedup_vs_{b.column}"] = (
                round(float(base["median_ms"]) / float(r["median_ms"]), 3) if ok else ""  # type: ignore[index,arg-type]
            )
        for b in spec.baselines:
            if not b.serves("fwd+bwd"):
                continue
            base = by_key.get((r["case"], b.name, r["mode"]))
            ok = base is not None and r["peak_extra_mb"] != "" and base["peak_extra_mb"] != ""
            r[f"mem_vs_{b.column}"] = (
                round(float(base["peak_extra_mb"]) / max(float(r["peak_extra_mb"]), 1e-3), 2)  # type: ignore[index,arg-type]
                if ok
                else ""
            )
