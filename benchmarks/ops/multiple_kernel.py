"""Multiple kernel fusion (MKL): ``K = Σ_m β_m k_m(xs_a[m], xs_b[m])``, shape ``(N_a, N_b)``.

Ways: ``fused[<backend>]`` (``fusionops.multiple_kernel``: each output tile built for all M
modalities at once, never holding the M Gram matrices; backward recomputes the tiles),
``reference`` (``fusionops.reference.multiple_kernel``: each modality's Gram matrix computed
separately, its base kernel applied, weighted and summed — what MKL libraries do, and the
baseline the issue's goal names), ``compile(reference)`` and ``sklearn``.

``sklearn`` is the CPU peers' computation: scikit-learn's ``sklearn.metrics.pairwise`` kernels
on numpy arrays summed with the β weights (:func:`sklearn_pairwise`, written out below; tested
to compute the reference's K in tests/test_benchmarks_multiple_kernel.py). It has no backward
(numpy, no autograd), so it is a forward-only baseline (``Baseline.modes = ("forward",)``):
timed in forward only, with no backward or fwd+bwd rows, no memory child (the peak column is
one fwd+bwd's) and no ``mem_vs_sklearn`` column; its ratio column is ``speedup_vs_sklearn``.
It is CPU only (skipped on CUDA: timing it there would time device-to-host copies and a CPU
library, not a GPU peer), fp32/fp64 only, and skipped when scikit-learn is not installed
(imported lazily, when the way first runs). The headline goals print the forward speed-up
over it beside the verdict; no goal depends on it.

Base kernels (``kernels``, a tuple of :data:`KERNELS` keys): ``rbf`` (``exp(-γ‖a-b‖²)``,
γ = 1/d_m, scikit-learn's default), ``poly2`` (``(a·b + 1)²``) and ``linear`` (``a·b``). Mixes
(:data:`MIXES`): ``mixed`` = (rbf, poly2, linear), ``rbf`` = three RBFs.

Model FLOPs: the Gram GEMMs, forward ``2·N_a·N_b·Σd_m``; backward twice that (``dxs_a = G·xs_b``
and ``dxs_b = Gᵀ·xs_a`` per modality, G the kernel's gradient tile). The elementwise work
(norms, exp, powers, the β-weighted sum), dβ (a reduction of the Gram matrices) and the
fused backward's recomputation of the Gram tiles are left out.

Memory: the output K alone is ``N_a·N_b`` elements (67.1 MB at 4096² fp32), and any fwd+bwd
also allocates dxs_a, dxs_b and dβ (``out_mb``). The reference holds the M Gram matrices
(``gram_mb``, M·K) plus its temporaries (RBF distances and exponentials, powers, β-weighted
terms), much of it saved for backward: its fwd+bwd extra peak at the CPU headline was 8.2x K
(``mixed``, 551 MB) and 11.2x K (``rbf``, 752 MB). At the GPU headline in fp32 K is 4.3 GB, so
the reference needs some 35-50 GB; should it run out of memory, the goal names its error.

Goals (issue 8, fwd+bwd, widths (128, 64, 300), mixes ``mixed`` and ``rbf``): CPU (fp32,
N_a = N_b = 4096) ``fused[cpu]`` at least 1.5x faster than the reference and at least 3x less
extra peak memory; GPU (bf16 and fp32, N_a = N_b = 32768) the fastest fused way the same.
compile(reference), forward's speed-ups (over the reference and, on CPU, over sklearn) and
every way's peak are printed beside.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import fusionops
from benchmarks import goals as g
from benchmarks.spec import Baseline, CaseBase, Draw, Inputs, OpSpec, Row, mb, per_mode
from benchmarks.ways import compiled
from fusionops import reference
from fusionops.base_kernels import BaseKernel, KernelSpec, as_base_kernels

# One object per base kernel, shared by every case's inputs (torch.compile guards on them).
KERNELS: dict[str, KernelSpec] = {
    "rbf": "rbf",
    "poly2": BaseKernel("polynomial", degree=2, offset=1.0),
    "linear": "linear",
}
MIXES = {"mixed": ("rbf", "poly2", "linear"), "rbf": ("rbf", "rbf", "rbf")}

# The goals: fused at least this much faster than the reference (fwd+bwd) ...
SPEEDUP_GOAL = 1.5
# ... and its extra peak at least this many times smaller ("far less peak memory": the fused
# way holds K, the gradients and tiles; the reference several (N_a, N_b) matrices per modality).
MEMORY_GOAL = 3.0


@dataclass(frozen=True)
class Case(CaseBase):
    """One MKL problem: ``N_a = n`` and ``N_b = n_b`` rows, modality widths ``dims``, one base
    kernel per modality (``kernels``: keys of :data:`KERNELS`)."""

    name: str
    n: int
    n_b: int
    dims: tuple[int, ...]
    kernels: tuple[str, ...]
    dtype: str = "fp32"

    @property
    def k_bytes(self) -> int:
        """Bytes of the output K ``(N_a, N_b)``."""
        return self.n * self.n_b * self.itemsize

    @property
    def gram_bytes(self) -> int:
        """Bytes of the M Gram matrices the reference holds (its temporaries come on top)."""
        return len(self.dims) * self.k_bytes

    @property
    def out_bytes(self) -> int:
        """Bytes any fwd+bwd must allocate: K, dxs_a, dxs_b and dβ."""
        return (self.n * self.n_b + (self.n + self.n_b) * sum(self.dims) + len(self.dims)) * self.itemsize

    def flops(self, mode: str) -> int:
        return per_mode(2 * self.n * self.n_b * sum(self.dims))[mode]

    @property
    def mix(self) -> str:
        """The kernels, e.g. ``rbf+poly2+linear``."""
        return "+".join(self.kernels)

    @property
    def sweep(self) -> str:
        """Short, for plot titles: the mix's name where it has one; N_b only when it is not N_a."""
        mix = next((name for name, kernels in MIXES.items() if kernels == self.kernels), self.mix)
        rows = "" if self.n_b == self.n else f" Nb={self.n_b}"
        return f"dims={'x'.join(map(str, self.dims))} {mix}{rows} {self.dtype}"

    def columns(self) -> dict[str, object]:
        return {
            "n_b": self.n_b,
            "dims": "x".join(map(str, self.dims)),
            "kernels": self.mix,
            "dtype": self.dtype,
            "k_mb": mb(self.k_bytes),
            "gram_mb": mb(self.gram_bytes),
            "out_mb": mb(self.out_bytes),
        }

    def describe(self) -> str:
        return (
            f"N_a={self.n} N_b={self.n_b} dims={self.dims} kernels={self.mix} {self.dtype} "
            f"K={self.k_bytes / 1e6:.1f} MB, M Gram matrices={self.gram_bytes / 1e6:.1f} MB"
        )

    @property
    def crossover_elements(self) -> int:
        # The output elements, what fusionops.ops.multiple_kernel's size rule compares with
        # registry thresholds.
        return self.n * self.n_b


