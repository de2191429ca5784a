"""Skew-pair attention's Triton kernels at the tiles the CUDA launcher picks at the GPU headline
(issue 17), run by the interpreter against fusionops.reference.

On sm_90 their 16-bit dots compile to wgmma (tools/triton_static.py) because every tile is
transposed: a dot is ``(64 columns, K) @ (K, BLOCK_N rows)``, the columns (a head's BLOCK_C chunk,
or BLOCK_O output columns) in Triton's M dimension, which must be 64 for wgmma, the few rows in
N. Nothing of that runs on a GPU here, so this file runs the launcher's CUDA choice itself:
``_target_programs`` as on an H100/H200 (2 x 132 SMs, what tools/triton_static.py sets) and a
head dim of 96 (the headline's 768 / 8), so the interpreter takes the headline's blocks exactly
(BLOCK_N=16, BLOCK_C=64 with 96 in a full and a half-masked chunk, BLOCK_K=32, BLOCK_O=64,
BLOCK_W=1 or 8), at D = 192 (two heads) instead of 768 and 17 rows (a full row tile and one of
a single row). The launches are recorded, so a change of the launcher's choice fails here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, skip_unless_usable
from inputs import make_grad, make_skew_pair_inputs
from test_nonfinite import assert_same_nonfinite
from test_skew_pair_kernels import check_against_reference

import fusionops
from fusionops.ops.skew_pair import GRAD_NAMES
from fusionops.registry import OPS
from fusionops.triton import skew_pair

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:All-NaN slice encountered:RuntimeWarning",
)

CUDA_PROGRAMS = 2 * 132  # _target_programs on an H100/H200, as tools/triton_static.py sets it
# The GPU headline (benchmarks/ops/skew_pair.py HEADLINE["cuda"]): N, La = Lb, D, P, heads.
HEADLINE = (256, 12, 768, 5, 8)
# The small problem run here: odd rows, head dim 96 like the headline's, bands at both ends.
N, L, D, HEADS = 17, 6, 192, 2
PAIRS = [(3, 0), (0, 5), (2, 2)]


def headline_tiles(kind: str, window: int, dtype: torch.dtype) -> dict[str, int]:
    """What the launcher picks at the headline (with ``_target_programs`` patched as for CUDA)."""
    n, lb, d, p, heads = HEADLINE
    return skew_pair._tiles(kind, n, d, heads, p, lb, window, dtype, torch.device("cuda"))


class _Recorder:
    """Stands in for a kernel: records each launch's block sizes and num_warps, then launches."""

    def __init__(self, kernel, seen: list[dict[str, int]]) -> None:
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.seen.append({k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k == "num_warps"})
            return launch(*args, **kwargs)

        return call


@pytest.fixture
def cuda_tiles(monkeypatch) -> dict[str, list[dict[str, int]]]:
    """The launcher chooses as for an H100/H200; returns the recorded forward/backward launches."""
    skip_unless_usable("triton", "cpu", op=OPS["skew_pair_attention"])
    monkeypatch.setattr(skew_pair, "_target_programs", lambda device: CUDA_PROGRAMS)
    seen: dict[str, list[dict[str, int]]] = {"fwd": [], "bwd": []}
    monkeypatch.setattr(skew_pair, "_skew_fwd_kernel", _Recorder(skew_pair._skew_fwd_kernel, seen["fwd"]))
    monkeypatch.setattr(skew_pair, "_skew_bwd_kernel", _Recorder(skew_pair._skew_bwd_kernel, seen["bwd"]))
    return seen


