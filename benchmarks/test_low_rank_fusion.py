"""pytest-benchmark suite for low-rank fusion: every way × mode on a few small shapes (see suite.py).

pytest benchmarks/test_low_rank_fusion.py --benchmark-only -q
"""

from __future__ import annotations

from benchmarks import suite
from benchmarks.ops.low_rank_fusion import SPEC


@suite.parametrize(SPEC)
def test_low_rank_fusion(benchmark, case, way_name: str, mode: str) -> None:
    suite.run(benchmark, SPEC, case, way_name, mode)
