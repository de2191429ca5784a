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

import functools
import types

import pytest
import torch
import triton
from bilinear_inputs import (
    PARAM_LAYOUTS,
    check_against_reference,
    make_block_params,
    make_mfb_params,
    make_mfh_params,
)
from conftest import TOL, assert_close_to, skip_unless_usable
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


# ---- MFH: the kernels' chain mode ------------------------------------------------------------
# Called directly (fusionops.triton.bilinear.forward/backward with chain=True), against
# fusionops.reference.mfh in float64 with torch.autograd.grad for the gradients.

MFH_SIZE = (5, 3, 2, 3, 4)  # (d_x, d_t, k, o, O): odd widths, P = 6
MFH_GRADS = ("x", "t", "wx", "bx", "wt", "bt", "wo", "bo")


class _ChainRecorder:
    """Records each chain launch (rows, dtypes of A and of the pooled/dp buffer, E's when there
    is one, STORE_E, blocks) and NaN-fills what the forward kernel writes (pooled, E) first."""

    def __init__(self, kernel, seen: list[dict], forward: bool) -> None:
        self.kernel, self.seen, self.forward = kernel, seen, forward

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            a, third, e = args[0], args[2], args[7]
            store_e = kwargs.get("STORE_E", False)
            self.seen.append(
                {"grid": grid, "rows": args[3], "chunks": args[6], "a": a.dtype, "acc": third.dtype,
                 "e": e.dtype if store_e or not self.forward else None, "forward": self.forward,
                 "store_e": store_e, **{k: kwargs[k] for k in ("BLOCK_T", "BLOCK_S", "BLOCK_R", "num_warps")}}
            )  # fmt: skip
            if self.forward:
                third.fill_(float("nan"))
                if store_e:
                    e.fill_(float("nan"))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _record_chain(monkeypatch) -> list[dict]:
    seen: list[dict] = []
    monkeypatch.setattr(bil, "_chain_fwd_kernel", _ChainRecorder(bil._chain_fwd_kernel, seen, True))
    monkeypatch.setattr(bil, "_chain_bwd_kernel", _ChainRecorder(bil._chain_bwd_kernel, seen, False))
    return seen


@pytest.fixture
def interp_chain(monkeypatch) -> list[dict]:
    """The interpreter's own configuration (float32/64 GEMMs) in tiles of 16 rows; the launches."""
    skip_unless_usable("triton", "cpu", op=OPS["mfb"])
    monkeypatch.setattr(bil, "_TILE_BYTES", 1)  # tiles of _MIN_TILE_ROWS = 16 rows
    return _record_chain(monkeypatch)


@pytest.fixture
def gpu_chain(monkeypatch) -> list[dict]:
    """The GPU's configuration forced (FORCED: 16-bit GEMMs, 8-row aligned tiles, halved row
    blocks); the chain launches."""
    skip_unless_usable("triton", "cpu", op=OPS["mfb"])
    monkeypatch.setattr(bil, "_config", lambda device: FORCED)
    return _record_chain(monkeypatch)


def _mfh_leaves(n, c, size=MFH_SIZE, dtype=torch.float32, layout="contiguous", bias=True, seed=0):
    """Random x (n, d_x), t (n, d_t) in ``layout`` and the kernels' chunked parameters: wx (C,
    k·o, d_x), bx (C, k·o), wt, bt, wo (O, C·o), bo; weights scaled as nn.Linear's."""
    dx, dt, k, o, out = size
    x, t = (v.detach() for v in make_xs((n,), (dx, dt), dtype, "cpu", layout, seed=seed))
    gen = torch.Generator().manual_seed(seed + 100)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    params = [rand(c, k * o, dx, scale=dx**-0.5), rand(c, k * o), rand(c, k * o, dt, scale=dt**-0.5),
              rand(c, k * o), rand(out, c * o, scale=(c * o) ** -0.5), rand(out)]  # fmt: skip
    if not bias:
        params[1] = params[3] = params[5] = None
    return {"x": x, "t": t, **dict(zip(MFH_GRADS[2:], params, strict=True))}


def _mfh_kernels(leaves, grad, k, act, normalize, needs=None, rank_major=False):
    """y and the eight gradients of the chain kernels (None where the leaf is None)."""
    args = [leaves[n] for n in MFH_GRADS]
    code = bil_codes(act, normalize)
    y = bil.forward(*args, k, rank_major, *code, chain=True)
    needs = [leaves[n] is not None for n in MFH_GRADS] if needs is None else needs
    grads = bil.backward(grad, *args[:7], k, rank_major, *code, needs, chain=True)
    return y, [g if n else None for g, n in zip(grads, needs, strict=True)]


def bil_codes(act, normalize) -> tuple[int, int]:
    from fusionops.ops._bilinear import ACTIVATION_CODES, NORM_NONE, NORM_PER_CHUNK

    return ACTIVATION_CODES[act], NORM_PER_CHUNK if normalize else NORM_NONE


def _reference64(forward, leaves, grad):
    """``forward(ins)``'s y and its gradients (torch.autograd.grad) in float64, ``ins`` the leaves
    as float64 leaves that require grad."""
    ins = {
        n: None if v is None else v.detach().to(torch.float64).requires_grad_(True) for n, v in leaves.items()
    }
    y = forward(ins)
    live = [n for n in MFH_GRADS if ins[n] is not None]
    if not y.numel():
        return y, {n: torch.zeros_like(ins[n]) for n in live}
    grads = torch.autograd.grad(y, [ins[n] for n in live], grad.to(torch.float64))
    return y.detach(), dict(zip(live, grads, strict=True))


