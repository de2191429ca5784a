"""Sparse skew-pair attention (SSFN): ``out[n, p] = ha[n, i_p] + attn(q_i, band of hb around j_p)``.

Ways: ``fused[<backend>]`` (``fusionops.skew_pair_attention``: every pair in one call,
projecting each touched layer once, no per-pair intermediates), ``reference``
(``fusionops.reference.skew_pair_attention``: a per-pair, per-head loop of torch ops — the
baseline the issue's goals name), ``compile(reference)``, and ``per-pair-mha``: the peers'
way, one ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` runs) per pair,
batch-first with the band as the key sequence — SSFN's ``CoAttention`` attention, computed per
sample (their code feeds the batch as the sequence; DESIGN.md section 4).

Model FLOPs (the work the output needs, each touched layer projected once): forward
``2·N·D²·(|I| + 2·|J| + P)`` with ``I`` the distinct A layers and ``J`` the distinct B layers in
the bands; at window 0 the softmax is 1, so q and k are not needed: ``2·N·D²·(|J| + P)``.
Backward twice that. The attention itself (band × D per pair) is left out.

Goals (issue 4): N=256, La=Lb=12, D=768, P=5 (skew +7, density 5/12), heads=8, windows 0 and 2,
fwd+bwd against the reference: CPU (fp32) no slower; GPU (bf16) at least 3x faster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fusionops
from benchmarks import goals as g
from benchmarks.spec import Baseline, CaseBase, Draw, Inputs, OpSpec, Row, mb, per_mode
from benchmarks.ways import compiled
from fusionops import reference

Pairs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Case(CaseBase):
    """One skew-pair problem: stacks ``(N, La, D)`` and ``(N, Lb, D)``, pairs from
    ``skew_pairs(la, lb, skew, density)``, ``heads``, band half-width ``window``."""

    name: str
    n: int
    la: int
    lb: int
    d: int
    skew: int
    density: float
    heads: int
    window: int
    dtype: str = "fp32"

    @property
    def pairs(self) -> Pairs:
        table = fusionops.skew_pairs(self.la, self.lb, self.skew, self.density).tolist()
        return tuple((i, j) for i, j in table)

    def _layers(self) -> tuple[int, int]:
        """Distinct A layers queried and distinct B layers inside the bands."""
        band = {
            jj
            for _, j in self.pairs
            for jj in range(j - self.window, j + self.window + 1)
            if 0 <= jj < self.lb
        }
        return len({i for i, _ in self.pairs}), len(band)

    def flops(self, mode: str) -> int:
        n_i, n_j = self._layers()
        layers = n_j + len(self.pairs) if self.window == 0 else n_i + 2 * n_j + len(self.pairs)
        return per_mode(2 * self.n * self.d * self.d * layers)[mode]

    @property
    def out_bytes(self) -> int:
        """Bytes any fwd+bwd must allocate: out (N, P, D), dha, dhb, four (D, D) and four (D,)."""
        elems = self.n * self.d * (len(self.pairs) + self.la + self.lb) + 4 * self.d * (self.d + 1)
        return elems * self.itemsize

    @property
    def sweep(self) -> str:
        return (
            f"L={self.la}x{self.lb} D={self.d} s={self.skew:+d} P={len(self.pairs)} h={self.heads} "
            f"w={self.window} {self.dtype}"
        )

    def columns(self) -> dict[str, object]:
        return {
            "la": self.la,
            "lb": self.lb,
            "d": self.d,
            "pairs": len(self.pairs),
            "heads": self.heads,
            "window": self.window,
            "dtype": self.dtype,
            "out_mb": mb(self.out_bytes),
        }

    def describe(self) -> str:
        return (
            f"N={self.n} La={self.la} Lb={self.lb} D={self.d} pairs={list(self.pairs)} heads={self.heads} "
            f"window={self.window} {self.dtype}"
        )

    @property
    def crossover_elements(self) -> int:
        return self.n * len(self.pairs) * self.d  # fusionops.ops.skew_pair._order's rule


def make_inputs(case: Case, device: str, requires_grad: bool) -> Inputs:
    """Random stacks ~N(0, 1), weights scaled like nn.Linear's, small biases."""
    draw = Draw(device, case.torch_dtype, requires_grad)
    ha = draw.normal(case.n, case.la, case.d)
    hb = draw.normal(case.n, case.lb, case.d)
    ws = [draw.normal(case.d, case.d, std=case.d**-0.5) for _ in range(4)]
    bs = [draw.uniform(case.d, bound=0.1) for _ in range(4)]
    grad_out = draw.normal(case.n, len(case.pairs), case.d, leaf=False)
    return Inputs((ha, hb, case.pairs, *ws, *bs, case.heads, case.window), [ha, hb, *ws, *bs], grad_out)


def _fused(ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window) -> Tensor:
    return fusionops.skew_pair_attention(
        ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads=heads, window=window
    )


def _reference(ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads, window) -> Tensor:
    return reference.skew_pair_attention(
        ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads=heads, window=window
    )


