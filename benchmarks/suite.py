"""What the pytest-benchmark suites share: one test per (case, way, mode) of an op, for the
modes each way serves (a forward-only baseline gets forward tests only).

    pytest benchmarks/ --benchmark-only -q
    pytest benchmarks/test_low_rank_fusion.py --benchmark-only --benchmark-group-by=param:case,param:mode

Ways that cannot run here are skipped with fusionops' reason (shown by ``-ra``). Shapes are
small so the suites stay quick; ``python -m benchmarks.report`` does the real sweep, memory
and the headline goals. Not part of the CI test command.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import ways
from benchmarks.spec import MODES, CaseBase, OpSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def parametrize(spec: OpSpec):
    """Decorator: parametrize a test over the op's small cases, all its ways and every mode
    each way serves (``Baseline.modes``): no test is generated for a mode a way lacks.

    The same small shapes on either device: the suites check the ways run and give rough times;
    the report has per-device grids. Test ids read ``<mode>-<way>-<case>``.
    """
    cases = list(spec.pytest_cases)
    pairs = [
        (mode, name)
        for mode in MODES
        for name in ways.all_way_names(spec)
        if mode in ways.way_modes(spec, name)
    ]

    def wrap(fn):
        fn = pytest.mark.parametrize(("mode", "way_name"), pairs, ids=[f"{m}-{w}" for m, w in pairs])(fn)
        return pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])(fn)

    return wrap


def _way(spec: OpSpec, name: str, dtype: str) -> ways.Way:
    available, skipped = ways.available_ways(spec, DEVICE, dtype)
    for way in available:
        if way.name == name:
            return way
    pytest.skip(f"{name} on {DEVICE}/{dtype}: {dict(skipped).get(name, 'not available')}")


def run(benchmark, spec: OpSpec, case: CaseBase, way_name: str, mode: str) -> None:
    """Time one (case, way, mode) with pytest-benchmark: 2 warm-up rounds, then 15."""
    way = _way(spec, way_name, case.dtype)
    inp = spec.make_inputs(case, DEVICE, True)
    setup = ways.make_step(way, inp, mode)
    cuda = DEVICE == "cuda"

    def call(thunk) -> None:
        thunk()
        if cuda:  # pytest-benchmark reads a host clock: wait for the kernels
            torch.cuda.synchronize()

    def prepare() -> tuple[tuple[object, ...], dict[str, object]]:
        thunk = setup()  # untimed: e.g. the forward of a timed backward (run once, graph reused)
        if cuda:
            torch.cuda.synchronize()
        return (thunk,), {}

    benchmark.group = f"{spec.name} {case.name} {mode}"
    benchmark.extra_info.update(op=spec.name, way=way_name, mode=mode, **case.to_dict())
    benchmark.pedantic(call, setup=prepare, rounds=15, warmup_rounds=2, iterations=1)
