"""The bilinear pooling family (DESIGN.md section 6): MFB (``fusionops.mfb``), MFH
(``fusionops.mfh``) and BLOCK (``fusionops.block_fusion``), one spec each.

Ways: ``fused[<backend>]`` (never holding the ``(N, k·o)`` / per-chunk ``(N, R·s)``
projections, nor MFH's chained products; backward recomputes them per tile), ``reference``
(``fusionops.reference``: the materialising formulas, as block.bootstrap.pytorch's
``fusions.py`` computes them) and ``compile(reference)``.

Model FLOPs: the projections only. MFB forward ``2·N·k·o·(d_x + d_t) + 2·N·o·O``; MFH
forward ``p`` times MFB's projections plus its output GEMM, ``2·N·p·k·o·(d_x + d_t) +
2·N·p·o·O``; BLOCK forward ``2·N·R·s·m·2 + 2·N·m·O`` (each chunk's ``s → R·s`` GEMM, summed
over chunks); backward twice the forward (the fused kernels also recompute the projections:
one more forward's worth of projection FLOPs, not counted here).

Goals. CPU (fp32, N = 512, both modalities 512-d, output 256; MFB k = 5 with o = 256, BLOCK
15 chunks rank 15 with m = 480): fused fwd+bwd >= 1.5x faster and >= 4x less extra peak memory
than the reference. GPU (bf16, N = 8192, same widths): the fastest fused way >= 1.5x faster and
>= 4x less extra peak memory than the reference (cases defined, not yet run).

MFH (p = 2 blocks, block.bootstrap's ``MFH``; k = 5, o = 256, the same widths, N and dtypes)
has the same goals, and MFB's bound applies to it: the fused backward recomputes every block's
projections, so its fwd+bwd runs about 4/3 of the reference's GEMM FLOPs (11.1 against 8.5
GFLOP at the CPU headline), and GEMMs are most of either way's time, so >= 1.5x is not expected.
Nor, probably, 4x less memory: y, dx, dt and the weight gradients every fwd+bwd allocates
(``out_mb``) are 13.7 MB there, and one measurement of the reference's extra peak (61 MB, on a
loaded machine) leaves the fused way about 2 MB above them for 4x.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import fusionops
from benchmarks import goals as g
from benchmarks.spec import Baseline, CaseBase, Draw, Inputs, OpSpec, Row, mb, per_mode
from benchmarks.ways import compiled
from fusionops import reference


@dataclass(frozen=True)
class MfbCase(CaseBase):
    """``N`` rows, widths ``d_x``, ``d_t``, factor ``k``, pooled width ``o``, output ``O``;
    ``blocks`` (p) > 1: MFH, p chained MFB blocks of that shape, ``O`` from their ``p·o`` pooled
    features (MFB's CSV columns leave ``blocks`` out)."""

    name: str
    n: int
    dx: int
    dt: int
    k: int
    o: int
    out: int
    dtype: str = "fp32"
    blocks: int = 1

    @property
    def proj_bytes(self) -> int:
        """Bytes of one block's ``(N, k·o)`` projection (the reference holds several)."""
        return self.n * self.k * self.o * self.itemsize

    @property
    def out_bytes(self) -> int:
        """Bytes any fwd+bwd must allocate: y, dx, dt and the parameter gradients."""
        pko, po = self.blocks * self.k * self.o, self.blocks * self.o
        elems = self.n * (self.out + self.dx + self.dt) + pko * (self.dx + self.dt + 2) + self.out * (po + 1)
        return elems * self.itemsize

    def flops(self, mode: str) -> int:
        proj = self.k * self.o * (self.dx + self.dt) + self.o * self.out  # one block's share
        return per_mode(2 * self.n * self.blocks * proj)[mode]

    @property
    def sweep(self) -> str:
        p = f" p={self.blocks}" if self.blocks != 1 else ""
        return f"d={self.dx}x{self.dt} k={self.k} o={self.o}{p} O={self.out} {self.dtype}"

    def columns(self) -> dict[str, object]:
        cols: dict[str, object] = {"dims": f"{self.dx}x{self.dt}", "k": self.k, "o": self.o}
        if self.blocks != 1:
            cols["blocks"] = self.blocks
        return cols | {"out": self.out, "dtype": self.dtype, "proj_mb": mb(self.proj_bytes),
                       "out_mb": mb(self.out_bytes)}  # fmt: skip

    def describe(self) -> str:
        return f"N={self.n} {self.sweep}"

    @property
    def crossover_elements(self) -> int:
        return self.n * self.blocks * self.k * self.o  # fusionops.ops.mfb's / mfh's size metric


@dataclass(frozen=True)
class BlockCase(CaseBase):
    """``N`` rows, projected width ``m`` (both modalities), ``chunks`` C, ``rank`` R, output ``O``."""

    name: str
    n: int
    m: int
    chunks: int
    rank: int
    out: int
    dtype: str = "fp32"

    @property
    def proj_bytes(self) -> int:
        """Bytes of one modality's chunk projections ``(N, R·m)`` (the reference holds several)."""
        return self.n * self.rank * self.m * self.itemsize

    @property
    def out_bytes(self) -> int:
        s = self.m // self.chunks
        params = 2 * self.chunks * self.rank * s * (s + 1) + self.out * (self.m + 1)
        return (self.n * (self.out + 2 * self.m) + params) * self.itemsize

    def flops(self, mode: str) -> int:
        return per_mode(2 * self.n * (2 * self.rank * self.m * (self.m // self.chunks) + self.m * self.out))[
            mode
        ]

    @property
    def sweep(self) -> str:
        return f"m={self.m} C={self.chunks} R={self.rank} O={self.out} {self.dtype}"

    def columns(self) -> dict[str, object]:
        return {"m": self.m, "chunks": self.chunks, "rank": self.rank, "out": self.out, "dtype": self.dtype,
                "proj_mb": mb(self.proj_bytes), "out_mb": mb(self.out_bytes)}  # fmt: skip

    def describe(self) -> str:
        return f"N={self.n} m={self.m} C={self.chunks} R={self.rank} O={self.out} {self.dtype}"

    @property
    def crossover_elements(self) -> int:
        return self.n * self.rank * self.m  # fusionops.ops.block_fusion's size metric


def mfb_inputs(case: MfbCase, device: str, requires_grad: bool) -> Inputs:
    """Weights scaled like nn.Linear's, so the projections are about N(0, 1/3)."""
    draw = Draw(device, case.torch_dtype, requires_grad)
    ko = case.k * case.o
    x, t = draw.normal(case.n, case.dx), draw.normal(case.n, case.dt)
    params = [draw.normal(ko, case.dx, std=case.dx**-0.5), draw.uniform(ko, bound=0.1),
              draw.normal(ko, case.dt, std=case.dt**-0.5), draw.uniform(ko, bound=0.1),
              draw.normal(case.out, case.o, std=case.o**-0.5), draw.uniform(case.out, bound=0.1)]  # fmt: skip
    grad_out = draw.normal(case.n, case.out, leaf=False)
    return Inputs((x, t, *params), [x, t, *params], grad_out)


def mfh_inputs(case: MfbCase, device: str, requires_grad: bool) -> Inputs:
    """As MFB's, per block: ``(p, k·o, d)`` weights scaled like nn.Linear's."""
    draw = Draw(device, case.torch_dtype, requires_grad)
    p, ko, po = case.blocks, case.k * case.o, case.blocks * case.o
    x, t = draw.normal(case.n, case.dx), draw.normal(case.n, case.dt)
    params = [draw.normal(p, ko, case.dx, std=case.dx**-0.5), draw.uniform(p, ko, bound=0.1),
              draw.normal(p, ko, case.dt, std=case.dt**-0.5), draw.uniform(p, ko, bound=0.1),
              draw.normal(case.out, po, std=po**-0.5), draw.uniform(case.out, bound=0.1)]  # fmt: skip
    grad_out = draw.normal(case.n, case.out, leaf=False)
    return Inputs((x, t, *params), [x, t, *params], grad_out)


def block_inputs(case: BlockCase, device: str, requires_grad: bool) -> Inputs:
    draw = Draw(device, case.torch_dtype, requires_grad)
    c, r, s = case.chunks, case.rank, case.m // case.chunks
    x, t = draw.normal(case.n, case.m), draw.normal(case.n, case.m)
    params = [draw.normal(c, r * s, s, std=s**-0.5), draw.uniform(c, r * s, bound=0.1),
              draw.normal(c, r * s, s, std=s**-0.5), draw.uniform(c, r * s, bound=0.1),
              draw.normal(case.out, case.m, std=case.m**-0.5), draw.uniform(case.out, bound=0.1)]  # fmt: skip
    grad_out = draw.normal(case.n, case.out, leaf=False)
    return Inputs((x, t, *params), [x, t, *params], grad_out)


# Every way takes (x, t, *params); the op's static arguments are fixed per spec (one k and one
# rank per case family would need them in the case: the grids keep k = 5 and R = 15 fixed).
MFB_K = 5
MFH_K, MFH_BLOCKS = 5, 2  # block.bootstrap's MFH: two blocks
BLOCK_RANK = 15


def mfb_reference(x, t, uw, ub, vw, vb, ow, ob):
    return reference.mfb(x, t, uw, ub, vw, vb, ow, ob, MFB_K, "relu", True)


def mfh_reference(x, t, uw, ub, vw, vb, ow, ob):
    return reference.mfh(x, t, uw, ub, vw, vb, ow, ob, MFH_K, "relu", True)


def block_reference(x, t, w0, b0, w1, b1, ow, ob):
    return reference.block_fusion(x, t, w0, b0, w1, b1, ow, ob, BLOCK_RANK, "before_cat")


MFB_HEADLINE = {
    "cpu": [MfbCase("headline-cpu", 512, 512, 512, MFB_K, 256, 256, "fp32")],
    "cuda": [MfbCase("headline-gpu", 8192, 512, 512, MFB_K, 256, 256, "bf16")],
}
MFH_HEADLINE = {
    "cpu": [MfbCase("headline-cpu", 512, 512, 512, MFH_K, 256, 256, "fp32", MFH_BLOCKS)],
    "cuda": [MfbCase("headline-gpu", 8192, 512, 512, MFH_K, 256, 256, "bf16", MFH_BLOCKS)],
}
BLOCK_HEADLINE = {
    "cpu": [BlockCase("headline-cpu", 512, 480, 15, BLOCK_RANK, 256, "fp32")],
    "cuda": [BlockCase("headline-gpu", 8192, 480, 15, BLOCK_RANK, 256, "bf16")],
}
MFB_GRIDS = {
    "cpu": {
        "quick": [MfbCase(f"mfb-n{n}", n, 128, 96, MFB_K, 64, 32) for n in (64, 512)],
        "default": [MfbCase(f"mfb512-n{n}", n, 512, 512, MFB_K, 256, 256) for n in (128, 512, 2048)],
    },
    "cuda": {
        "quick": [MfbCase(f"gpu-n{n}", n, 512, 512, MFB_K, 256, 256, "bf16") for n in (2048, 32768)],
        "default": [MfbCase(f"gpu-n{n}", n, 512, 512, MFB_K, 256, 256, "bf16") for n in (1024, 8192, 65536)],
    },
}
MFH_GRIDS = {
    "cpu": {
        "quick": [MfbCase(f"mfh-n{n}", n, 128, 96, MFH_K, 64, 32, "fp32", MFH_BLOCKS) for n in (64, 512)],
        "default": [
            MfbCase(f"mfh512-n{n}", n, 512, 512, MFH_K, 256, 256, "fp32", MFH_BLOCKS)
            for n in (128, 512, 2048)
        ],
    },
    "cuda": {
        "quick": [
            MfbCase(f"gpu-n{n}", n, 512, 512, MFH_K, 256, 256, "bf16", MFH_BLOCKS) for n in (2048, 32768)
        ],
        "default": [
            MfbCase(f"gpu-n{n}", n, 512, 512, MFH_K, 256, 256, "bf16", MFH_BLOCKS)
            for n in (1024, 8192, 65536)
        ],
    },
}
BLOCK_GRIDS = {
    "cpu": {
        "quick": [BlockCase(f"block-n{n}", n, 120, 15, BLOCK_RANK, 32) for n in (64, 512)],
        "default": [BlockCase(f"block480-n{n}", n, 480, 15, BLOCK_RANK, 256) for n in (128, 512, 2048)],
    },
    "cuda": {
        "quick": [BlockCase(f"gpu-n{n}", n, 480, 15, BLOCK_RANK, 256, "bf16") for n in (2048, 32768)],
        "default": [BlockCase(f"gpu-n{n}", n, 480, 15, BLOCK_RANK, 256, "bf16") for n in (1024, 8192, 65536)],
    },
}


def _goals(spec_name: str, headline: Mapping[str, list[CaseBase]]):
    def check(rows: list[Row], device: str, skipped: Mapping[str, str]) -> list[str]:
        """PASS/FAIL: fused fwd+bwd >= 1.5x faster and >= 4x less extra peak memory than the
        reference."""
        gpu = device.startswith("cuda")
        case = headline["cuda" if gpu else "cpu"][0]
        if line := g.not_run(spec_name, case.name, rows):
            return [line]
        head = f"{spec_name} headline goal ({case.name}, fwd+bwd):"
        wanted = ["fused[triton]", "fused[cuda]"] if gpu else ["fused[cpu]"]
        fused, why = g.best_fused(rows, case.name, wanted, skipped)
        if fused is None:
            return [f"{head} FAIL: no fused way ran ({why})"]
        ref, comp = (g.find(rows, case.name, w) for w in ("reference", "compile(reference)"))
        lines = [head, "  " + g.speedup_line(fused, ref, "reference", 1.5, skipped.get("reference", ""))]
        lines.append("  " + g.speedup_line(fused, comp, "compile(reference)", None))
        m_f, m_r = g.peak(fused), g.peak(ref) if ref else None
        if m_f is None or m_r is None:
            lines.append("  memory: not measured (run without --no-memory)")
        else:
            ratio = m_r / max(m_f, 1e-9)
            lines.append(
                f"  memory {g.verdict(ratio >= 4)}: {fused['way']} peak extra {m_f:.1f} MB vs reference "
                f"{m_r:.1f} MB ({ratio:.1f}x less; need >= 4x; out_mb {case.out_bytes / 1e6:.1f})"  # type: ignore[attr-defined]
            )
        return lines

    return check


MFB_SPEC = OpSpec(
    name="mfb",
    title="MFB bilinear pooling",
    case_type=MfbCase,
    fused=lambda x, t, uw, ub, vw, vb, ow, ob: fusionops.mfb(
        x, t, uw, ub, vw, vb, ow, ob, factor=MFB_K, normalize=True
    ),
    baselines=(
        Baseline("reference", "reference", lambda: mfb_reference),
        Baseline("compile(reference)", "compile", lambda: compiled(mfb_reference), compiled=True),
    ),
    make_inputs=mfb_inputs,
    probe_case=lambda dtype: MfbCase("probe", 3, 4, 3, MFB_K, 2, 2, dtype),
    grids=MFB_GRIDS,
    headline=MFB_HEADLINE,
    pytest_cases=[MfbCase("mfb-n64", 64, 32, 24, MFB_K, 16, 8)],
    goals=_goals("mfb", MFB_HEADLINE),
    crossover_cases=[
        MfbCase(f"x{d}-o{o}-n{n}", n, d, d, MFB_K, o, o)
        for d, o in ((64, 32), (512, 256))
        for n in (16, 64, 256, 1024)
    ],
    crossover_metric="N*k*o",
    table_column=("proj MB", "proj_mb", "bytes of one (N, k·o) projection"),
)

MFH_SPEC = OpSpec(
    name="mfh",
    title="MFH bilinear pooling",
    case_type=MfbCase,
    fused=lambda x, t, uw, ub, vw, vb, ow, ob: fusionops.mfh(
        x, t, uw, ub, vw, vb, ow, ob, factor=MFH_K, normalize=True
    ),
    baselines=(
        Baseline("reference", "reference", lambda: mfh_reference),
        Baseline("compile(reference)", "compile", lambda: compiled(mfh_reference), compiled=True),
    ),
    make_inputs=mfh_inputs,
    probe_case=lambda dtype: MfbCase("probe", 3, 4, 3, MFH_K, 2, 2, dtype, MFH_BLOCKS),
    grids=MFH_GRIDS,
    headline=MFH_HEADLINE,
    pytest_cases=[MfbCase("mfh-n64", 64, 32, 24, MFH_K, 16, 8, "fp32", MFH_BLOCKS)],
    goals=_goals("mfh", MFH_HEADLINE),
    crossover_cases=[
        MfbCase(f"x{d}-o{o}-n{n}", n, d, d, MFH_K, o, o, "fp32", MFH_BLOCKS)
        for d, o in ((64, 32), (512, 256))
        for n in (16, 64, 256, 1024)
    ],
    crossover_metric="N*p*k*o",
    table_column=("proj MB", "proj_mb", "bytes of one block's (N, k·o) projection"),
)

BLOCK_SPEC = OpSpec(
    name="block_fusion",
    title="BLOCK bilinear fusion",
    case_type=BlockCase,
    fused=lambda x, t, w0, b0, w1, b1, ow, ob: fusionops.block_fusion(
        x, t, w0, b0, w1, b1, ow, ob, rank=BLOCK_RANK
    ),
    baselines=(
        Baseline("reference", "reference", lambda: block_reference),
        Baseline("compile(reference)", "compile", lambda: compiled(block_reference), compiled=True),
    ),
    make_inputs=block_inputs,
    probe_case=lambda dtype: BlockCase("probe", 3, 30, 15, BLOCK_RANK, 2, dtype),
    grids=BLOCK_GRIDS,
    headline=BLOCK_HEADLINE,
    pytest_cases=[BlockCase("block-n64", 64, 60, 15, BLOCK_RANK, 8)],
    goals=_goals("block_fusion", BLOCK_HEADLINE),
    crossover_cases=[
        BlockCase(f"m{m}-n{n}", n, m, 15, BLOCK_RANK, 32) for m in (120, 480) for n in (16, 64, 256, 1024)
    ],
    crossover_metric="N*R*m",
    table_column=("proj MB", "proj_mb", "bytes of one modality's (N, R·m) chunk projections"),
)
