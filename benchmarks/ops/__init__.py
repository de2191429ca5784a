"""One benchmark definition per op (an :class:`benchmarks.spec.OpSpec` named ``SPEC``)."""

from __future__ import annotations

from collections.abc import Iterable

from benchmarks.ops import (
    bilinear,
    low_rank_fusion,
    multiple_kernel,
    product_fusion,
    skew_pair,
    tensor_fusion,
)
from benchmarks.spec import OpSpec

OPS: dict[str, OpSpec] = {
    s.name: s
    for s in (
        tensor_fusion.SPEC,
        low_rank_fusion.SPEC,
        product_fusion.SPEC,
        skew_pair.SPEC,
        multiple_kernel.SPEC,
        bilinear.MFB_SPEC,
        bilinear.MFH_SPEC,
        bilinear.BLOCK_SPEC,
    )
}


def get(name: str) -> OpSpec:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; expected one of {sorted(OPS)}") from None


def parse(values: Iterable[str] | None) -> list[OpSpec]:
    """``--op`` values (repeatable, each a comma list; 'all' or none: every op), in OPS order."""
    names = {n.strip() for v in values or () for n in v.split(",") if n.strip()}
    if not names or "all" in names:
        return list(OPS.values())
    for n in names:
        get(n)  # raises on an unknown name
    return [s for s in OPS.values() if s.name in names]
