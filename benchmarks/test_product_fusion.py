"""pytest-benchmark suite for product fusion: every way × mode on a few small shapes (see suite.py).

pytest benchmarks/test_product_fusion.py --benchmark-only -q
"""

from __future__ import annotations

from benchmarks import suite
from benchmarks.ops.product_fusion import SPEC


@suite.parametrize(SPEC)
def test_product_fusion(benchmark, case, way_name: str, mode: str) -> None:
    suite.run(benchmark, SPEC, case, way_name, mode)
