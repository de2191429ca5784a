"""Tensor fusion (TFN): ``y = Z Wᵀ + b`` with ``Z = flatten([1, x_1] ⊗ … ⊗ [1, x_M])``.

Ways: ``fused[<backend>]`` (``fusionops.tensor_fusion``, never holding Z), ``reference``
(materialise Z by chained outer products, then ``F.linear``: the baseline of MultiBench, MMSA and
Michaels et al.; ``fusionops.reference.tensor_fusion``) and ``compile(reference)``.

Model FLOPs of the projection: forward ``2·N·O·K``, backward ``4·N·O·K`` (dW = gᵀZ, dZ = gW);
building Z and reducing dZ to dx_m are left out, as in MFU.

Goals. CPU (fp32, N=512, dims (40,40,40), O=64, fwd+bwd): the fused way's extra peak memory is at
most 1/4 of the bytes of Z, and its median time is no worse than the reference's. GPU (bf16,
N=4096, dims (32,32,128), O=128, fwd+bwd): ``fused[triton]`` is >= 3x faster and uses >= 10x
less peak memory than the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import fusionops
from benchmarks import goals as g
from benchmarks.spec import Baseline, CaseBase, Draw, Inputs, OpSpec, Row, mb, per_mode
from benchmarks.ways import compiled
from fusionops import reference


@dataclass(frozen=True)
class Case(CaseBase):
    """One tensor fusion problem: ``N`` rows, modality widths ``dims``, ``O`` outputs."""

    name: str
    n: int
    dims: tuple[int, ...]
    out: int
    dtype: str = "fp32"

    @property
    def k(self) -> int:
        return math.prod(d + 1 for d in self.dims)

    @property
    def z_bytes(self) -> int:
        """Bytes of the (N, K) tensor Z that the reference materialises."""
        return self.n * self.k * self.itemsize

    @property
    def out_bytes(self) -> int:
        """Bytes any fwd+bwd must allocate: y, dx_m, dW (O×K) and db."""
        elems = self.n * self.out + self.n * sum(self.dims) + self.out * self.k + self.out
        return elems * self.itemsize

    def flops(self, mode: str) -> int:
        return per_mode(2 * self.n * self.out * self.k)[mode]

    @property
    def sweep(self) -> str:
        return f"dims={'x'.join(map(str, self.dims))} O={self.out} {self.dtype}"

    def columns(self) -> dict[str, object]:
        return {
            "dims": "x".join(map(str, self.dims)),
            "out": self.out,
            "dtype": self.dtype,
            "k": self.k,
            "z_mb": mb(self.z_bytes),
            "out_mb": mb(self.out_bytes),
        }

    def describe(self) -> str:
        return (
            f"N={self.n} dims={self.dims} O={self.out} {self.dtype} K={self.k} Z={self.z_bytes / 1e6:.1f} MB"
        )

    @property
    def crossover_elements(self) -> int:
        return self.n * self.k  # N·K, the rule of fusionops.ops.tensor_fusion._order


def make_inputs(case: Case, device: str, requires_grad: bool) -> Inputs:
    """Random inputs with a fixed seed; weight and bias as ``nn.Linear(K, O)`` draws them."""
    draw = Draw(device, case.torch_dtype, requires_grad)
    bound = 1.0 / math.sqrt(case.k)
    xs = [draw.normal(case.n, d) for d in case.dims]
    weight = draw.uniform(case.out, case.k, bound=bound)
    bias = draw.uniform(case.out, bound=bound)
    grad_out = draw.normal(case.n, case.out, leaf=False)
    return Inputs((xs, weight, bias), [*xs, weight, bias], grad_out)


def _sweep(
    prefix: str, ns: tuple[int, ...], dims: tuple[int, ...], out: int, dtype: str = "fp32"
) -> list[Case]:
    return [Case(f"{prefix}-n{n}", n, dims, out, dtype) for n in ns]


# K = 68921, Z = 141 MB (CPU); K = 140481, Z = 1.15 GB (GPU).
HEADLINE = {
    "cpu": [Case("headline-cpu", 512, (40, 40, 40), 64, "fp32")],
    "cuda": [Case("headline-gpu", 4096, (32, 32, 128), 128, "bf16")],
}

GRIDS = {
    "cpu": {
        "quick": _sweep("tri8", (64, 512), (8, 8, 8), 32),
        "default": _sweep("tri16", (128, 512, 2048), (16, 16, 16), 64)
        + [Case("bi64x128-n512", 512, (64, 128), 64)],
    },
    "cuda": {
        "quick": _sweep("tri32", (1024, 4096), (32, 32, 32), 128, "bf16"),
        "default": _sweep("tri32", (1024, 4096, 16384), (32, 32, 32), 128, "bf16")
        + _sweep("tri32x128", (1024, 4096), (32, 32, 128), 128, "bf16"),
    },
}

PYTEST_CASES = [Case("tri8-n64", 64, (8, 8, 8), 32), Case("bi16x24-n128", 128, (16, 24), 16)]

CROSSOVER = [
    Case(f"x{'x'.join(map(str, dims))}-n{n}", n, dims, out)
    for dims, out in [
        ((4, 4, 4), 16),
        ((8, 8, 8), 32),
        ((16, 16), 32),
        ((32, 32), 64),
        ((16, 16, 16), 64),
        ((64, 64), 64),
        ((8, 8, 8, 8), 32),
    ]
    for n in (16, 64, 256, 1024, 4096)
    if n * math.prod(d + 1 for d in dims) <= 1 << 24  # larger shapes are the report's business
]


def check_goals(rows: list[Row], device: str, skipped: Mapping[str, str]) -> list[str]:
    """PASS/FAIL lines for the headline goal of ``device``."""
    gpu = device.startswith("cuda")
    case = HEADLINE["cuda" if gpu else "cpu"][0]
    if line := g.not_run(SPEC.name, case.name, rows):
        return [line]
    head = f"{SPEC.name} headline goal ({case.name}, fwd+bwd):"
    ref = g.find(rows, case.name, "reference")
    if ref is None:
        return [f"{head} reference did not run; no verdict"]
    fused, why = g.best_fused(rows, case.name, ["fused[triton]"] if gpu else ["fused[cpu]"], skipped)
    if fused is None:
        return [f"{head} FAIL: no fused way ran ({why})"]
    name, m_f, m_r = fused["way"], g.peak(fused), g.peak(ref)
    if m_f is None or m_r is None:
        mem_line = "memory: not measured (run without --no-memory)"
    elif not gpu:
        z = case.z_bytes / 1e6
        mem_line = (
            f"memory {g.verdict(m_f <= z / 4)}: {name} peak extra {m_f:.1f} MB <= Z/4 = {z / 4:.1f} MB "
            f"(Z = {z:.1f} MB; reference {m_r:.1f} MB)"
        )
    else:
        ratio = m_r / max(m_f, 1e-9)
        mem_line = (
            f"memory {g.verdict(ratio >= 10)}: reference/{name} peak = {m_r:.1f}/{m_f:.1f} MB "
            f"= {ratio:.1f}x >= 10x"
        )
    if gpu:
        time_line = g.speedup_line(fused, ref, "reference", 3.0)
    else:
        time_line = g.no_slower_line(fused, ref, "reference")
    return [head, "  " + mem_line, "  " + time_line]


SPEC = OpSpec(
    name="tensor_fusion",
    title="tensor fusion",
    case_type=Case,
    fused=lambda xs, weight, bias: fusionops.tensor_fusion(xs, weight, bias),
    baselines=(
        Baseline("reference", "reference", lambda: reference.tensor_fusion),
        Baseline("compile(reference)", "compile", lambda: compiled(reference.tensor_fusion), compiled=True),
    ),
    make_inputs=make_inputs,
    probe_case=lambda dtype: Case("probe", 3, (2, 3), 2, dtype),
    grids=GRIDS,
    headline=HEADLINE,
    pytest_cases=PYTEST_CASES,
    goals=check_goals,
    crossover_cases=CROSSOVER,
    crossover_metric="N*K",
    table_column=("Z MB", "z_mb", "bytes of Z"),
)
