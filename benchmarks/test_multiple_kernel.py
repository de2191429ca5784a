"""pytest-benchmark suite for multiple kernel fusion: every way × mode on a few small shapes (see suite.py).

pytest benchmarks/test_multiple_kernel.py --benchmark-only -q
"""

from __future__ import annotations

from benchmarks import suite
from benchmarks.ops.multiple_kernel import SPEC


@suite.parametrize(SPEC)
def test_multiple_kernel(benchmark, case, way_name: str, mode: str) -> None:
    suite.run(benchmark, SPEC, case, way_name, mode)
