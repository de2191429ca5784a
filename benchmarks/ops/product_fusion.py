"""Product fusion: ``p = x_1 ⊙ x_2 ⊙ … ⊙ x_M`` of M equal-width ``(N, d)`` tensors.

Ways: ``fused[<backend>]`` (``fusionops.product_fusion``: one pass per direction for any M),
``reference`` (``fusionops.reference.product_fusion``: chained ``*``, M-2 temporaries, saved
for backward) and ``compile(reference)``.

Memory-bound, so it is measured in bytes moved by an ideal kernel: forward reads M·N·d and
writes N·d elements; backward reads (M+1)·N·d (the gradient and every x_m) and writes M·N·d
(every dx_m); the report gives GB/s = bytes moved / median time.

No formal goal: the report prints time and GB/s of every way on the headline cases (CPU: fp32,
N=4096, d=512, M=2 and M=3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import fusionops
from benchmarks import goals as g
from benchmarks.spec import Baseline, CaseBase, Draw, Inputs, OpSpec, Row, mb
from benchmarks.ways import compiled
from fusionops import reference


@dataclass(frozen=True)
class Case(CaseBase):
    """One product fusion problem: M modalities of shape ``(N, d)``."""

    name: str
    n: int
    d: int
    m: int
    dtype: str = "fp32"

    def bytes_moved(self, mode: str) -> int:
        nd = self.n * self.d * self.itemsize
        fwd, bwd = (self.m + 1) * nd, (2 * self.m + 1) * nd
        return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]

    @property
    def out_bytes(self) -> int:
        """Bytes any fwd+bwd must allocate: p and every dx_m."""
        return (self.m + 1) * self.n * self.d * self.itemsize

    @property
    def sweep(self) -> str:
        return f"M={self.m} d={self.d} {self.dtype}"

    def columns(self) -> dict[str, object]:
        return {"m": self.m, "d": self.d, "dtype": self.dtype, "out_mb": mb(self.out_bytes)}

    def describe(self) -> str:
        one = self.n * self.d * self.itemsize / 1e6
        return f"N={self.n} d={self.d} M={self.m} {self.dtype} (one x_m: {one:.1f} MB)"

    @property
    def crossover_elements(self) -> int:
        return self.n * self.d  # N·d, fusionops.ops.product_fusion._order's rule


def make_inputs(case: Case, device: str, requires_grad: bool) -> Inputs:
    draw = Draw(device, case.torch_dtype, requires_grad)
    xs = [draw.normal(case.n, case.d) for _ in range(case.m)]
    grad_out = draw.normal(case.n, case.d, leaf=False)
    return Inputs((xs,), list(xs), grad_out)


def _sweep(ns: tuple[int, ...], d: int, m: int, dtype: str = "fp32") -> list[Case]:
    return [Case(f"m{m}-d{d}-n{n}", n, d, m, dtype) for n in ns]


HEADLINE = {
    "cpu": [Case("headline-cpu-m2", 4096, 512, 2), Case("headline-cpu-m3", 4096, 512, 3)],
    "cuda": [
        Case("headline-gpu-m2", 262144, 1024, 2, "bf16"),
        Case("headline-gpu-m3", 262144, 1024, 3, "bf16"),
    ],
}

GRIDS = {
    "cpu": {
        "quick": _sweep((1024, 8192), 512, 3),
        "default": _sweep((1024, 16384, 65536), 512, 2) + _sweep((1024, 16384, 65536), 512, 3),
    },
    "cuda": {
        "quick": _sweep((16384, 262144), 1024, 3, "bf16"),
        "default": _sweep((4096, 65536, 1048576), 1024, 2, "bf16")
        + _sweep((4096, 65536, 1048576), 1024, 3, "bf16"),
    },
}

PYTEST_CASES = [Case("m2-d64-n256", 256, 64, 2), Case("m3-d128-n1024", 1024, 128, 3)]

CROSSOVER = [
    Case(f"x-d{d}-m{m}-n{n}", n, d, m)
    for d, m in [(64, 2), (256, 2), (256, 3), (1024, 3)]
    for n in (16, 64, 256, 1024, 4096, 16384)
]


def report_headline(rows: list[Row], device: str, skipped: Mapping[str, str]) -> list[str]:
    """No formal goal: time and GB/s of every way on the headline cases."""
    lines = []
    for case in HEADLINE["cuda" if device.startswith("cuda") else "cpu"]:
        if line := g.not_run(SPEC.name, case.name, rows, "headline (no formal goal)"):
            lines.append(line)
            continue
        lines.append(f"{SPEC.name} headline ({case.name}: {case.describe()}; no formal goal):")
        for mode in ("forward", "fwd+bwd"):
            parts = []
            for r in rows:
                if r["case"] == case.name and r["mode"] == mode and not r["error"]:
                    vs = f", {r['speedup_vs_reference']:.2f}x vs ref" if r["way"] != SPEC.reference else ""
                    parts.append(f"{r['way']} {g.ms(r):.3f} ms {float(r['gbps']):.1f} GB/s{vs}")  # type: ignore[arg-type]
            lines.append(f"  {mode}: " + ("; ".join(parts) if parts else "nothing ran"))
        lines += [f"  skipped {w}: {why}" for w, why in skipped.items() if w.startswith("fused[cpu")]
    return lines


SPEC = OpSpec(
    name="product_fusion",
    title="product fusion",
    case_type=Case,
    fused=lambda xs: fusionops.product_fusion(xs),
    baselines=(
        Baseline("reference", "reference", lambda: reference.product_fusion),
        Baseline("compile(reference)", "compile", lambda: compiled(reference.product_fusion), compiled=True),
    ),
    make_inputs=make_inputs,
    probe_case=lambda dtype: Case("probe", 3, 4, 2, dtype),
    grids=GRIDS,
    headline=HEADLINE,
    pytest_cases=PYTEST_CASES,
    goals=report_headline,
    crossover_cases=CROSSOVER,
    crossover_metric="N*d",
)
