"""The bilinear family's Triton launcher as it runs on a GPU (issue 20), by the interpreter.

On CUDA tensors ``fusionops.triton.bilinear._config`` takes tiles of up to 32 MB per projection
in equal tiles of a multiple of 128 rows, halves the pooling kernel's row block until a launch
has 2 CTAs per SM, and runs the 16-bit projection GEMMs in the input's dtype (the pooling kernel
reads 16-bit A and B and accumulates in float32). None of that happens on CPU tensors; here the
GPU's configuration is forced with a budget and a CTA target small enough that tiny shapes take
several tiles (a partial last one), halved row blocks and partial blocks, and every result is
checked against the float64 reference. The pooling launches are recorded (their grid, blocks
and the dtype of the A and B they read), so a test fails when the path it means to cover was
not taken; the forward kernel's output is poisoned (NaN-filled) before each launch.
"""

from __future__ import annotations

import types

import pytest
import torch
import triton
from bilinear_inputs import PARAM_LAYOUTS, check_against_reference, make_block_params, make_mfb_params
from conftest import skip_unless_usable
from inputs import make_grad, make_xs
from test_nonfinite import assert_same_nonfinite

import fusionops
from fusionops.registry import OPS
from fusionops.triton import bilinear as bil

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

HALF = (torch.bfloat16, torch.float16)
# The GPU's configuration at test scale: 8-row alignment, a budget of 16 rows of the MFB
# size's 16-bit projections, 8 CTAs per launch, row blocks halved down to 16 elements.
MFB_SIZE = (7, 5, 3, 5, 6)  # (d_x, d_t, k, o, O): P = 15
BLOCK_SIZE = (3, 2, 5, 7)  # (C, R, s, O): C·P = 30
FORCED = bil._Config(
    tile_bytes=16 * 15 * 2, min_rows=8, row_align=8, programs=8, min_block=16, half_gemms=True
)
N = 37  # odd: bf16 MFB takes tiles of 16, 16 and 5 rows


class _Recorder:
    """Stands in for a pooling kernel: records each launch (grid, blocks, dtype of A, and of
    the pooled or dp buffer), NaN-fills the forward's output first, then launches."""

    def __init__(self, kernel, seen: list[dict], poison: bool) -> None:
        self.kernel, self.seen, self.poison = kernel, seen, poison

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            a, third = args[0], args[2]
            self.seen.append(
                {"grid": grid, "rows": args[3], "a": a.dtype, "acc": third.dtype, "forward": self.poison,
                 **{k: kwargs[k] for k in ("BLOCK_T", "BLOCK_S", "num_warps")}}
            )  # fmt: skip
            if self.poison:
                third.fill_(float("nan"))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def gpu(monkeypatch) -> list[dict]:
    """The launcher configured as on a GPU (CPU tensors, the interpreter); the pooling launches."""
    skip_unless_usable("triton", "cpu", op=OPS["mfb"])
    monkeypatch.setattr(bil, "_config", lambda device: FORCED)
    seen: list[dict] = []
    monkeypatch.setattr(bil, "_pool_fwd_kernel", _Recorder(bil._pool_fwd_kernel, seen, True))
    monkeypatch.setattr(bil, "_pool_bwd_kernel", _Recorder(bil._pool_bwd_kernel, seen, False))
    return seen