def assert_headline_tiles(seen: dict[str, list[dict[str, int]]], window: int, dtype: torch.dtype) -> None:
    for kind in ("fwd", "bwd"):
        assert seen[kind], f"no {kind} launch recorded"
        for tiles in seen[kind]:
            assert tiles == headline_tiles(kind, window, dtype), (kind, tiles)


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_headline_tiles_are_wgmma_shaped(monkeypatch, dtype, window):
    """At the headline every dot's M (BLOCK_C, BLOCK_O) is 64 and num_warps a multiple of 4, what
    Triton needs for wgmma; the head dim 96 is taken in 64-column chunks (not one of 128)."""
    monkeypatch.setattr(skew_pair, "_target_programs", lambda device: CUDA_PROGRAMS)
    fwd, bwd = headline_tiles("fwd", window, dtype), headline_tiles("bwd", window, dtype)
    half = dtype != torch.float32
    band = 1 if window == 0 else 8
    common = {"BLOCK_N": 16, "BLOCK_C": 64, "BLOCK_W": band, "num_warps": 8}
    assert fwd == {**common, "BLOCK_K": 32, "BLOCK_O": 64}
    assert bwd == {**common, "BLOCK_K": 32 if half else 16}
    for tiles in (fwd, bwd):
        assert tiles["BLOCK_C"] >= 64 and tiles.get("BLOCK_O", 64) >= 64 and tiles["num_warps"] % 4 == 0


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_reference_at_headline_tiles(cuda_tiles, dtype, window):
    """Forward and every gradient at the headline's blocks against the float64 reference."""
    skip_unless_usable("triton", "cpu", dtype, op=OPS["skew_pair_attention"])
    ha, hb, ws, bs = make_skew_pair_inputs(N, L, L, D, dtype, "cpu", seed=window)
    check_against_reference("triton", ha, hb, PAIRS, ws, bs, HEADS, window, dtype, "transposed")
    assert_headline_tiles(cuda_tiles, window, dtype)


def test_strided_inputs_at_headline_tiles(cuda_tiles):
    """Transposed stacks, stride-0 weights and a stride-0 upstream gradient, at the same blocks."""
    ha, hb, ws, bs = make_skew_pair_inputs(N, L, L, D, torch.float32, "cpu", "transposed", "broadcast")
    check_against_reference("triton", ha, hb, PAIRS, ws, bs, HEADS, 2, torch.float32, "broadcast")
    assert_headline_tiles(cuda_tiles, 2, torch.float32)


# (window, leaf, index, value): the one-key band's unproven path (an inf in ha reaches the score
# of its row; a NaN in wk at a column of the second head's half-masked chunk, 160 … 191), and,
# at window 2, a NaN in one row of a band layer of hb and a -inf in wq (first head).
NONFINITE = [
    (0, "ha", (4, 3, 7), float("inf")),
    (0, "wk", (170, 11), float("nan")),
    (2, "hb", (16, 1, 130), float("nan")),
    (2, "wq", (40, 3), -float("inf")),
]


def _call(backend: str, leaves: dict[str, torch.Tensor], g: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Output and every gradient of a fresh copy of ``leaves``."""
    args = [leaves[k].detach().clone().requires_grad_(True) for k in GRAD_NAMES]
    with fusionops.backend(backend):
        out = fusionops.skew_pair_attention(args[0], args[1], PAIRS, *args[2:], heads=HEADS, window=window)
    return [out.detach(), *torch.autograd.grad(out, args, g)]


@pytest.mark.parametrize(("window", "leaf", "index", "value"), NONFINITE)
def test_nonfinite_at_headline_tiles(cuda_tiles, window, leaf, index, value):
    """NaN and ±inf exactly where the reference (same dtype) has them, forward and gradients;
    the finite elements within TOL, relative to the largest of the clean call's."""
    dtype = torch.float32
    ha, hb, ws, bs = make_skew_pair_inputs(N, L, L, D, dtype, "cpu", seed=5)
    clean = {k: t.detach() for k, t in zip(GRAD_NAMES, (ha, hb, *ws, *bs), strict=True)}
    dirty = {k: t.clone() for k, t in clean.items()}
    dirty[leaf][index] = value
    g = make_grad((N, len(PAIRS), D), dtype, "cpu")
    got, want = _call("triton", dirty, g, window), _call("reference", dirty, g, window)
    scales = [t.abs().max().item() for t in _call("reference", clean, g, window)]
    assert_headline_tiles(cuda_tiles, window, dtype)
    assert any(not torch.isfinite(t).all() for t in want), "the injected value reached nothing"
    names = ("out", *GRAD_NAMES)
    for name, a, e, scale in zip(names, got, want, scales, strict=True):
        what = f"{name} ({leaf}{list(index)} = {value})"
        if name == "bk":  # where finite, rounding noise around 0 (test_skew_pair_kernels): bounded
            assert torch.equal(torch.isnan(a), torch.isnan(e)), what
            finite = a[torch.isfinite(e)]
            bound = TOL[dtype] * max(scales[names.index("wk")], 1.0)
            assert finite.numel() == 0 or finite.abs().max().item() <= bound, what
            continue
        assert_same_nonfinite(a, e, dtype, what, scale)