def make_inputs(case: Case, device: str, requires_grad: bool) -> Inputs:
    """Features ~N(0, 1) (standardised, as scikit-learn users feed kernels; RBF's γ = 1/d then
    gives kernel values around e^-2), weights β_m in [0.5, 1.5] / M."""
    draw = Draw(device, case.torch_dtype, requires_grad)
    xs_a = [draw.normal(case.n, d) for d in case.dims]
    xs_b = [draw.normal(case.n_b, d) for d in case.dims]
    m = len(case.dims)
    beta = ((draw.uniform(m, bound=0.5, leaf=False) + 1.0) / m).requires_grad_(requires_grad)
    grad_out = draw.normal(case.n, case.n_b, leaf=False)
    kernels = [KERNELS[k] for k in case.kernels]
    return Inputs((xs_a, xs_b, beta, kernels), [*xs_a, *xs_b, beta], grad_out)


def _fused(xs_a: list[Tensor], xs_b: list[Tensor], beta: Tensor, kernels: list[KernelSpec]) -> Tensor:
    return fusionops.multiple_kernel(xs_a, xs_b, beta, kernels)


def sklearn_pairwise(
    xs_a: Sequence[Tensor], xs_b: Sequence[Tensor], beta: Tensor, kernels: Sequence[KernelSpec]
) -> Tensor:
    """K as a scikit-learn user computes it on CPU: per modality ``rbf_kernel`` (γ = 1/d_m),
    ``polynomial_kernel(gamma=1, coef0=c)`` (so ``(a·b + c)^p``) or ``linear_kernel`` on numpy
    arrays, summed with the β weights. Forward only (numpy: no autograd); CPU float32/float64."""
    from sklearn.metrics import pairwise

    total = None
    weights = beta.detach().cpu().numpy()
    for a, b, w, k in zip(xs_a, xs_b, weights, as_base_kernels("sklearn", kernels, len(xs_a)), strict=True):
        a_np, b_np = a.detach().cpu().numpy(), b.detach().cpu().numpy()
        if k.kind == "rbf":
            gram = pairwise.rbf_kernel(a_np, b_np, gamma=float(k.param(a_np.shape[1])))
        elif k.kind == "polynomial":
            gram = pairwise.polynomial_kernel(a_np, b_np, degree=k.degree, gamma=1.0, coef0=float(k.offset))
        else:
            gram = pairwise.linear_kernel(a_np, b_np)
        gram *= w
        total = gram if total is None else total + gram
    assert total is not None, "xs_a must hold at least one modality"
    return torch.from_numpy(total)