def _mfh_reference(leaves, grad, k, act, normalize):
    """reference.mfh's y and gradients, in float64."""
    from fusionops.reference import bilinear as ref_bilinear

    def forward(ins):
        return ref_bilinear.mfh(*(ins[n] for n in MFH_GRADS), k, act, normalize)

    return _reference64(forward, leaves, grad)


def _assert_like_reference(label, y, grads, leaves, dtype, reference, normalized):
    """``y`` and ``grads`` (in MFH_GRADS order) within TOL[dtype] of ``reference(leaves)`` (y and
    a dict of float64 gradients); ``normalized`` calls allow, as check_against_reference, 8x what
    the reference moves when its inputs are perturbed by TOL (the signed square root's
    conditioning near 0)."""
    y_ref, g_ref = reference(leaves)
    slack = dict.fromkeys(("y", *g_ref), 0.0)
    if normalized:
        gen = torch.Generator().manual_seed(11)

        def moved_by(v):  # every element scaled by 1 + TOL·u, u uniform in [-1, 1]
            u = torch.rand(v.shape, generator=gen, dtype=torch.float64) * 2 - 1
            return v.to(torch.float64) * (1 + TOL[dtype] * u)

        y_m, g_m = reference({n: None if v is None else moved_by(v) for n, v in leaves.items()})
        slack = {
            "y": (y_m - y_ref).abs().max().item(),
            **{m: (g_m[m] - g_ref[m]).abs().max().item() for m in g_ref},
        }
    pairs = [("y", y, y_ref)] + [(m, grads[MFH_GRADS.index(m)], g_ref[m]) for m in g_ref]
    for what, a, e in pairs:
        assert a.shape == e.shape and a.dtype == dtype, (what, a.shape, e.shape, a.dtype)
        a64 = a.to(torch.float64)
        assert not torch.isnan(a64).any(), f"{what}: NaN in the result (an element left unwritten?)"
        tol = TOL[dtype]
        atol = tol * (e.abs().max().item() if e.numel() else 0.0) + 8 * slack[what] + 1e-300
        torch.testing.assert_close(a64, e, rtol=tol, atol=atol, msg=lambda m, w=what: f"{label} {w}: {m}")


def _check_mfh(leaves, k, act, normalize, dtype, grad_layout="contiguous"):
    """Forward and every gradient of the chain kernels like the float64 reference
    (_assert_like_reference)."""
    n, out = leaves["x"].shape[0], leaves["wo"].shape[0]
    g = make_grad((n, out), dtype, "cpu", grad_layout)
    y, grads = _mfh_kernels(leaves, g, k, act, normalize)
    assert y.shape == (n, out) and y.dtype == dtype and y.is_contiguous()
    reference = functools.partial(_mfh_reference, grad=g, k=k, act=act, normalize=normalize)
    _assert_like_reference("MFH", y, grads, leaves, dtype, reference, bool(normalize))
    return y, grads


def _assert_chain_launches(seen, n, c, tile, gd, acc):
    """Each tile took one forward launch (no E) in the forward, then in the backward one
    keeping E (without it for C = 1: nothing to keep) and one backward launch, on (rows, C·P)
    projections of dtype ``gd``."""
    rows = [min(tile, n - r0) for r0 in range(0, n, tile)]
    fwd = [s for s in seen if s["forward"] and not s["store_e"]]
    rec = [s for s in seen if s["forward"] and s["store_e"]]
    bwd = [s for s in seen if not s["forward"]]
    assert [s["rows"] for s in fwd] == rows * (1 if c > 1 else 2)
    assert [s["rows"] for s in bwd] == rows
    assert [s["rows"] for s in rec] == (rows if c > 1 else [])
    for s in seen:
        assert s["chunks"] == c and s["a"] == gd and s["acc"] == acc, s
        assert s["e"] in (None, acc), s


MFH_CASES = [  # (C, k, activation, normalize, bias)
    (1, 2, "relu", False, True),
    (2, 2, "relu", True, True),
    (2, 1, "tanh", False, False),
    (3, 2, None, True, False),
    (3, 1, "tanh", True, True),
    (2, 2, None, False, True),
]


@pytest.mark.parametrize(("c", "k", "act", "normalize", "bias"), MFH_CASES, ids=str)
def test_mfh_chain_matches_reference(interp_chain, c, k, act, normalize, bias):
    """float32 under the interpreter's configuration, 37 rows in tiles of 16 (a partial one)."""
    dx, dt, _, o, out = MFH_SIZE
    leaves = _mfh_leaves(N, c, (dx, dt, k, o, out), bias=bias, seed=c + 10 * k)
    _check_mfh(leaves, k, act, normalize, torch.float32)
    _assert_chain_launches(interp_chain, N, c, 16, torch.float32, torch.float32)


@pytest.mark.parametrize("c", [1, 2, 3])
def test_mfh_chain_float64(interp_chain, c):
    """float64: forward and gradients within 1e-12 of the reference's autograd."""
    leaves = _mfh_leaves(21, c, dtype=torch.float64, seed=c)
    _check_mfh(leaves, MFH_SIZE[2], "tanh", c == 2, torch.float64)
    _assert_chain_launches(interp_chain, 21, c, 16, torch.float64, torch.float64)