def assert_gpu_launches(seen: list[dict], n: int, c: int, p: int, s: int, dtype: torch.dtype) -> None:
    """Forward and backward passes each took the forced GPU tiles: equal tiles of a multiple of
    8 rows (the last partial), 16-bit A and B for 16-bit inputs (else float32/64), pooled and dp
    in the accumulation dtype, and the grids _grid gives with the CTA target."""
    gd = dtype if dtype in HALF else (torch.float64 if dtype == torch.float64 else torch.float32)
    tile = bil._tile_rows(n, c, p, gd, FORCED)
    assert tile % 8 == 0 or tile == n
    rows = [min(tile, n - r0) for r0 in range(0, n, tile)]
    fwd = [launch for launch in seen if launch["forward"]]
    bwd = [launch for launch in seen if not launch["forward"]]
    assert bwd, "no backward launch"
    assert [launch["rows"] for launch in fwd] == rows * (len(fwd) // len(rows))  # forward, recomputed
    assert [launch["rows"] for launch in bwd] == rows
    for launch in seen:
        assert launch["a"] == gd, launch
        assert launch["acc"] == (torch.float64 if dtype == torch.float64 else torch.float32), launch
        grid, bt, bs, warps = bil._grid(launch["rows"], c, s, FORCED)
        assert (launch["grid"], launch["BLOCK_T"], launch["BLOCK_S"], launch["num_warps"]) == (
            grid,
            bt,
            bs,
            warps,
        )


# ---- the headline choice, pinned ----------------------------------------------------------


def _h100(monkeypatch) -> bil._Config:
    """_gpu_config of a cuda device with 132 SMs (no GPU here: the properties stand in)."""
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    return bil._gpu_config.__wrapped__(torch.device("cuda"))


# (op, N, C, P, S, 16-bit rows per tile, tiles, grid, BLOCK_T, BLOCK_S, warps) at
# benchmarks/ops/bilinear.py's HEADLINE["cuda"]: MFB k = 5, o = 256 (P = 1280); BLOCK 15
# chunks of 32, R = 15 (P = 480).
HEADLINES = [
    ("mfb", 8192, 1, 1280, 256, 8192, 1, (512, 1, 2), 16, 128, 8),
    ("block_fusion", 8192, 15, 480, 32, 2048, 4, (32, 15, 1), 64, 32, 8),
]


@pytest.mark.parametrize("case", HEADLINES, ids=lambda c: c[0])
def test_headline_choice(monkeypatch, case):
    """On an H100: 16-bit GEMMs; MFB one tile of 8192 rows (1024 CTAs per pooling launch), BLOCK
    4 of 2048 (480 CTAs); each tile's A and B within 32 MB apiece, so that at the large grid's
    N = 65536 the (N, C·P) projections are never all held; float32 keeps float32 GEMMs. Meta
    tensors (the static proof's) choose as the H100."""
    _, n, c, p, s, rows, tiles, grid, bt, bs, warps = case
    cfg = _h100(monkeypatch)
    assert cfg == bil._gpu_config(torch.device("meta"))
    assert cfg.programs == 264 and cfg.half_gemms
    assert bil._gemm_dtype(torch.bfloat16, cfg) == torch.bfloat16
    assert bil._gemm_dtype(torch.float16, cfg) == torch.float16
    assert bil._gemm_dtype(torch.float32, cfg) == torch.float32
    assert bil._gemm_dtype(torch.float64, cfg) == torch.float64
    tile = bil._tile_rows(n, c, p, torch.bfloat16, cfg)
    assert (tile, triton.cdiv(n, tile)) == (rows, tiles)
    assert c * tile * p * 2 <= 32 << 20
    big = bil._tile_rows(65536, c, p, torch.bfloat16, cfg)
    assert c * big * p * 2 <= 32 << 20 and triton.cdiv(65536, big) >= 2
    got = bil._grid(tile, c, s, cfg)
    assert got == (grid, bt, bs, warps)
    assert grid[0] * grid[1] * grid[2] >= 2 * 132
    # The interpreter's configuration is the C++ kernels' (float32 GEMMs, 256 KB tiles).
    cpu = bil._config(torch.device("cpu"))
    assert (cpu.tile_bytes, cpu.min_rows, cpu.row_align, cpu.programs, cpu.half_gemms) == (
        1 << 18,
        16,
        0,
        0,
        False,
    )
    assert bil._gemm_dtype(torch.bfloat16, cpu) == torch.float32
    assert bil._tile_rows(n, c, p, torch.float32, cpu) == max(16, (1 << 18) // (4 * c * p))


def test_tile_rows_bounds():
    """Equal tiles within the budget, a multiple of the alignment; N = 0 and N under one tile."""
    cfg = bil._Config(tile_bytes=1000, min_rows=8, row_align=8)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 200):
        tile = bil._tile_rows(n, 1, 10, torch.bfloat16, cfg)  # 50 rows fit: cap 48
        assert 1 <= tile <= max(1, n) and tile <= 48
        assert tile == max(1, n) or tile % 8 == 0
        assert triton.cdiv(n, tile) == triton.cdiv(n, 48)


# ---- the GPU configuration against the reference ---------------------------------------------


def _mfb(n, dtype, activation="relu", normalize=True, bias=True, layout="contiguous",
         param_layout="contiguous", grad_layout="contiguous"):  # fmt: skip
    dx, dt, k, o, out = MFB_SIZE
    x, t = make_xs((n,), (dx, dt), dtype, "cpu", layout, seed=n)
    params = make_mfb_params(dx, dt, k, o, out, dtype, "cpu", param_layout)
    if not bias:
        params[1] = params[3] = params[5] = None
    kwargs = {"factor": k, "activation": activation, "normalize": normalize}
    return check_against_reference("mfb", "triton", x, t, params, kwargs, dtype, grad_layout, normalize)


def _block(n, dtype, normalize="before_cat", bias=True, layout="contiguous", param_layout="contiguous",
           grad_layout="contiguous"):  # fmt: skip
    chunks, rank, s, out = BLOCK_SIZE
    x, t = make_xs((n,), (chunks * s,) * 2, dtype, "cpu", layout, seed=n)
    params = make_block_params(chunks, rank, s, out, dtype, "cpu", param_layout)
    if not bias:
        params[1] = params[3] = params[5] = None
    kwargs = {"rank": rank, "normalize": normalize}
    return check_against_reference(
        "block_fusion", "triton", x, t, params, kwargs, dtype, grad_layout, normalize != "none"
    )


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MFB_OPTIONS = [("relu", True, True), ("tanh", False, True), (None, True, False), ("relu", False, False)]


@pytest.mark.parametrize(("activation", "normalize", "bias"), MFB_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mfb_matches_reference(gpu, dtype, activation, normalize, bias):
    """MFB (k = 3) and, below, MLB (k = 1): forward and every gradient in tiles of the GPU's kind."""
    skip_unless_usable("triton", "cpu", dtype, op=OPS["mfb"])
    _mfb(N, dtype, activation, normalize, bias)
    dx, dt, k, o, out = MFB_SIZE
    assert_gpu_launches(gpu, N, 1, k * o, o, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlb_matches_reference(gpu, dtype):
    x, t = make_xs((21,), (4, 9), dtype, "cpu", seed=2)
    params = make_mfb_params(4, 9, 1, 11, 3, dtype, "cpu")
    check_against_reference("mfb", "triton", x, t, params, {"factor": 1, "activation": "tanh"}, dtype)
    assert_gpu_launches(gpu, 21, 1, 11, 11, dtype)


@pytest.mark.parametrize(("normalize", "bias"), [("before_cat", True), ("after_cat", False), ("none", True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_matches_reference(gpu, dtype, normalize, bias):
    """BLOCK (3 chunks, R = 2): forward and every gradient, every normalisation."""
    skip_unless_usable("triton", "cpu", dtype, op=OPS["block_fusion"])
    _block(N, dtype, normalize, bias)
    chunks, rank, s, _ = BLOCK_SIZE
    assert_gpu_launches(gpu, N, chunks, rank * s, s, dtype)


def test_mutan_float64(gpu):
    """MUTAN (one chunk) in float64: the GPU's tiles, float64 GEMMs."""
    x, t = make_xs((19,), (6, 6), torch.float64, "cpu", seed=7)
    params = make_block_params(1, 4, 6, 5, torch.float64, "cpu")
    check_against_reference("block_fusion", "triton", x, t, params, {"rank": 4, "normalize": "after_cat"},
                            torch.float64, conditioned=True)  # fmt: skip
    assert_gpu_launches(gpu, 19, 1, 24, 6, torch.float64)


@pytest.mark.parametrize(
    ("layout", "param_layout", "grad_layout"),
    [("transposed", "transposed", "broadcast"), ("broadcast", "broadcast", "transposed"),
     ("strided", PARAM_LAYOUTS[0], "contiguous")],
)  # fmt: skip
@pytest.mark.parametrize("op", ["mfb", "block_fusion"])
def test_strided_and_broadcast(gpu, op, layout, param_layout, grad_layout):
    """Transposed, strided and stride-0 inputs, weights and biases; stride-0 and transposed
    upstream gradients, in bfloat16."""
    kwargs = {"layout": layout, "param_layout": param_layout, "grad_layout": grad_layout}
    (_mfb if op == "mfb" else _block)(N, torch.bfloat16, **kwargs)
    assert gpu


@pytest.mark.parametrize("op", ["mfb", "block_fusion"])
def test_empty_batch(gpu, op):
    """N = 0: shapes, exactly zero parameter gradients, no launch."""
    dtype = torch.bfloat16
    if op == "mfb":
        dx, dt, k, o, out = MFB_SIZE
        x, t = make_xs((0,), (dx, dt), dtype, "cpu")
        params = make_mfb_params(dx, dt, k, o, out, dtype, "cpu")
        y = _call_op(op, x, t, params, {"factor": k, "normalize": True})
    else:
        chunks, rank, s, out = BLOCK_SIZE
        x, t = make_xs((0,), (chunks * s,) * 2, dtype, "cpu")
        params = make_block_params(chunks, rank, s, out, dtype, "cpu")
        y = _call_op(op, x, t, params, {"rank": rank})
    assert y.shape == (0, out) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and t.grad.shape == t.shape
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))
    assert gpu == []


def _call_op(op, x, t, params, kwargs):
    with fusionops.backend("triton"):
        return getattr(fusionops, op)(x, t, *params, **kwargs)


def test_gradcheck(gpu):
    """float64 gradcheck of MFB and BLOCK through the GPU's tiles (several, a partial one)."""
    x, t = (v.detach().requires_grad_(True) for v in make_xs((11,), (3, 2), torch.float64, "cpu"))
    ps = [p.detach().requires_grad_(True) for p in make_mfb_params(3, 2, 2, 3, 2, torch.float64, "cpu")]
    kwargs = {"factor": 2, "normalize": True}
    assert torch.autograd.gradcheck(lambda *a: _call_op("mfb", *a[:2], a[2:], kwargs), (x, t, *ps))
    x, t = (v.detach().requires_grad_(True) for v in make_xs((11,), (4, 4), torch.float64, "cpu"))
    ps = [p.detach().requires_grad_(True) for p in make_block_params(2, 2, 2, 3, torch.float64, "cpu")]
    assert torch.autograd.gradcheck(
        lambda *a: _call_op("block_fusion", *a[:2], a[2:], {"rank": 2}), (x, t, *ps)
    )
    assert len({launch["rows"] for launch in gpu}) > 1  # a full and a partial tile


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_opcheck(gpu, dtype):
    """torch.library.opcheck of both ops and their backward ops at the GPU's configuration."""
    ops = torch.ops.fusionops
    dx, dt, k, o, out = MFB_SIZE
    x, t = (v.detach().requires_grad_(True) for v in make_xs((N,), (dx, dt), dtype, "cpu"))
    params = [p.detach().requires_grad_(True) for p in make_mfb_params(dx, dt, k, o, out, dtype, "cpu")]
    torch.library.opcheck(ops.mfb, (x, t, *params, k, "relu", True, "triton"))
    gy = make_grad((N, out), dtype, "cpu")
    plain = [p.detach() for p in params[:5]]
    torch.library.opcheck(
        ops.mfb_backward, (gy, x.detach(), t.detach(), *plain, k, "tanh", False, [True] * 8, "triton")
    )
    chunks, rank, s, out = BLOCK_SIZE
    x, t = (v.detach().requires_grad_(True) for v in make_xs((N,), (chunks * s,) * 2, dtype, "cpu"))
    params = [p.detach().requires_grad_(True) for p in make_block_params(chunks, rank, s, out, dtype, "cpu")]
    torch.library.opcheck(ops.block_fusion, (x, t, *params, rank, "before_cat", "triton"))
    assert any(launch["a"] == (dtype if dtype in HALF else torch.float32) for launch in gpu)


# ---- NaN and inf where the reference has them ----------------------------------------------

# (op, leaf, index, value): in the last tile's rows, a weight's column, a bias, the output weight.
NONFINITE = [
    ("mfb", "x", (35, 2), float("nan")),
    ("mfb", "t", (3, 4), float("inf")),
    ("mfb", "p2", (7, 1), -float("inf")),
    ("mfb", "p4", (2, 3), float("nan")),
    ("block_fusion", "x", (36, 14), float("inf")),
    ("block_fusion", "p1", (1, 3), float("nan")),
    ("block_fusion", "p0", (2, 6, 4), -float("inf")),
]


def _outputs(op, leaves, kwargs, g, backend):
    args = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    params = [args[f"p{i}"] for i in range(6)]
    with fusionops.backend(backend):
        y = getattr(fusionops, op)(args["x"], args["t"], *params, **kwargs)
    return [y.detach(), *torch.autograd.grad(y, list(args.values()), g)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("op", "leaf", "index", "value"), NONFINITE, ids=str)
def test_nonfinite(gpu, dtype, op, leaf, index, value):
    """NaN and ±inf exactly where the reference (same dtype) has them, forward and every
    gradient; the finite elements within TOL of the clean call's scale. Rows of other tiles
    stay finite. MFB unnormalised: near a pooled 0 the signed square root's conditioning puts
    finite gradients beyond TOL at any tiling (check_against_reference allows for it)."""
    if op == "mfb":
        dx, dt, k, o, out = MFB_SIZE
        x, t = make_xs((N,), (dx, dt), dtype, "cpu", seed=5)
        params = make_mfb_params(dx, dt, k, o, out, dtype, "cpu")
        kwargs = {"factor": k, "activation": "tanh", "normalize": False}
    else:
        chunks, rank, s, out = BLOCK_SIZE
        x, t = make_xs((N,), (chunks * s,) * 2, dtype, "cpu", seed=5)
        params = make_block_params(chunks, rank, s, out, dtype, "cpu")
        kwargs = {"rank": rank, "normalize": "before_cat"}
    clean = {"x": x.detach(), "t": t.detach(), **{f"p{i}": p.detach() for i, p in enumerate(params)}}
    dirty = {k: v.clone() for k, v in clean.items()}
    dirty[leaf][index] = value
    g = make_grad((N, out), dtype, "cpu")
    got = _outputs(op, dirty, kwargs, g, "triton")
    want = _outputs(op, dirty, kwargs, g, "reference")
    scales = [v.abs().max().item() for v in _outputs(op, clean, kwargs, g, "reference")]
    assert gpu
    assert any(not torch.isfinite(v).all() for v in want), "the injected value reached nothing"
    for name, a, e, scale in zip(("out", *clean), got, want, scales, strict=True):
        assert_same_nonfinite(a, e, dtype, f"{name} ({leaf}{list(index)} = {value})", scale)