def _sklearn_unavailable(device: str, dtype: str) -> list[str]:
    """Why the ``sklearn`` way cannot run on ``device``/``dtype`` (empty: it can)."""
    reasons = []
    if not device.startswith("cpu"):
        reasons.append("scikit-learn computes on CPU numpy arrays only (a CPU peer; not timed on CUDA)")
    if dtype not in ("fp32", "fp64"):
        reasons.append(f"scikit-learn's pairwise kernels take float32/float64, not {dtype}")
    if importlib.util.find_spec("sklearn") is None:
        reasons.append("scikit-learn is not installed (pip install scikit-learn)")
    return reasons


def _sweep(
    prefix: str, ns: tuple[int, ...], mix: str, dims: tuple[int, ...] = (128, 64, 300), dtype: str = "fp32"
) -> list[Case]:
    return [Case(f"{prefix}-{mix}-n{n}", n, n, dims, MIXES[mix], dtype) for n in ns]


HEADLINE = {
    "cpu": [Case(f"headline-cpu-{mix}", 4096, 4096, (128, 64, 300), MIXES[mix]) for mix in MIXES],
    "cuda": [
        Case(f"headline-gpu-{mix}-{dtype}", 32768, 32768, (128, 64, 300), MIXES[mix], dtype)
        for dtype in ("bf16", "fp32")
        for mix in MIXES
    ],
}

GRIDS = {
    "cpu": {
        "quick": _sweep("mkl", (128, 512), "mixed"),
        # The headline's shapes (--full adds N=4096 to both sweeps).
        "default": _sweep("mkl", (512, 1024, 2048), "mixed") + _sweep("mkl", (512, 1024, 2048), "rbf"),
    },
    "cuda": {
        "quick": _sweep("gpu", (4096, 16384), "mixed", dtype="bf16"),
        # The headline's shapes (--full adds N=32768 to these sweeps).
        "default": [
            c
            for dtype in ("bf16", "fp32")
            for mix in MIXES
            for c in _sweep("gpu", (4096, 8192, 16384), mix, dtype=dtype)
        ],
    },
}

PYTEST_CASES = [
    Case("mixed-n64", 64, 64, (8, 4, 16), MIXES["mixed"]),
    Case("rbf2-n48x80", 48, 80, (16, 8), ("rbf", "rbf")),
]

CROSSOVER = [
    Case(f"x{'x'.join(map(str, dims))}-{mix}-n{n}", n, n, dims, MIXES[mix])
    for dims in ((16, 8, 32), (128, 64, 300))
    for mix in MIXES
    for n in (8, 32, 128, 256, 384, 512, 1024)
]