@pytest.mark.parametrize(("dtype", "c", "act", "normalize"), [
    (torch.bfloat16, 2, "relu", True), (torch.float16, 3, "tanh", False), (torch.float32, 2, None, True),
    (torch.bfloat16, 1, "tanh", False),
], ids=str)  # fmt: skip
def test_mfh_chain_gpu_config(gpu_chain, dtype, c, act, normalize):
    """The GPU's configuration forced: 16-bit projections read by the kernels, several aligned
    tiles and halved row blocks (grids and blocks as _chain_grid gives them)."""
    leaves = _mfh_leaves(N, c, dtype=dtype, seed=3 + c)
    _check_mfh(leaves, MFH_SIZE[2], act, normalize, dtype)
    gd = dtype if dtype in HALF else torch.float32
    tile = bil._tile_rows(N, c, MFH_SIZE[2] * MFH_SIZE[3], gd, FORCED)
    assert tile % 8 == 0 or tile == N
    assert triton.cdiv(N, tile) > 1 or c == 1  # C = 1's 12-byte rows fit one tile
    _assert_chain_launches(gpu_chain, N, c, tile, gd, torch.float32)
    for s in gpu_chain:
        grid, bt, bs, br, warps = bil._chain_grid(s["rows"], MFH_SIZE[3], MFH_SIZE[2], FORCED)
        assert (s["grid"], s["BLOCK_T"], s["BLOCK_S"], s["BLOCK_R"], s["num_warps"]) == (
            grid,
            bt,
            bs,
            br,
            warps,
        )
    assert any(s["grid"][0] > 1 for s in gpu_chain)


def test_mfh_chain_rank_blocks(interp_chain, monkeypatch):
    """A rank wider than the kernels' rank block: ranks in blocks (the last partial), the
    forward adding each block's sums to the earlier ones'."""
    monkeypatch.setattr(bil, "_CHAIN_R_BLOCK", 2)
    leaves = _mfh_leaves(19, 3, (4, 3, 5, 2, 3), seed=7)
    _check_mfh(leaves, 5, "relu", False, torch.float32)
    assert {s["BLOCK_R"] for s in interp_chain} == {2}


@pytest.mark.parametrize(
    ("layout", "grad_layout"),
    [("broadcast", "transposed"), ("transposed", "broadcast"), ("strided", "contiguous")],
)
def test_mfh_chain_strided_and_broadcast(gpu_chain, layout, grad_layout):
    """Stride-0, transposed and strided x and t; stride-0 and transposed upstream gradients;
    transposed (non-contiguous) weights; bfloat16 with the GPU's configuration."""
    leaves = _mfh_leaves(N, 2, dtype=torch.bfloat16, layout=layout, seed=5)
    for name in ("wx", "wt"):
        leaves[name] = leaves[name].transpose(1, 2).contiguous().transpose(1, 2)
    leaves["bx"] = leaves["bx"][:, :1].expand_as(leaves["bx"])  # stride 0
    assert not leaves["wx"].is_contiguous() and not leaves["x"].is_contiguous()
    _check_mfh(leaves, MFH_SIZE[2], "relu", True, torch.bfloat16, grad_layout)
    assert gpu_chain


def test_mfh_chain_rank_major(interp_chain):
    """rank_major (i = r·S + j): the same y and gradients as MFB's order with the weights'
    rows permuted to match (the kernel contract serves both)."""
    dx, dt, k, o, out = MFH_SIZE
    leaves = _mfh_leaves(N, 2, seed=9)
    g = make_grad((N, out), torch.float32, "cpu")
    y, grads = _mfh_kernels(leaves, g, k, "tanh", True)
    perm = torch.arange(k * o).view(o, k).t().reshape(-1)  # rank-major row r·S + j <- j·R + r
    permuted = {n: v[:, perm] if n in ("wx", "bx", "wt", "bt") else v for n, v in leaves.items()}
    y_rm, grads_rm = _mfh_kernels(permuted, g, k, "tanh", True, rank_major=True)
    assert_close_to(y_rm, y.to(torch.float64), torch.float32, "rank-major y")
    for name, a, b in zip(MFH_GRADS, grads_rm, grads, strict=True):
        b = b[:, perm] if name in ("wx", "bx", "wt", "bt") else b
        assert_close_to(a, b.to(torch.float64), torch.float32, f"rank-major grad of {name}")


def test_mfh_chain_empty_batch(gpu_chain):
    """N = 0: y (0, O); exactly zero parameter gradients, empty dx, dt; no launch."""
    leaves = _mfh_leaves(0, 2, dtype=torch.bfloat16)
    g = make_grad((0, MFH_SIZE[4]), torch.bfloat16, "cpu")
    y, grads = _mfh_kernels(leaves, g, MFH_SIZE[2], "relu", True)
    assert y.shape == (0, MFH_SIZE[4]) and y.dtype == torch.bfloat16
    for name, grad in zip(MFH_GRADS, grads, strict=True):
        assert grad.shape == leaves[name].shape and grad.dtype == torch.bfloat16, name
        if name not in ("x", "t"):
            assert torch.equal(grad, torch.zeros_like(grad)), name
    assert gpu_chain == []


def test_mfh_chain_needs(interp_chain):
    """Only the asked gradients: the others come back empty; the asked ones as with all."""
    leaves = _mfh_leaves(N, 2, seed=4)
    g = make_grad((N, MFH_SIZE[4]), torch.float32, "cpu")
    _, every = _mfh_kernels(leaves, g, MFH_SIZE[2], "relu", True)
    needs = [False, True, True, False, False, True, False, False]
    args = [leaves[n] for n in MFH_GRADS]
    some = bil.backward(g, *args[:7], MFH_SIZE[2], False, *bil_codes("relu", True), needs, chain=True)
    for name, need, a, b in zip(MFH_GRADS, needs, some, every, strict=True):
        if need:
            assert torch.equal(a, b), name
        else:
            assert a.numel() == 0, name


