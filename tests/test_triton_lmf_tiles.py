"""Low-rank fusion's Triton kernels at the tiles the CUDA launcher picks at the GPU headline
(issue 17), run by the interpreter against fusionops.reference.

At the headline (N=8192, dims (256, 256, 256), R=16, O=256, 16-bit) the launcher takes the
resident kernels (``_lmf_{fwd,bwd}_resident_kernel``): every z_m tile of 128 rows stays in shared
memory over the ranks, full-width dots (P = 256) on 128 x 64 tiles, 8 warps, num_stages=1
(tools/triton_static.py: wgmma on sm_90, no spills, 224 KiB of shared memory). Nothing of that
runs on a GPU here, so this file makes the launcher choose as on an H100/H200 (``_target_programs``
= 2 x 132 SMs, what tools/triton_static.py sets, and a block's 227 KiB of shared memory) and runs
those exact blocks (BLOCK_N=128, BLOCK_O=64, P=256) under the interpreter at small shapes: odd
rows (one partial row tile, or a full and a partial one), odd widths padded to P, O=70 (a full
and a partial output block). The launches are recorded, so a change of the choice fails here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import skip_unless_usable
from inputs import make_factors, make_grad, make_mask, make_xs
from test_low_rank_fusion_kernels import check_against_reference
from test_nonfinite import assert_same_nonfinite

import fusionops
from fusionops.registry import OPS
from fusionops.triton import low_rank_fusion as lmf

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

CUDA_PROGRAMS = 2 * 132  # _target_programs on an H100/H200, as tools/triton_static.py sets it
H100_SMEM = 227 * 1024  # shared memory a block may opt into on sm_90
A100_SMEM = 163 * 1024  # and on sm_80
# The GPU headline (benchmarks/ops/low_rank_fusion.py HEADLINE["cuda"]): N, dims, R, O.
HEADLINE = (8192, (256, 256, 256), 16, 256)
RESIDENT = lmf._Tiles(True, 128, 64, 256, 8, num_stages=1)
# The small problem run here: widths padded to P = 256 like the headline's, two output blocks.
DIMS, RANK, OUT = (256, 37, 130), 3, 70


class _Recorder:
    """Stands in for a kernel: records each launch's blocks and options, then launches."""

    def __init__(self, name: str, kernel, seen: list[tuple[str, dict[str, int]]]) -> None:
        self.name, self.kernel, self.seen = name, kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            keys = ("BLOCK_N", "BLOCK_O", "BLOCK_K", "P", "num_warps", "num_stages")
            self.seen.append((self.name, {k: v for k, v in kwargs.items() if k in keys}))
            return launch(*args, **kwargs)

        return call


def _as_h100(monkeypatch) -> None:
    monkeypatch.setattr(lmf, "_target_programs", lambda device: CUDA_PROGRAMS)
    monkeypatch.setattr(lmf, "_smem_per_block", lambda device: H100_SMEM)


@pytest.fixture
def cuda_tiles(monkeypatch) -> list[tuple[str, dict[str, int]]]:
    """The launcher chooses as on an H100/H200; returns every recorded (kernel, blocks)."""
    skip_unless_usable("triton", "cpu", op=OPS["low_rank_fusion"])
    _as_h100(monkeypatch)
    seen: list[tuple[str, dict[str, int]]] = []
    for name in (
        "_lmf_fwd_kernel",
        "_lmf_bwd_kernel",
        "_lmf_fwd_resident_kernel",
        "_lmf_bwd_resident_kernel",
    ):
        monkeypatch.setattr(lmf, name, _Recorder(name, getattr(lmf, name), seen))
    return seen