def per_pair_mha(ha, hb, pairs: Pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads: int, window: int) -> Tensor:
    """One ``F.multi_head_attention_forward`` per pair (what ``nn.MultiheadAttention`` with
    packed in-projection runs), the query a one-token sequence per sample, the band the keys,
    plus the residual: the peers' way, written out in our own words."""
    in_w, in_b = torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])
    outs = []
    for i, j in pairs:
        band = hb[:, max(0, j - window) : j + window + 1].transpose(0, 1)  # (|J|, N, D)
        q = ha[:, i].unsqueeze(0)  # (1, N, D)
        attn, _ = F.multi_head_attention_forward(
            q, band, band, ha.shape[2], heads, in_w, in_b, None, None, False, 0.0, wo, bo,
            training=False, need_weights=False,
        )  # fmt: skip
        outs.append(ha[:, i] + attn[0])
    return torch.stack(outs, dim=1)


def _sweep(prefix: str, ns: tuple[int, ...], d: int, window: int, dtype: str = "fp32") -> list[Case]:
    return [Case(f"{prefix}-w{window}-n{n}", n, 12, 12, d, 7, 5 / 12, 8, window, dtype) for n in ns]


HEADLINE = {
    "cpu": [Case(f"headline-cpu-w{w}", 256, 12, 12, 768, 7, 5 / 12, 8, w) for w in (0, 2)],
    "cuda": [Case(f"headline-gpu-w{w}", 256, 12, 12, 768, 7, 5 / 12, 8, w, "bf16") for w in (0, 2)],
}

GRIDS = {
    "cpu": {
        # One case: compiling the reference's per-pair, per-head loop takes most of the time.
        "quick": _sweep("d256", (256,), 256, 2),
        "default": _sweep("bert", (64, 1024), 768, 0) + _sweep("bert", (64, 1024), 768, 2),
    },
    "cuda": {
        "quick": _sweep("bert", (256, 4096), 768, 2, "bf16"),
        "default": _sweep("bert", (256, 4096, 32768), 768, 0, "bf16")
        + _sweep("bert", (256, 4096, 32768), 768, 2, "bf16"),
    },
}

PYTEST_CASES = [
    Case("d64-w0-n64", 64, 12, 12, 64, 7, 5 / 12, 4, 0),
    Case("d64-w2-n64", 64, 12, 12, 64, 7, 5 / 12, 4, 2),
]

CROSSOVER = [
    Case(f"x-d{d}-w{w}-n{n}", n, 12, 12, d, 7, 5 / 12, 4, w)
    for d in (64, 256, 768)
    for w in (0, 2)
    for n in (4, 16, 64, 256)
]


def check_goals(rows: list[Row], device: str, skipped: Mapping[str, str]) -> list[str]:
    """PASS/FAIL lines for the headline goals of ``device`` (windows 0 and 2)."""
    gpu = device.startswith("cuda")
    lines = []
    for case in HEADLINE["cuda" if gpu else "cpu"]:
        if line := g.not_run(SPEC.name, case.name, rows):
            lines.append(line)
            continue
        lines.append(f"{SPEC.name} headline goal ({case.name}, fwd+bwd):")
        wanted = ["fused[triton]", "fused[cuda]"] if gpu else ["fused[cpu]"]
        fused, why = g.best_fused(rows, case.name, wanted, skipped)
        if fused is None:
            lines.append(f"  FAIL: no fused way ran ({why})")
            continue
        ref = g.find(rows, case.name, "reference")
        if gpu:
            lines.append("  " + g.speedup_line(fused, ref, "reference", 3.0, skipped.get("reference", "")))
        elif ref is None:
            lines.append(f"  FAIL: reference did not run ({skipped.get('reference', 'failed')}), no verdict")
        else:
            lines.append("  " + g.no_slower_line(fused, ref, "reference"))
        for name in ("compile(reference)", "per-pair-mha"):
            lines.append("  " + g.speedup_line(fused, g.find(rows, case.name, name), name, None))
        peaks = [
            f"{r['way']} {p:.1f}"
            for w in (fused["way"], "reference", "compile(reference)", "per-pair-mha")
            if (r := g.find(rows, case.name, str(w))) and (p := g.peak(r)) is not None
        ]
        if peaks:
            lines.append(f"  peak extra MB: {', '.join(peaks)} (out_mb {case.out_bytes / 1e6:.1f})")
    return lines


SPEC = OpSpec(
    name="skew_pair_attention",
    title="skew-pair attention",
    case_type=Case,
    fused=_fused,
    baselines=(
        Baseline("reference", "reference", lambda: _reference),
        Baseline("compile(reference)", "compile", lambda: compiled(_reference), compiled=True),
        Baseline("per-pair-mha", "mha", lambda: per_pair_mha),
    ),
    make_inputs=make_inputs,
    probe_case=lambda dtype: Case("probe", 3, 3, 3, 4, 0, 1.0, 2, 1, dtype),
    grids=GRIDS,
    headline=HEADLINE,
    pytest_cases=PYTEST_CASES,
    goals=check_goals,
    crossover_cases=CROSSOVER,
    crossover_metric="N*P*D",
)