class _Chain(torch.autograd.Function):
    """The chain kernels as an autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, x, t, wx, bx, wt, bt, wo, bo, k, act, normalize):
        ctx.save_for_backward(x, t, wx, bx, wt, bt, wo)
        ctx.args = (k, False, *bil_codes(act, normalize))
        return bil.forward(x, t, wx, bx, wt, bt, wo, bo, *ctx.args, chain=True)

    @staticmethod
    def backward(ctx, gy):
        grads = bil.backward(gy, *ctx.saved_tensors, *ctx.args, [True] * 8, chain=True)
        return (*grads, None, None, None)


@pytest.mark.parametrize(
    ("act", "normalize", "fast"),
    [pytest.param("tanh", True, False, marks=pytest.mark.slow), (None, False, True)],
)
def test_mfh_chain_gradcheck(interp_chain, act, normalize, fast):
    """float64 gradcheck of the chain kernels (3 chunks, tiles of 16 rows: one partial); the
    second in gradcheck's fast mode (the interpreter is slow)."""
    leaves = _mfh_leaves(17, 3, (2, 2, 2, 1, 2), dtype=torch.float64, seed=2)
    ins = [leaves[n].requires_grad_(True) for n in MFH_GRADS]
    assert torch.autograd.gradcheck(lambda *a: _Chain.apply(*a, 2, act, normalize), ins, fast_mode=fast)
    assert {s["rows"] for s in interp_chain} == {16, 1}


# (leaf, index, value): a row of the last tile, the first chunk's weight (it reaches every
# later chunk through the chain), the last chunk's bias, the output weight.
MFH_NONFINITE = [
    ("x", (35, 2), float("nan")),
    ("t", (3, 1), float("inf")),
    ("wx", (0, 4, 1), -float("inf")),
    ("bt", (1, 2), float("nan")),
    ("wo", (2, 3), float("inf")),
]


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize(("leaf", "index", "value"), MFH_NONFINITE, ids=str)
def test_mfh_chain_nonfinite(gpu_chain, leaf, index, value, act):
    """NaN and ±inf exactly where the reference (float32) has them, forward and every gradient;
    the finite elements within TOL of the clean call's scale (relu: its backward selects, so
    inf·0 gives 0 as in the reference, not NaN)."""
    from fusionops.reference import bilinear as ref_bilinear

    dtype = torch.float32
    clean = _mfh_leaves(N, 2, dtype=dtype, seed=6)
    dirty = {n: v.clone() for n, v in clean.items()}
    dirty[leaf][index] = value
    g = make_grad((N, MFH_SIZE[4]), dtype, "cpu")
    k = MFH_SIZE[2]
    y, grads = _mfh_kernels(dirty, g, k, act, False)
    ins = {n: v.clone().requires_grad_(True) for n, v in dirty.items()}
    y_ref = ref_bilinear.mfh(*(ins[n] for n in MFH_GRADS), k, act, False)
    want = [y_ref, *torch.autograd.grad(y_ref, [ins[n] for n in MFH_GRADS], g)]
    y_clean, g_clean = _mfh_reference(clean, g, k, act, False)
    scales = [v.abs().max().item() for v in (y_clean, *g_clean.values())]
    assert any(not torch.isfinite(v).all() for v in want), "the injected value reached nothing"
    for name, a, e, scale in zip(("y", *MFH_GRADS), [y, *grads], want, scales, strict=True):
        assert_same_nonfinite(a, e.detach(), dtype, f"{name} ({leaf}{list(index)} = {value}, {act})", scale)


