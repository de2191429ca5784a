"""pytest-benchmark suite for skew-pair attention: every way × mode on a few small shapes (see suite.py).

pytest benchmarks/test_skew_pair.py --benchmark-only -q
"""

from __future__ import annotations

from benchmarks import suite
from benchmarks.ops.skew_pair import SPEC


@suite.parametrize(SPEC)
def test_skew_pair_attention(benchmark, case, way_name: str, mode: str) -> None:
    suite.run(benchmark, SPEC, case, way_name, mode)
