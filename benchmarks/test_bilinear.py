"""pytest-benchmark suites for the bilinear ops (MFB, MFH, BLOCK): every way × mode on a small shape
(see suite.py).

pytest benchmarks/test_bilinear.py --benchmark-only -q
"""

from __future__ import annotations

from benchmarks import suite
from benchmarks.ops.bilinear import BLOCK_SPEC, MFB_SPEC, MFH_SPEC


@suite.parametrize(MFB_SPEC)
def test_mfb(benchmark, case, way_name: str, mode: str) -> None:
    suite.run(benchmark, MFB_SPEC, case, way_name, mode)


@suite.parametrize(MFH_SPEC)
def test_mfh(benchmark, case, way_name: str, mode: str) -> None:
    suite.run(benchmark, MFH_SPEC, case, way_name, mode)


@suite.parametrize(BLOCK_SPEC)
def test_block_fusion(benchmark, case, way_name: str, mode: str) -> None:
    suite.run(benchmark, BLOCK_SPEC, case, way_name, mode)