def test_mfh_headline_choice(monkeypatch):
    """On an H100 at MFH's headline (MFB's sizes, p = 2: N = 8192, k = 5, o = 256, C·P = 2560):
    two equal tiles of 4096 rows, each tile's A, B (bfloat16) and the backward's E scratch
    (float32, (C−1)·P wide) within 32 MB apiece; 8192 CTAs per chain launch of 8 x 16 x 8
    elements (the rank block padded from 5 to 8) at 8 warps: 4 per thread, which keeps the
    backward kernel at 110 registers, no spill (tools/triton_static.py)."""
    cfg = _h100(monkeypatch)
    n, c, k, o = 8192, 2, 5, 256
    tile = bil._tile_rows(n, c, k * o, torch.bfloat16, cfg)
    assert (tile, triton.cdiv(n, tile)) == (4096, 2)
    assert tile * c * k * o * 2 <= 32 << 20 and tile * (c - 1) * k * o * 4 <= 32 << 20
    assert bil._chain_grid(tile, o, k, cfg) == ((512, 16), 8, 16, 8, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mfh_op_gpu_config(gpu_chain, dtype):
    """fusionops.mfh on the triton backend (the op layer's chunked weights and chain call) at
    the GPU's configuration against the reference; bfloat16: torch.library.opcheck of the op
    and its backward op there."""
    dx, dt, k, o, out = MFH_SIZE
    x, t = make_xs((N,), (dx, dt), dtype, "cpu", seed=8)
    params = make_mfh_params(dx, dt, k, o, out, 3, dtype, "cpu")
    kwargs = {"factor": k, "activation": "tanh", "normalize": True}
    check_against_reference("mfh", "triton", x, t, params, kwargs, dtype, conditioned=True)
    assert gpu_chain and all(s["chunks"] == 3 for s in gpu_chain)
    if dtype != torch.bfloat16:
        return
    n = 9  # opcheck runs the op many times: one tile is enough here
    x, t = (v[:n].detach().requires_grad_(True) for v in (x, t))
    params = [p.detach().requires_grad_(True) for p in params]
    ops = torch.ops.fusionops
    torch.library.opcheck(ops.mfh, (x, t, *params, k, "relu", True, "triton"))
    gy = make_grad((n, out), dtype, "cpu")
    plain = [p.detach() for p in params[:5]]
    torch.library.opcheck(
        ops.mfh_backward, (gy, x.detach(), t.detach(), *plain, k, "none", False, [True] * 8, "triton")
    )


# ---- dropout (issue 20): the four hashed sites, against the reference's hashed_dropout -------
# The kernels called directly (fusionops.triton.bilinear.forward/backward with drop_in,
# drop_prod, drop_out, seed) against fusionops.reference.bilinear's mfb / mfh / block_fusion with
# training=True and the same seed (float64, torch.autograd.grad for the gradients). Every
# launch is recorded (its DROP_* flags and first row) and what a forward kernel writes is
# NaN-filled first, so an element left unwritten or a path not taken fails.

DROP_SITES = {  # (drop_in, drop_prod, drop_out)
    "in": (0.3, 0.0, 0.0),
    "prod": (0.0, 0.4, 0.0),
    "out": (0.0, 0.0, 0.35),
    "all": (0.3, 0.25, 0.2),
    "chain": (0.3, 0.25, 0.0),  # MFH's two sites
    "half": (0.5, 0.5, 0.5),  # 16-bit: 1/(1 - p) = 2 is exact in every dtype
}
DROP_SEED = 12345
MFB_DROP_SIZE = (5, 3, 3, 3, 4)  # (d_x, d_t, k, o, O): P = 9
_POOL_KERNELS = ("_pool_fwd_kernel", "_pool_bwd_kernel", "_chain_fwd_kernel", "_chain_bwd_kernel")


class _DropRecorder:
    """Stands in for a pooling kernel or _drop_kernel: records the launch's kernel, DROP_* flags
    and first row (row0); NaN-fills what a forward kernel writes (pooled, E; _drop_kernel's dst
    when it is not its src) before launching."""

    def __init__(self, name: str, kernel, seen: list[dict]) -> None:
        self.name, self.kernel, self.seen = name, kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.name == "_drop_kernel":
                row0, out = args[4], [args[1]] if args[1] is not args[0] else []
            else:
                row0 = args[8 if self.name.startswith("_chain") else 7]
                out = [args[2]] if "fwd" in self.name else []
                if kwargs.get("STORE_E"):
                    out.append(args[7])
            self.seen.append(
                {
                    "kernel": self.name,
                    "row0": row0,
                    "in": kwargs.get("DROP_IN"),
                    "prod": kwargs.get("DROP_PROD"),
                }
            )
            for o in out:
                o.fill_(float("nan"))
            return self.kernel[grid](*args, **kwargs)

        return launch


N_DROP = 21  # tiles of 16 rows: 16 + 5; the GPU's (FORCED): tiles of 8 or 16, the last partial


@pytest.fixture
def drop_cfg(request, monkeypatch) -> tuple[str, list[dict]]:
    """The launcher (parametrised indirectly) in tiles of 16 rows ("tiles16"), in one tile (the
    interpreter's 256 KB, "one_tile") or with the GPU's configuration forced ("gpu": FORCED);
    every pooling and z-dropout launch recorded."""
    skip_unless_usable("triton", "cpu", op=OPS["mfb"])
    if request.param == "tiles16":
        monkeypatch.setattr(bil, "_TILE_BYTES", 1)  # tiles of _MIN_TILE_ROWS = 16 rows
    elif request.param == "gpu":
        monkeypatch.setattr(bil, "_config", lambda device: FORCED)
    else:
        assert request.param == "one_tile", request.param
    seen: list[dict] = []
    for name in (*_POOL_KERNELS, "_drop_kernel"):
        monkeypatch.setattr(bil, name, _DropRecorder(name, getattr(bil, name), seen))
    return request.param, seen


def _drop_leaves(op: str, n: int, c: int, dtype, layout="contiguous", seed=0) -> tuple[dict, tuple]:
    """Random leaves in the kernels' layout (wx (C, P, d), bx (C, P), …, wo (O, C·S), bo) and the
    static arguments (rank, rank_major, activation code set later, chain)."""
    if op in ("mfb", "mfh"):
        size = MFB_DROP_SIZE if op == "mfb" else MFH_SIZE
        return _mfh_leaves(n, c, size, dtype, layout, seed=seed), size
    chunks, rank, s, out = BLOCK_SIZE
    x, t = (v.detach() for v in make_xs((n,), (chunks * s,) * 2, dtype, "cpu", layout, seed=seed))
    params = [p.detach() for p in make_block_params(chunks, rank, s, out, dtype, "cpu", seed=seed + 1)]
    return {"x": x, "t": t, **dict(zip(MFH_GRADS[2:], params, strict=True))}, BLOCK_SIZE


def _drop_codes(op: str, act, normalize) -> tuple[int, bool, int, int, bool]:
    """(rank, rank_major, activation code, normalisation code, chain) as the op layer sends them."""
    from fusionops.ops._bilinear import ACTIVATION_CODES, NORM_NONE, NORM_PER_CHUNK, NORM_WHOLE_ROW

    if op == "block":
        norm = {"none": NORM_NONE, "before_cat": NORM_PER_CHUNK, "after_cat": NORM_WHOLE_ROW}[normalize]
        return BLOCK_SIZE[1], True, ACTIVATION_CODES[None], norm, False
    k = (MFB_DROP_SIZE if op == "mfb" else MFH_SIZE)[2]
    if op == "mfb":
        return k, False, ACTIVATION_CODES[act], NORM_WHOLE_ROW if normalize else NORM_NONE, False
    return k, False, ACTIVATION_CODES[act], NORM_PER_CHUNK if normalize else NORM_NONE, True


def _drop_kernels(op, leaves, grad, act, normalize, drops, seed=DROP_SEED):
    """y and the eight gradients of the kernels with dropout (None where the leaf is None)."""
    rank, major, act_code, norm, chain = _drop_codes(op, act, normalize)
    args = [leaves[n] for n in MFH_GRADS]
    y = bil.forward(*args, rank, major, act_code, norm, chain, *drops, seed)
    needs = [leaves[n] is not None for n in MFH_GRADS]
    grads = bil.backward(grad, *args[:7], rank, major, act_code, norm, needs, chain, *drops, seed)
    return y, [g if need else None for g, need in zip(grads, needs, strict=True)]


def _drop_reference(op, leaves, act, normalize, drops, seed=DROP_SEED) -> torch.Tensor:
    """The reference's y with the kernels' hashed masks, on ``leaves`` as given (no copy)."""
    from fusionops.reference import bilinear as rb

    x, t, wx, bx, wt, bt, wo, bo = (leaves[n] for n in MFH_GRADS)
    din, dprod, dout = drops
    if op == "mfb":
        first = [None if v is None else v[0] for v in (wx, bx, wt, bt)]
        return rb.mfb(x, t, *first, wo, bo, MFB_DROP_SIZE[2], act, normalize, dropout_input=din,
                      dropout_pre_norm=dprod, dropout_pre_lin=dout, training=True, seed=seed)  # fmt: skip
    if op == "mfh":
        assert dout == 0, "MFH has no dropout on z"
        return rb.mfh(x, t, wx, bx, wt, bt, wo, bo, MFH_SIZE[2], act, normalize, dropout_input=din,
                      dropout_pre_lin=dprod, training=True, seed=seed)  # fmt: skip
    assert din == dprod == 0, "BLOCK drops z only"
    return rb.block_fusion(x, t, wx, bx, wt, bt, wo, bo, BLOCK_SIZE[1], normalize, dropout_pre_lin=dout,
                           training=True, seed=seed)  # fmt: skip


def _drop_reference64(op, leaves, grad, act, normalize, drops):
    """The reference's y and gradients in float64."""
    return _reference64(lambda ins: _drop_reference(op, ins, act, normalize, drops), leaves, grad)


def _check_dropout(op, leaves, act, normalize, drops, dtype, grad_layout="contiguous"):
    """Forward and every gradient like the float64 reference (_assert_like_reference)."""
    n, out = leaves["x"].shape[0], leaves["wo"].shape[0]
    g = make_grad((n, out), dtype, "cpu", grad_layout)
    y, grads = _drop_kernels(op, leaves, g, act, normalize, drops)
    assert y.shape == (n, out) and y.dtype == dtype and y.is_contiguous()
    reference = functools.partial(_drop_reference64, op, grad=g, act=act, normalize=normalize, drops=drops)
    _assert_like_reference(op, y, grads, leaves, dtype, reference, normalize not in (False, "none"))
    return y, grads


def _assert_drop_launches(seen: list[dict], drops, n: int, several_tiles: bool) -> None:
    """Every pooling launch took the DROP_* variant the call asks for; the z site ran on every
    tile's rows (forward and backward: z for dW_o and dL/dz), its row0 the tile's first row."""
    din, dprod, dout = drops
    pools = [s for s in seen if s["kernel"] in _POOL_KERNELS]
    assert pools, "no pooling launch"
    for s in pools:
        assert (s["in"], s["prod"]) == (din > 0, dprod > 0), s
    z = [s["row0"] for s in seen if s["kernel"] == "_drop_kernel"]
    rows0 = sorted({s["row0"] for s in pools})
    assert rows0[0] == 0 and all(r < n for r in rows0)
    assert (len(rows0) > 1) == several_tiles, rows0
    if dout > 0:
        assert sorted(set(z)) == rows0 and len(z) == 3 * len(rows0), z  # fwd; bwd: z and dL/dz
    else:
        assert z == [], z


def _several(cfg: str) -> bool:
    return cfg != "one_tile"


MFB_DROP_CASES = [  # (configuration, sites, dtype, activation, normalize)
    ("tiles16", "in", torch.float32, "relu", False),
    ("gpu", "prod", torch.float64, "tanh", True),
    ("one_tile", "out", torch.float32, "tanh", True),
    ("tiles16", "all", torch.float64, "relu", True),
    ("gpu", "all", torch.float32, None, False),
]


@pytest.mark.parametrize(("drop_cfg", "sites", "dtype", "act", "normalize"), MFB_DROP_CASES, ids=str,
                         indirect=["drop_cfg"])  # fmt: skip
def test_dropout_mfb(drop_cfg, sites, dtype, act, normalize):
    """MFB with each site alone and all together: forward and every gradient."""
    cfg, seen = drop_cfg
    leaves, _ = _drop_leaves("mfb", N_DROP, 1, dtype, seed=len(sites))
    _check_dropout("mfb", leaves, act, normalize, DROP_SITES[sites], dtype)
    _assert_drop_launches(seen, DROP_SITES[sites], N_DROP, _several(cfg))


MFH_DROP_CASES = [  # (configuration, C, sites, dtype, activation, normalize)
    ("gpu", 2, "in", torch.float32, "relu", False),
    ("tiles16", 3, "prod", torch.float64, "tanh", True),
    ("gpu", 3, "chain", torch.float32, "relu", True),
    ("one_tile", 2, "chain", torch.float64, "tanh", False),
    ("tiles16", 1, "chain", torch.float32, "relu", False),
]


@pytest.mark.parametrize(("drop_cfg", "c", "sites", "dtype", "act", "normalize"), MFH_DROP_CASES, ids=str,
                         indirect=["drop_cfg"])  # fmt: skip
def test_dropout_mfh(drop_cfg, c, sites, dtype, act, normalize):
    """MFH (the chain kernels): drop_in, drop_prod (e_c masked before it is pooled and carried
    on) alone and together, 1 to 3 chunks."""
    cfg, seen = drop_cfg
    leaves, _ = _drop_leaves("mfh", N_DROP, c, dtype, seed=c)
    _check_dropout("mfh", leaves, act, normalize, DROP_SITES[sites], dtype)
    _assert_drop_launches(seen, DROP_SITES[sites], N_DROP, _several(cfg))


def test_dropout_mfh_rank_blocks(monkeypatch):
    """A rank wider than the chain kernels' rank block (r0 > 0: the masks' columns of later
    rank blocks), both sites, float64."""
    skip_unless_usable("triton", "cpu", op=OPS["mfb"])
    monkeypatch.setattr(bil, "_CHAIN_R_BLOCK", 1)
    monkeypatch.setattr(bil, "_TILE_BYTES", 1)
    leaves, _ = _drop_leaves("mfh", N_DROP, 2, torch.float64, seed=6)
    _check_dropout("mfh", leaves, "relu", False, DROP_SITES["chain"], torch.float64)


@pytest.mark.parametrize(
    ("drop_cfg", "normalize", "dtype"),
    [("tiles16", "before_cat", torch.float32), ("gpu", "after_cat", torch.float64),
     ("one_tile", "none", torch.float32), ("gpu", "before_cat", torch.float64)],
    ids=str, indirect=["drop_cfg"],
)  # fmt: skip
def test_dropout_block(drop_cfg, normalize, dtype):
    """BLOCK's dropout on z (after n, per chunk or over the whole row, before the output
    projection): the mask's columns are the row's C·S."""
    cfg, seen = drop_cfg
    leaves, _ = _drop_leaves("block", N_DROP, BLOCK_SIZE[0], dtype, seed=3)
    _check_dropout("block", leaves, None, normalize, DROP_SITES["out"], dtype)
    _assert_drop_launches(seen, DROP_SITES["out"], N_DROP, _several(cfg))


@pytest.mark.parametrize(
    ("op", "c", "normalize", "dtype"),
    [
        ("mfb", 1, True, torch.bfloat16),
        ("mfh", 2, True, torch.float16),
        ("block", 3, "after_cat", torch.bfloat16),
    ],
    ids=str,
)
def test_dropout_gpu_config_half(gpu, op, c, normalize, dtype):
    """16-bit at the GPU's configuration (16-bit projections read by the kernels, z masked in
    the input's dtype as the reference's); p = 0.5, so that 1/(1 − p) rounds in no dtype."""
    leaves, _ = _drop_leaves(op, N_DROP, c, dtype, seed=7)
    drops = DROP_SITES["half"] if op == "mfb" else (0.5, 0.5, 0.0) if op == "mfh" else (0.0, 0.0, 0.5)
    _check_dropout(op, leaves, "relu", normalize, drops, dtype)
    assert any(launch["a"] == dtype for launch in gpu) or op == "mfh"


@pytest.mark.parametrize(
    ("drop_cfg", "op", "layout", "grad_layout"),
    [("tiles16", "mfb", "broadcast", "transposed"), ("tiles16", "mfh", "transposed", "broadcast"),
     ("tiles16", "block", "strided", "broadcast")],
    ids=str, indirect=["drop_cfg"],
)  # fmt: skip
def test_dropout_strided_and_broadcast(drop_cfg, op, layout, grad_layout):
    """Stride-0, transposed and strided inputs and upstream gradients, every site of the op on."""
    cfg, seen = drop_cfg
    c = {"mfb": 1, "mfh": 3, "block": BLOCK_SIZE[0]}[op]
    leaves, _ = _drop_leaves(op, N_DROP, c, torch.float64, layout, seed=5)
    drops = {"mfb": DROP_SITES["all"], "mfh": DROP_SITES["chain"], "block": DROP_SITES["out"]}[op]
    _check_dropout(op, leaves, "tanh", op == "block" and "before_cat", drops, torch.float64, grad_layout)
    assert not leaves["x"].is_contiguous()
    _assert_drop_launches(seen, drops, N_DROP, True)


@pytest.mark.parametrize(
    ("drop_cfg", "op", "c"),
    [("tiles16", "mfb", 1), ("gpu", "mfb", 1), ("tiles16", "mfh", 2), ("gpu", "mfh", 2)],
    ids=str, indirect=["drop_cfg"],
)  # fmt: skip
def test_dropout_drops_inf(drop_cfg, op, c):
    """An inf in x that only a dropped element of act(A) reaches: relu, every other product of
    its row negative, so act(A) is inf at one element of chunk 0 (dropped; kept by site B's
    mask) and 0 elsewhere. The
    output is finite (a dropped inf is selected away, not multiplied by 0), the gradients as
    the reference's (dW_x's column of the inf: 0 · inf, NaN in both); without the dropout the
    reference's output is not finite."""
    from fusionops.reference.bilinear import SITE_A, SITE_B, site_seed
    from fusionops.reference.tensor_fusion import dropout_keep

    cfg, seen = drop_cfg
    dtype = torch.float32
    leaves, _ = _drop_leaves(op, N_DROP, c, dtype, seed=9)
    drops = (0.5, 0.0, 0.0)
    row, j = 17, 1  # not in the first tile
    p_cols = leaves["wx"].shape[1]
    cols = torch.arange(p_cols)[None, :]
    keep_a = dropout_keep(site_seed(DROP_SEED, SITE_A), torch.tensor([[row]]), cols, 0.5)[0]
    keep_b = dropout_keep(site_seed(DROP_SEED, SITE_B), torch.tensor([[row]]), cols, 0.5)[0]
    # An element of chunk 0 that site A drops and site B keeps (B's mask on act(A) would keep
    # the inf, and A's on act(B) make inf · 0: the sites' seeds are told apart).
    i0 = int((~keep_a & keep_b).nonzero()[0])
    wx = leaves["wx"].clone()
    wx[:, :, j] = -wx[:, :, j].abs() - 0.1  # x = +inf: every product -inf, relu 0 ...
    wx[0, i0, j] = 0.5  # ... but one: +inf, dropped
    leaves["wx"] = wx
    leaves["x"] = leaves["x"].clone()
    leaves["x"][row, j] = float("inf")
    g = make_grad((N_DROP, leaves["wo"].shape[0]), dtype, "cpu")
    y, grads = _drop_kernels(op, leaves, g, "relu", False, drops)
    ins = {n: v.clone().requires_grad_(True) for n, v in leaves.items()}
    y_ref = _drop_reference(op, ins, "relu", False, drops)
    want = [y_ref, *torch.autograd.grad(y_ref, [ins[n] for n in MFH_GRADS], g)]
    assert torch.isfinite(y).all()
    assert not torch.isfinite(_drop_reference(op, leaves, "relu", False, (0.0, 0.0, 0.0))).all()
    assert torch.isnan(want[MFH_GRADS.index("wx") + 1]).any()  # the inf reached the gradients
    for name, a, e in zip(("y", *MFH_GRADS), [y, *grads], want, strict=True):
        assert_same_nonfinite(a, e.detach(), dtype, f"{op} {name} (x[{row}, {j}] = inf, dropped)")
    _assert_drop_launches(seen, drops, N_DROP, True)


@pytest.mark.parametrize(("op", "c", "sites"), [("mfb", 1, "all"), ("mfh", 3, "chain"), ("block", 3, "out")])
def test_dropout_seed(op, c, sites, monkeypatch):
    """The same seed gives the same bits (forward and backward: every mask regenerated); another
    seed another output; either differs from the output without dropout."""
    skip_unless_usable("triton", "cpu", op=OPS["mfb"])
    monkeypatch.setattr(bil, "_TILE_BYTES", 1)
    leaves, _ = _drop_leaves(op, 21, c, torch.float32, seed=2)
    g = make_grad((21, leaves["wo"].shape[0]), torch.float32, "cpu")
    drops = DROP_SITES[sites]
    norm = "before_cat" if op == "block" else True
    y1, g1 = _drop_kernels(op, leaves, g, "relu", norm, drops, seed=7)
    y2, g2 = _drop_kernels(op, leaves, g, "relu", norm, drops, seed=7)
    y3, g3 = _drop_kernels(op, leaves, g, "relu", norm, drops, seed=8)
    y0, _ = _drop_kernels(op, leaves, g, "relu", norm, (0.0, 0.0, 0.0), seed=7)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert not torch.equal(y1, y3) and not torch.equal(g1[0], g3[0])
    assert not torch.equal(y1, y0) and not torch.equal(y3, y0)


def test_dropout_empty_batch(gpu):
    """N = 0 with every site on: y (0, O), exactly zero parameter gradients, no launch."""
    leaves, _ = _drop_leaves("mfb", 0, 1, torch.float32)
    g = make_grad((0, MFB_DROP_SIZE[4]), torch.float32, "cpu")
    y, grads = _drop_kernels("mfb", leaves, g, "relu", True, DROP_SITES["all"])
    assert y.shape == (0, MFB_DROP_SIZE[4])
    for name, grad in zip(MFH_GRADS, grads, strict=True):
        assert grad.shape == leaves[name].shape, name
        if name not in ("x", "t"):
            assert torch.equal(grad, torch.zeros_like(grad)), name
    assert gpu == []


class _Dropped(torch.autograd.Function):
    """The kernels with dropout as an autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, x, t, wx, bx, wt, bt, wo, bo, op, act, normalize, drops):
        ctx.save_for_backward(x, t, wx, bx, wt, bt, wo)
        ctx.args = (*_drop_codes(op, act, normalize), drops)
        rank, major, act_code, norm, chain, _ = ctx.args
        return bil.forward(
            x, t, wx, bx, wt, bt, wo, bo, rank, major, act_code, norm, chain, *drops, DROP_SEED
        )

    @staticmethod
    def backward(ctx, gy):
        rank, major, act_code, norm, chain, drops = ctx.args
        args = (rank, major, act_code, norm, [True] * 8, chain, *drops, DROP_SEED)
        grads = bil.backward(gy, *ctx.saved_tensors, *args)
        return (*grads, None, None, None, None)


@pytest.mark.parametrize(("op", "c", "act", "normalize", "sites"),
                         [("mfb", 1, "tanh", True, "all"), ("mfh", 3, "tanh", False, "chain")])  # fmt: skip
def test_dropout_gradcheck(monkeypatch, op, c, act, normalize, sites):
    """float64 gradcheck (fast mode: the interpreter is slow) with every site of the op on, in
    tiles of 16 rows (one partial): backward's regenerated masks are forward's."""
    skip_unless_usable("triton", "cpu", op=OPS["mfb"])
    monkeypatch.setattr(bil, "_TILE_BYTES", 1)
    leaves, _ = _drop_leaves(op, 17, c, torch.float64, seed=4)
    ins = [leaves[n].requires_grad_(True) for n in MFH_GRADS]
    drops = DROP_SITES[sites]
    assert torch.autograd.gradcheck(
        lambda *a: _Dropped.apply(*a, op, act, normalize, drops), ins, fast_mode=True
    )