def _goal_lines(rows: list[Row], case: Case, gpu: bool, skipped: Mapping[str, str]) -> list[str]:
    if line := g.not_run(SPEC.name, case.name, rows):
        return [line]
    lines = [f"{SPEC.name} headline goal ({case.name}, fwd+bwd):"]
    wanted = ["fused[triton]", "fused[cuda]"] if gpu else ["fused[cpu]"]
    fused, why = g.best_fused(rows, case.name, wanted, skipped)
    if fused is None:
        return lines + [f"  FAIL: no fused way ran ({why})"]
    ref = g.find(rows, case.name, "reference")
    # Why the reference did not run, e.g. out of memory at the GPU headline in fp32 (about
    # 8-11 K-sized buffers, 4.3 GB each at 32768²).
    why = skipped.get("reference") or next(
        (str(r["error"]) for r in rows if r["case"] == case.name and r["way"] == "reference" and r["error"]),
        "",
    )
    lines.append("  " + g.speedup_line(fused, ref, "reference", SPEEDUP_GOAL, why))
    m_f, m_r = g.peak(fused), g.peak(ref) if ref else None
    if ref is None:
        lines.append(f"  memory FAIL: reference did not run ({why or 'failed'}), no verdict")
    elif m_f is None or m_r is None:
        lines.append("  memory: not measured (run without --no-memory)")
    else:
        ratio = m_r / max(m_f, 1e-9)
        lines.append(
            f"  memory {g.verdict(ratio >= MEMORY_GOAL)}: {fused['way']} peak extra {m_f:.1f} MB, "
            f"reference {m_r:.1f} MB ({ratio:.1f}x less, need >= {MEMORY_GOAL:g}x)"
        )
    comp = g.find(rows, case.name, "compile(reference)")
    lines.append("  " + g.speedup_line(fused, comp, "compile(reference)", None))
    peers = ["reference"] if gpu else ["reference", "sklearn"]  # sklearn: CPU only, forward only
    for peer in peers:
        if line := g.mode_speedup_line(rows, case.name, str(fused["way"]), peer, "forward", skipped):
            lines.append("  " + line)
    peaks = [
        f"{r['way']} {p:.1f}"
        for w in (fused["way"], "reference", "compile(reference)")
        if (r := g.find(rows, case.name, str(w))) and (p := g.peak(r)) is not None
    ]
    if peaks:
        lines.append(
            f"  peak extra MB: {', '.join(peaks)} (out_mb {case.out_bytes / 1e6:.1f}, "
            f"K {case.k_bytes / 1e6:.1f}, M Gram matrices {case.gram_bytes / 1e6:.1f})"
        )
    return lines


def check_goals(rows: list[Row], device: str, skipped: Mapping[str, str]) -> list[str]:
    """PASS/FAIL lines for the headline goals of ``device`` (every mix, and on GPU every dtype)."""
    gpu = device.startswith("cuda")
    cases = HEADLINE["cuda" if gpu else "cpu"]
    return [line for case in cases for line in _goal_lines(rows, case, gpu, skipped)]


SPEC = OpSpec(
    name="multiple_kernel",
    title="multiple kernel fusion",
    case_type=Case,
    fused=_fused,
    baselines=(
        Baseline("reference", "reference", lambda: reference.multiple_kernel),
        Baseline("compile(reference)", "compile", lambda: compiled(reference.multiple_kernel), compiled=True),
        Baseline(
            "sklearn",
            "sklearn",
            lambda: sklearn_pairwise,
            modes=("forward",),
            unavailable=_sklearn_unavailable,
        ),
    ),
    make_inputs=make_inputs,
    probe_case=lambda dtype: Case("probe", 3, 4, (2, 3, 2), MIXES["mixed"], dtype),
    grids=GRIDS,
    headline=HEADLINE,
    pytest_cases=PYTEST_CASES,
    goals=check_goals,
    crossover_cases=CROSSOVER,
    crossover_metric="Na*Nb",
    table_column=("grams MB", "gram_mb", "bytes of the M Gram matrices (N_a, N_b)"),
)