def assert_resident(seen: list[tuple[str, dict[str, int]]], p: int = 256) -> None:
    """Every launch, forward and backward, was a resident kernel at the headline's blocks (P as
    given)."""
    want = dataclasses.replace(RESIDENT, block_k=p).launch()
    names = {name for name, _ in seen}
    assert names == {"_lmf_fwd_resident_kernel", "_lmf_bwd_resident_kernel"}, names
    for name, blocks in seen:
        assert blocks == want, (name, blocks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_headline_tiles(monkeypatch, dtype):
    """16-bit: the resident kernels at 128 x 64, P = 256, 8 warps (two wgmma warpgroups of 64
    rows), their shared memory within sm_90's; float32 stays on the streamed kernels."""
    _as_h100(monkeypatch)
    n, dims, _, o = HEADLINE
    cuda = torch.device("cuda")
    fwd, bwd = lmf._tiles("fwd", n, o, dims, dtype, cuda), lmf._tiles("bwd", n, o, dims, dtype, cuda)
    if dtype == torch.float32:
        assert not fwd.resident and not bwd.resident
        assert (fwd.block_n, fwd.block_o, bwd.block_n, bwd.block_o) == (64, 64, 64, 64)
        return
    assert fwd == bwd == RESIDENT
    assert lmf._resident_smem(len(dims), 256, dtype) == 224 * 1024 <= H100_SMEM
    # Where the z tiles do not fit (sm_80's 163 KiB, or wider modalities): streamed.
    monkeypatch.setattr(lmf, "_smem_per_block", lambda device: A100_SMEM)
    assert not lmf._tiles("fwd", n, o, dims, dtype, cuda).resident
    _as_h100(monkeypatch)
    for kind in ("fwd", "bwd"):  # a modality wider than 256: the F tile in flight would spill
        assert not lmf._tiles(kind, n, o, (256, 300, 256), dtype, cuda).resident
    # Four modalities: a resident forward, a streamed backward (M + 1 tiles would spill).
    assert lmf._tiles("fwd", n, o, (128,) * 4, dtype, cuda).resident
    assert not lmf._tiles("bwd", n, o, (128,) * 4, dtype, cuda).resident


def test_resident_kernels_keep_rank_runtime():
    """R is never specialized: at R = 1 Triton would fold the select that keeps one F buffer in
    shared memory (256 KiB at the headline widths instead of 224, over sm_90's 227;
    tools/triton_static.py compiles R = 16 only)."""
    for kernel in (lmf._lmf_fwd_resident_kernel, lmf._lmf_bwd_resident_kernel):
        # A JITFunction, or under the interpreter an InterpretedFunction holding the jit options.
        options = getattr(kernel, "kwargs", None) or {"do_not_specialize": kernel.do_not_specialize}
        assert "R" in options["do_not_specialize"]


def test_interpreter_default_is_streamed():
    """On CPU tensors (the interpreter) nothing is resident unless a test forces the GPU choice."""
    assert lmf._smem_per_block(torch.device("cpu")) == 0
    assert not lmf._tiles("fwd", 17, OUT, DIMS, torch.bfloat16, torch.device("cpu")).resident


# (N, bias, masked): one partial row tile; a full and a partial one, no bias, with a mask.
CASES = [(17, True, False), (130, False, True)]


@pytest.mark.parametrize(("n", "with_bias", "masked"), CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_reference_at_headline_tiles(monkeypatch, cuda_tiles, dtype, n, with_bias, masked):
    """Forward and every gradient at the headline's blocks against the float64 reference. float32
    is not the launcher's choice there: forced, to hold the kernels' arithmetic to 1e-5."""
    skip_unless_usable("triton", "cpu", dtype, op=OPS["low_rank_fusion"])
    if dtype == torch.float32:
        monkeypatch.setattr(lmf, "_tiles", lambda *a: RESIDENT)
    xs = make_xs((n,), DIMS, dtype, "cpu", seed=n)
    factors, w, b = make_factors(DIMS, RANK, OUT, dtype, "cpu")
    mask = make_mask((n,), len(DIMS)) if masked else None
    check_against_reference("triton", xs, factors, w, b if with_bias else None, mask, dtype)
    assert_resident(cuda_tiles)


@pytest.mark.parametrize("dims", [(200,), (64, 9), (16, 3, 5, 11)], ids=str)
def test_other_modality_counts(cuda_tiles, dims):
    """M = 1, 2 and 4 (P = 256, 64, 16: the widest modality's width, a power of two); at M = 4
    only the forward is resident (the backward's M + 1 tiles would spill), beside a streamed
    backward."""
    xs = make_xs((19,), dims, torch.bfloat16, "cpu")
    factors, w, b = make_factors(dims, 2, 33, torch.bfloat16, "cpu")
    check_against_reference("triton", xs, factors, w, b, None, torch.bfloat16)
    p = max(16, 1 << (max(dims) - 1).bit_length())
    if len(dims) <= 3:
        assert_resident(cuda_tiles, p=p)
    else:
        assert {name for name, _ in cuda_tiles} == {"_lmf_fwd_resident_kernel", "_lmf_bwd_kernel"}
        fwd = [blocks for name, blocks in cuda_tiles if name == "_lmf_fwd_resident_kernel"]
        assert fwd == [dataclasses.replace(RESIDENT, block_k=p).launch()]


@pytest.mark.parametrize(
    ("layout", "factor_layout", "grad_layout"),
    [("transposed", "permuted", "broadcast"), ("broadcast", "broadcast", "contiguous")],
)
def test_strided_inputs_at_headline_tiles(cuda_tiles, layout, factor_layout, grad_layout):
    """Transposed and stride-0 inputs, permuted and stride-0 factors, a stride-0 gradient."""
    xs = make_xs((17,), DIMS, torch.bfloat16, "cpu", layout)
    factors, w, b = make_factors(DIMS, RANK, OUT, torch.bfloat16, "cpu", factor_layout)
    check_against_reference("triton", xs, factors, w, b, None, torch.bfloat16, grad_layout)
    assert_resident(cuda_tiles)


def test_empty_batch_at_headline_tiles(cuda_tiles):
    """N = 0: shapes and zero gradients, no launch."""
    xs = make_xs((0,), DIMS, torch.bfloat16, "cpu")
    factors, w, b = make_factors(DIMS, RANK, OUT, torch.bfloat16, "cpu")
    check_against_reference("triton", xs, factors, w, b, None, torch.bfloat16)
    assert cuda_tiles == []


# (leaf, index, value): an inf in the last row (row tile padding below it) of the widest
# modality; a NaN in a factor's column of the partial output block (64 … 69); a -inf in a
# factor's constant row (F_m[r, 0]); a NaN in the rank weights.
NONFINITE = [
    ("x0", (16, 200), float("inf")),
    ("f1", (2, 5, 66), float("nan")),
    ("f2", (1, 0, 3), -float("inf")),
    ("w", (1,), float("nan")),
]


def _call(backend: str, leaves: dict[str, torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    """Output and every gradient of a fresh copy of ``leaves``."""
    args = {k: t.detach().clone().requires_grad_(True) for k, t in leaves.items()}
    xs, fs = [args[f"x{m}"] for m in range(3)], [args[f"f{m}"] for m in range(3)]
    with fusionops.backend(backend):
        out = fusionops.low_rank_fusion(xs, fs, args["w"], args["b"])
    return [out.detach(), *torch.autograd.grad(out, list(args.values()), g)]


@pytest.mark.parametrize(("leaf", "index", "value"), NONFINITE, ids=str)
def test_nonfinite_at_headline_tiles(cuda_tiles, leaf, index, value):
    """NaN and ±inf exactly where the reference (same dtype) has them, forward and gradients;
    the finite elements within TOL, relative to the largest of the clean call's."""
    dtype = torch.float32
    xs = make_xs((17,), DIMS, dtype, "cpu", seed=5)
    factors, w, b = make_factors(DIMS, RANK, OUT, dtype, "cpu")
    clean = {
        **{f"x{m}": x.detach() for m, x in enumerate(xs)},
        **{f"f{m}": f.detach() for m, f in enumerate(factors)},
    }
    clean.update(w=w.detach(), b=b.detach())
    dirty = {k: t.clone() for k, t in clean.items()}
    dirty[leaf][index] = value
    g = make_grad((17, OUT), dtype, "cpu")
    with pytest.MonkeyPatch.context() as mp:  # the float32 call at the resident tiles
        mp.setattr(lmf, "_tiles", lambda *a: RESIDENT)
        got = _call("triton", dirty, g)
    want = _call("reference", dirty, g)
    scales = [t.abs().max().item() for t in _call("reference", clean, g)]
    assert_resident(cuda_tiles)
    assert any(not torch.isfinite(t).all() for t in want), "the injected value reached nothing"
    for name, a, e, scale in zip(("out", *clean), got, want, scales, strict=True):
        assert_same_nonfinite(a, e, dtype, f"{name} ({leaf}{list(index)} = {value})", scale)


@pytest.mark.parametrize("refused", ["_launch_forward", "_launch_backward"])
def test_resident_refused_falls_back_to_streamed(monkeypatch, cuda_tiles, refused):
    """A resident launch that runs out of shared memory or registers (another Triton may lay the
    one F buffer out differently) warns once and the call, and every later one, runs streamed,
    with the reference's result; a streamed launch's OutOfResources is not swallowed."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(lmf, "_resident_refused", False)
    real = getattr(lmf, refused)

    def no_room(kernel, tiles, *args, **kwargs):
        if tiles.resident:
            raise OutOfResources(229376, 232448, "shared memory")
        return real(kernel, tiles, *args, **kwargs)

    monkeypatch.setattr(lmf, refused, no_room)
    xs = make_xs((17,), DIMS, torch.bfloat16, "cpu")
    factors, w, b = make_factors(DIMS, RANK, OUT, torch.bfloat16, "cpu")
    with pytest.warns(RuntimeWarning, match="resident-z kernels do not fit"):
        check_against_reference("triton", xs, factors, w, b, None, torch.bfloat16)
    assert lmf._resident_refused
    names = [name for name, _ in cuda_tiles]
    stage = "fwd" if refused == "_launch_forward" else "bwd"
    assert f"_lmf_{stage}_kernel" in names  # the streamed kernel served the refused stage
    assert not lmf._tiles(stage, 17, OUT, DIMS, torch.bfloat16, torch.device("cpu")).resident

    def never(kernel, tiles, *args, **kwargs):
        raise OutOfResources(1, 0, "registers")

    monkeypatch.setattr(lmf, refused, never)
    with pytest.raises(OutOfResources):
        check_against_reference("triton", xs, factors, w, b, None, torch.bfloat16)
