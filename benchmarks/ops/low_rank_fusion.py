"""Low-rank fusion (LMF): ``y = Σ_r w_r · Π_m ([1, x_m] F_m[r]) + b``.

Ways: ``fused[<backend>]`` (``fusionops.low_rank_fusion``, never holding every row's (R, O)
projections), ``reference`` (``fusionops.reference.low_rank_fusion``: einsum projections,
product, einsum with w), ``compile(reference)``, and ``multibench``: the computation of
MultiBench's ``LowRankTensorFusion.forward`` (pliang279/MultiBench, ``fusions/common_fusions.py``),
the way most LMF users run it, written out below in our own words.

Model FLOPs: the projections, forward ``2·N·R·O·Σ(d_m+1)``; backward twice that (the dx and
dF GEMMs); the elementwise products, the rank reduction and the bias are left out.

Goals. CPU (fp32, N=4096, dims (128,64,300), R=8, O=64, fwd+bwd): ``fused[cpu]`` no slower than
``multibench`` and with less extra peak memory (reference and compile(reference) reported beside).
GPU (bf16, N=8192, dims (256,256,256), R=16, O=256, fwd+bwd): the fastest fused way >= 2x faster
than the reference and >= 1.2x faster than compile(reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import fusionops
from benchmarks import goals as g
from benchmarks.spec import Baseline, CaseBase, Draw, Inputs, OpSpec, Row, mb, per_mode
from benchmarks.ways import compiled
from fusionops import reference


@dataclass(frozen=True)
class Case(CaseBase):
    """One LMF problem: ``N`` rows, modality widths ``dims``, rank ``R``, ``O`` outputs."""

    name: str
    n: int
    dims: tuple[int, ...]
    rank: int
    out: int
    dtype: str = "fp32"

    @property
    def proj_bytes(self) -> int:
        """Bytes of the M projections ``(N, R, O)`` that the unfused ways hold for backward."""
        return len(self.dims) * self.n * self.rank * self.out * self.itemsize

    @property
    def out_bytes(self) -> int:
        """Bytes any fwd+bwd must allocate: y, dx_m, dF_m (R, d_m+1, O), dw and db."""
        d1 = sum(d + 1 for d in self.dims)
        elems = self.n * self.out + self.n * sum(self.dims) + self.rank * d1 * self.out + self.rank + self.out
        return elems * self.itemsize

    def flops(self, mode: str) -> int:
        return per_mode(2 * self.n * self.rank * self.out * sum(d + 1 for d in self.dims))[mode]

    @property
    def sweep(self) -> str:
        return f"dims={'x'.join(map(str, self.dims))} R={self.rank} O={self.out} {self.dtype}"

    def columns(self) -> dict[str, object]:
        return {
            "dims": "x".join(map(str, self.dims)),
            "rank": self.rank,
            "out": self.out,
            "dtype": self.dtype,
            "proj_mb": mb(self.proj_bytes),
            "out_mb": mb(self.out_bytes),
        }

    def describe(self) -> str:
        return (
            f"N={self.n} dims={self.dims} R={self.rank} O={self.out} {self.dtype} "
            f"projections={self.proj_bytes / 1e6:.1f} MB"
        )

    @property
    def crossover_elements(self) -> int:
        return self.n * self.rank * self.out * len(self.dims)  # fusionops.ops.low_rank_fusion._order's rule


def make_inputs(case: Case, device: str, requires_grad: bool) -> Inputs:
    """Random inputs with a fixed seed, scaled so every projection and y are about N(0, 1)."""
    draw = Draw(device, case.torch_dtype, requires_grad)
    xs = [draw.normal(case.n, d) for d in case.dims]
    factors = [draw.normal(case.rank, d + 1, case.out, std=(d + 1) ** -0.5) for d in case.dims]
    rank_weight = draw.normal(case.rank, std=case.rank**-0.5)
    bias = draw.uniform(case.out, bound=0.1)
    grad_out = draw.normal(case.n, case.out, leaf=False)
    return Inputs((xs, factors, rank_weight, bias), [*xs, *factors, rank_weight, bias], grad_out)


def multibench(xs: Sequence[Tensor], factors: Sequence[Tensor], rank_weight: Tensor, bias: Tensor) -> Tensor:
    """LMF as MultiBench's ``LowRankTensorFusion.forward`` computes it.

    Per modality: prepend a column of ones, ``matmul`` with the whole factor ``(R, d_m+1, O)``
    (broadcast: ``(R, N, O)``), multiply into the running product; then ``matmul`` the rank
    weights ``(1, R)`` with the product permuted to ``(N, R, O)`` and add the bias. MultiBench
    ends with ``.squeeze()`` and ``.view(-1, O)``; ``.squeeze(1)`` is the same for these shapes.
    """
    n, rank = xs[0].shape[0], rank_weight.shape[0]
    fused: Tensor | int = 1
    for x, factor in zip(xs, factors, strict=True):
        ones = torch.ones(n, 1, dtype=x.dtype, device=x.device)
        fused = fused * torch.matmul(torch.cat([ones, x], dim=1), factor)
    assert isinstance(fused, Tensor)
    return torch.matmul(rank_weight.view(1, rank), fused.permute(1, 0, 2)).squeeze(1) + bias


HEADLINE = {
    "cpu": [Case("headline-cpu", 4096, (128, 64, 300), 8, 64, "fp32")],
    "cuda": [Case("headline-gpu", 8192, (256, 256, 256), 16, 256, "bf16")],
}


def _sweep(
    prefix: str, ns: tuple[int, ...], dims: tuple[int, ...], rank: int, out: int, dtype: str = "fp32"
) -> list[Case]:
    return [Case(f"{prefix}-n{n}", n, dims, rank, out, dtype) for n in ns]


GRIDS = {
    "cpu": {
        "quick": _sweep("lmf32", (256, 2048), (32, 16, 64), 4, 32),
        # The headline's shape (--full adds N=4096 to this sweep) and a small one.
        "default": _sweep("mb", (256, 1024), (128, 64, 300), 8, 64)
        + _sweep("lmf32", (512, 4096), (32, 16, 64), 4, 32),
    },
    "cuda": {
        "quick": _sweep("gpu256", (2048, 32768), (256, 256, 256), 16, 256, "bf16"),
        "default": _sweep("gpu256", (1024, 4096, 32768, 131072), (256, 256, 256), 16, 256, "bf16")
        + _sweep("gpu-mixed", (4096, 32768), (32, 128, 768), 8, 128, "bf16"),
    },
}

PYTEST_CASES = [Case("lmf8-n64", 64, (8, 8, 8), 4, 16), Case("bi16x24-n256", 256, (16, 24), 8, 32)]

CROSSOVER = [
    Case(f"x{'x'.join(map(str, dims))}-r{rank}-o{out}-n{n}", n, dims, rank, out)
    for dims, rank, out in [
        ((8, 8, 8), 4, 16),
        ((32, 16, 64), 4, 32),
        ((16, 64), 8, 32),
        ((128, 64, 300), 8, 64),
    ]
    for n in (16, 64, 256, 1024, 4096)
]


def check_goals(rows: list[Row], device: str, skipped: Mapping[str, str]) -> list[str]:
    """PASS/FAIL lines for the headline goal of ``device``."""
    gpu = device.startswith("cuda")
    case = HEADLINE["cuda" if gpu else "cpu"][0]
    if line := g.not_run(SPEC.name, case.name, rows):
        return [line]
    head = f"{SPEC.name} headline goal ({case.name}, fwd+bwd):"
    wanted = ["fused[triton]", "fused[cuda]"] if gpu else ["fused[cpu]"]
    fused, why = g.best_fused(rows, case.name, wanted, skipped)
    if fused is None:
        return [f"{head} FAIL: no fused way ran ({why})"]
    ref, comp, mbench = (
        g.find(rows, case.name, w) for w in ("reference", "compile(reference)", "multibench")
    )
    lines = [head]
    if gpu:
        for base, name, need in ((ref, "reference", 2.0), (comp, "compile(reference)", 1.2)):
            lines.append("  " + g.speedup_line(fused, base, name, need, skipped.get(name, "")))
        lines.append("  " + g.speedup_line(fused, mbench, "multibench", None))
    elif mbench is None:
        lines.append(f"  FAIL: multibench did not run ({skipped.get('multibench', 'failed')}), no verdict")
    else:
        lines.append("  " + g.no_slower_line(fused, mbench, "multibench"))
        m_f, m_m = g.peak(fused), g.peak(mbench)
        if m_f is None or m_m is None:
            lines.append("  memory: not measured (run without --no-memory)")
        else:
            lines.append(
                f"  memory {g.verdict(m_f < m_m)}: {fused['way']} peak extra {m_f:.1f} MB < multibench "
                f"{m_m:.1f} MB ({m_m / max(m_f, 1e-9):.1f}x less)"
            )
        for base, name in ((ref, "reference"), (comp, "compile(reference)")):
            lines.append("  " + g.speedup_line(fused, base, name, None))
    peaks = [f"{r['way']} {p:.1f}" for r in (fused, ref, comp, mbench) if r and (p := g.peak(r)) is not None]
    if peaks:
        lines.append(
            f"  peak extra MB: {', '.join(peaks)} (out_mb {case.out_bytes / 1e6:.1f}, "
            f"projections {case.proj_bytes / 1e6:.1f})"
        )
    return lines


SPEC = OpSpec(
    name="low_rank_fusion",
    title="low-rank fusion",
    case_type=Case,
    fused=lambda xs, factors, rank_weight, bias: fusionops.low_rank_fusion(xs, factors, rank_weight, bias),
    baselines=(
        Baseline("reference", "reference", lambda: reference.low_rank_fusion),
        Baseline("compile(reference)", "compile", lambda: compiled(reference.low_rank_fusion), compiled=True),
        Baseline("multibench", "multibench", lambda: multibench),
    ),
    make_inputs=make_inputs,
    probe_case=lambda dtype: Case("probe", 3, (2, 3), 2, 2, dtype),
    grids=GRIDS,
    headline=HEADLINE,
    pytest_cases=PYTEST_CASES,
    goals=check_goals,
    crossover_cases=CROSSOVER,
    crossover_metric="N*R*O*M",
    table_column=("proj MB", "proj_mb", "bytes of the M projections (N, R, O)"),
)
