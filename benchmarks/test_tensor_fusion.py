"""pytest-benchmark suite for tensor fusion: every way × mode on a few small shapes.

    pytest benchmarks/ --benchmark-only -q
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:case,param:mode

Ways that cannot run here are skipped with fusionops' reason (shown by ``-ra``). Shapes are
small so the suite stays quick; ``python -m benchmarks.report`` does the real sweep,
memory and the headline goals. Not part of the CI test command.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The same small shapes on either device: this suite checks the ways run and gives rough
# times; the report has per-device grids.
CASES = cases.PYTEST_CASES


def _way(name: str, dtype: str) -> cases.Way:
    ways, skipped = cases.available_ways(DEVICE, dtype)
    for way in ways:
        if way.name == name:
            return way
    pytest.skip(f"{name} on {DEVICE}/{dtype}: {dict(skipped).get(name, 'not available')}")


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("way_name", cases.all_way_names())
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tensor_fusion(benchmark, case: cases.Case, way_name: str, mode: str) -> None:
    way = _way(way_name, case.dtype)
    inp = cases.make_inputs(case, DEVICE, requires_grad=True)
    setup = cases.make_step(way, inp, mode)
    cuda = DEVICE == "cuda"

    def run(thunk) -> None:
        thunk()
        if cuda:  # pytest-benchmark reads a host clock: wait for the kernels
            torch.cuda.synchronize()

    def prepare() -> tuple[tuple[object, ...], dict[str, object]]:
        thunk = setup()  # untimed: e.g. the forward before a timed backward
        if cuda:
            torch.cuda.synchronize()
        return (thunk,), {}

    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(way=way_name, mode=mode, n=case.n, dims=case.dims,
                                out=case.out, dtype=case.dtype, z_bytes=case.z_bytes)
    benchmark.pedantic(run, setup=prepare, rounds=15, warmup_rounds=2, iterations=1)
