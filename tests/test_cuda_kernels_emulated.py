"""The plain CUDA kernels (csrc/cuda/kernels/*.cu) run on the CPU against the float64
reference, on a machine without a GPU.

The kernel sources are compiled by g++ with the shim of tests/cuda_emulation (every CUDA thread
of a block is an OS thread, __syncthreads a barrier, __shared__ a static; the test rewrites each
``kernel<<<grid, block, 0, stream>>>(args)`` into ``emu::launch``) and called through ctypes
the way the torch bindings (csrc/cuda/*.cpp) call them: outputs NaN-filled so an unwritten
element shows, factor and rank-weight gradients as compute-type zeros. The chunk budget of the
tensor-fusion and low-rank kernels is shrunk so that these small problems span many chunks.

This checks indexing, strides (stride 0 included), masks (NaN in missing rows), chunking and
the arithmetic; not warps, the GPU memory model, the real half-precision intrinsics or speed.
The GPU runs of the kernel tests (tests/test_*_kernels.py, backend "cuda") remain the real check.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch

from fusionops import reference as ref

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "cuda", "kernels")
EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")

LAUNCH = re.compile(r"([\w:]+(?:<[^;{}]*?>)?)<<<(.*?)>>>\((.*?)\);", re.S)
WORKSPACE = "int64_t{1} << 22"  # the chunk budget in tensor_fusion / low_rank_fusion kernels
SMALL_WORKSPACE = "int64_t{100}"


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "(<"
        depth -= ch in ")>"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _rewrite(text: str) -> str:
    def launch(m: re.Match) -> str:
        grid, block = _split_top(m.group(2))[:2]
        return f"emu::launch(dim3({grid}), dim3({block}), [=]() {{ {m.group(1)}({m.group(3)}); }});"

    return LAUNCH.sub(launch, text)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    out = tmp_path_factory.mktemp("cuda_emulation")
    sources = [os.path.join(EMULATION, "wrap.cpp")]
    for name in sorted(os.listdir(KERNELS)):
        with open(os.path.join(KERNELS, name)) as f:
            text = f.read()
        if name.endswith((".cu", ".cuh")):
            text = _rewrite(text)
            assert "<<<" not in text, f"{name}: a launch the emulation did not rewrite"
        if name in ("tensor_fusion_kernels.cu", "low_rank_fusion_kernels.cu"):
            assert WORKSPACE in text, f"{name}: its chunk budget moved; update WORKSPACE here"
            text = text.replace(WORKSPACE, SMALL_WORKSPACE)
        target = out / (name[: -len(".cu")] + ".cpp" if name.endswith(".cu") else name)
        target.write_text(text)
        if name.endswith(".cu"):
            sources.append(str(target))
    flags = [
        "-std=c++20",
        "-O1",
        "-fPIC",
        "-pthread",
        "-Wno-unknown-pragmas",
        f"-I{EMULATION}/include",
        f"-I{out}",
    ]
    jobs = [
        (
            s,
            subprocess.Popen(
                ["g++", *flags, "-c", s, "-o", f"{out}/{i}.o"],
                stdout=subprocess.PIPE,
                text=True,
                stderr=subprocess.STDOUT,
            ),
        )
        for i, s in enumerate(sources)
    ]
    for source, job in jobs:
        log, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"{source}:\n{log[-4000:]}"
    so = out / "libemulated.so"
    objs = [f"{out}/{i}.o" for i in range(len(sources))]
    subprocess.run(["g++", "-shared", "-pthread", *objs, "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    for fn in ("tf_ff", "tf_fb", "tf_pf", "tf_pb", "lmf_f", "lmf_b", "pf_f", "pf_b"):
        getattr(lib, fn).restype = ctypes.c_int
    lib.tf_pb_ws.restype = ctypes.c_int64
    lib.lmf_ws.restype = ctypes.c_int64
    return lib


DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# Relative tolerances against float64 (as conftest.TOL): float32 accumulation, half rounding.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 4 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,
}
P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _acc(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def _arr(kind, values):
    return (kind * max(1, len(values)))(*values)


def _ptr(t):
    return P(t.data_ptr() if t is not None else None)


def _ptrs(ts):
    return _arr(P, [t.data_ptr() for t in ts])


def _modalities(xs, mask):
    return [
        INT(len(xs)),
        I64(xs[0].shape[0]),
        _ptrs(xs),
        _arr(I64, [x.stride(0) for x in xs]),
        _arr(I64, [x.stride(1) for x in xs]),
        _arr(I64, [x.shape[1] for x in xs]),
        _ptr(mask),
        I64(mask.stride(0) if mask is not None else 0),
        I64(mask.stride(1) if mask is not None else 0),
    ]


def _factors(fs):
    return [
        _ptrs(fs),
        _arr(I64, [f.stride(0) for f in fs]),
        _arr(I64, [f.stride(1) for f in fs]),
        _arr(I64, [f.stride(2) for f in fs]),
        I64(fs[0].shape[0]),
        I64(fs[0].shape[2]),
    ]


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _close(actual, expected, dt, what):
    a, e = actual.to(torch.float64), expected.to(torch.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert not torch.isnan(a).any(), f"{what}: NaN (an element left unwritten, or a masked NaN multiplied)"
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(
        a, e, rtol=TOL[dt], atol=TOL[dt] * scale + 1e-300, msg=lambda m: f"{what}: {m}"
    )


def _layout(t, kind):
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "strided":
        big = torch.zeros(t.shape[0], 3 * t.shape[1], dtype=t.dtype)
        big[:, ::3] = t
        return big[:, ::3]
    assert kind == "broadcast"  # stride-0 rows
    return t[:1].expand_as(t) if t.shape[0] else t


def _inputs(dims, n, dt, kind, masked, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [_layout(torch.randn(n, d, generator=g, dtype=torch.float64).to(dt), kind) for d in dims]
    mask = None
    if masked:
        mask = (torch.rand(n, len(dims), generator=g) > 0.35).t().contiguous().t()
        for m, x in enumerate(xs):
            if x.stride(0) != 0:  # NaN where missing: must be selected away, never multiplied
                x.masked_fill_(~mask[:, m, None], float("nan"))
    ref_xs = []
    for m, x in enumerate(xs):
        r = x.to(torch.float64).clone()
        if mask is not None:
            r = torch.where(mask[:, m, None], r, torch.zeros_like(r))
        ref_xs.append(r.requires_grad_())
    return xs, mask, ref_xs


def _grad(shape, dt, kind, seed):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dt)
    return _layout(g, kind)


def _expected_dx(grads, ref_xs, mask):
    out = []
    for m, r in enumerate(ref_xs):
        e = grads[m] if grads[m] is not None else torch.zeros_like(r)
        out.append(e if mask is None else torch.where(mask[:, m, None], e, torch.zeros_like(e)))
    return out


# (dims, N, input layout, grad layout, masked)
CASES = [
    ((3, 1, 4), 37, "contiguous", "contiguous", False),
    ((3, 1, 4), 37, "transposed", "broadcast", True),
    ((5,), 9, "strided", "transposed", True),
    ((2, 3), 70, "broadcast", "contiguous", False),
    ((1,) * 8, 5, "contiguous", "transposed", True),
    ((2, 2), 0, "contiguous", "contiguous", True),
]
HALF_CASES = [CASES[1], CASES[4]]
PARAMS = [(dt, c) for dt in (torch.float64, torch.float32) for c in CASES] + [
    (dt, c) for dt in (torch.float16, torch.bfloat16) for c in HALF_CASES
]
IDS = [
    f"{str(dt)[6:]}-{'x'.join(map(str, c[0]))}-N{c[1]}-{c[2]}-{c[3]}{'-mask' if c[4] else ''}"
    for dt, c in PARAMS
]


@pytest.mark.parametrize(("dt", "case"), PARAMS, ids=IDS)
def test_tensor_fusion_kernels(lib, dt, case):
    dims, n, kind, gkind, masked = case
    o = 7
    xs, mask, rx = _inputs(dims, n, dt, kind, masked, 0)
    mods = _modalities(xs, mask)
    k = 1
    for d in dims:
        k *= d + 1

    z = _nan(n, k, dtype=dt)
    assert lib.tf_ff(INT(DT[dt]), *mods, _ptr(z)) == 0
    ez = ref.tensor_fusion(rx, None, None, mask)
    _close(z, ez, dt, "features forward")
    gz = _grad((n, k), dt, gkind, 1)
    dx = [_nan(n, d, dtype=dt) for d in dims]
    assert lib.tf_fb(INT(DT[dt]), _ptr(gz), I64(gz.stride(0)), I64(gz.stride(1)), *mods, _ptrs(dx)) == 0
    for m, e in enumerate(
        _expected_dx(torch.autograd.grad(ez, rx, gz.double(), allow_unused=True), rx, mask)
    ):
        _close(dx[m], e, dt, f"features dx[{m}]")

    g = torch.Generator().manual_seed(2)
    w = (torch.randn(k, o, generator=g, dtype=torch.float64) / k**0.5).to(dt).t()  # (O, K), transposed
    b = torch.randn(2 * o, generator=g, dtype=torch.float64).to(dt)[::2]
    y = _nan(n, o, dtype=dt)
    w_args = [_ptr(w), I64(w.stride(0)), I64(w.stride(1)), I64(o)]
    assert lib.tf_pf(INT(DT[dt]), *mods, *w_args, _ptr(b), I64(b.stride(0)), _ptr(y)) == 0
    rw, rb = w.double().clone().requires_grad_(), b.double().clone().requires_grad_()
    ey = ref.tensor_fusion(rx, rw, rb, mask)
    _close(y, ey, dt, "projected forward")

    gy = _grad((n, o), dt, gkind, 3)
    elems = lib.tf_pb_ws(*mods)
    ws = _nan(elems, dtype=_acc(dt))
    dx = [_nan(n, d, dtype=dt) for d in dims]
    dw, db = _nan(o, k, dtype=dt), _nan(o, dtype=dt)
    g_args = [_ptr(gy), I64(gy.stride(0)), I64(gy.stride(1))]
    rc = lib.tf_pb(INT(DT[dt]), *g_args, *mods, *w_args, _ptrs(dx), _ptr(dw), _ptr(db), _ptr(ws), I64(elems))
    assert rc == 0
    grads = torch.autograd.grad(ey, [*rx, rw, rb], gy.double(), allow_unused=True)
    for m, e in enumerate(_expected_dx(grads, rx, mask)):
        _close(dx[m], e, dt, f"projected dx[{m}]")
    _close(dw, grads[-2], dt, "dW")
    _close(db, grads[-1], dt, "db")


@pytest.mark.parametrize(("dt", "case"), PARAMS, ids=IDS)
def test_low_rank_fusion_kernels(lib, dt, case):
    dims, n, kind, gkind, masked = case
    r, o = 3, 5
    xs, mask, rx = _inputs(dims, n, dt, kind, masked, 0)
    mods = _modalities(xs, mask)
    g = torch.Generator().manual_seed(5)
    # (R, d_m + 1, O) with permuted strides; rank_weight with stride 2
    fs = [torch.randn(o, d + 1, r, generator=g, dtype=torch.float64).to(dt).permute(2, 1, 0) for d in dims]
    w = torch.randn(2 * r, generator=g, dtype=torch.float64).to(dt)[::2]
    b = torch.randn(o, generator=g, dtype=torch.float64).to(dt)
    facs = _factors(fs)
    elems = lib.lmf_ws(*mods, *facs)

    y = _nan(n, o, dtype=dt)
    ws = _nan(elems, dtype=_acc(dt))
    rc = lib.lmf_f(
        INT(DT[dt]), *mods, *facs, _ptr(w), I64(w.stride(0)), _ptr(b), I64(1), _ptr(y), _ptr(ws), I64(elems)
    )
    assert rc == 0
    rf = [f.double().clone().requires_grad_() for f in fs]
    rw, rb = w.double().clone().requires_grad_(), b.double().clone().requires_grad_()
    ey = ref.low_rank_fusion(rx, rf, rw, rb, mask)
    _close(y, ey, dt, "forward")

    gy = _grad((n, o), dt, gkind, 6)
    dx = [_nan(n, d, dtype=dt) for d in dims]
    dfs = [torch.zeros(r, d + 1, o, dtype=_acc(dt)) for d in dims]
    dw, db = torch.zeros(r, dtype=_acc(dt)), _nan(o, dtype=dt)
    ws = _nan(elems, dtype=_acc(dt))
    g_args = [_ptr(gy), I64(gy.stride(0)), I64(gy.stride(1))]
    rc = lib.lmf_b(
        INT(DT[dt]),
        *g_args,
        *mods,
        *facs,
        _ptr(w),
        I64(w.stride(0)),
        _ptrs(dx),
        _ptrs(dfs),
        _ptr(dw),
        _ptr(db),
        _ptr(ws),
        I64(elems),
    )
    assert rc == 0
    grads = torch.autograd.grad(ey, [*rx, *rf, rw, rb], gy.double(), allow_unused=True)
    mm = len(dims)
    for m, e in enumerate(_expected_dx(grads, rx, mask)):
        _close(dx[m], e, dt, f"dx[{m}]")
        _close(dfs[m].to(dt), grads[mm + m], dt, f"dfactors[{m}]")
    _close(dw.to(dt), grads[2 * mm], dt, "d rank_weight")
    _close(db, grads[2 * mm + 1], dt, "dbias")


def test_tiles_beyond_one_gemm_tile(lib):
    """K, O, R·O and d_m + 1 past the GEMM tiles (64 wide, 16 deep), float64."""
    dims, n = (9, 8), 70
    xs, mask, rx = _inputs(dims, n, torch.float64, "transposed", True, 9)
    mods = _modalities(xs, mask)
    o, k = 65, 90
    w = torch.randn(o, k, dtype=torch.float64) / k**0.5
    y = _nan(n, o, dtype=torch.float64)
    assert (
        lib.tf_pf(
            INT(1), *mods, _ptr(w), I64(w.stride(0)), I64(w.stride(1)), I64(o), P(None), I64(0), _ptr(y)
        )
        == 0
    )
    _close(y, ref.tensor_fusion(rx, w, None, mask), torch.float64, "projected forward, 2 x 2 tiles")

    dims, n, r, o = (40, 70), 66, 5, 70
    xs, mask, rx = _inputs(dims, n, torch.float64, "contiguous", True, 8)
    mods = _modalities(xs, mask)
    fs = [torch.randn(r, d + 1, o, dtype=torch.float64) for d in dims]
    rw = torch.randn(r, dtype=torch.float64)
    elems = lib.lmf_ws(*mods, *_factors(fs))
    y, ws = _nan(n, o, dtype=torch.float64), _nan(elems, dtype=torch.float64)
    rc = lib.lmf_f(
        INT(1), *mods, *_factors(fs), _ptr(rw), I64(1), P(None), I64(0), _ptr(y), _ptr(ws), I64(elems)
    )
    assert rc == 0
    _close(y, ref.low_rank_fusion(rx, fs, rw, None, mask), torch.float64, "low-rank forward, wide tiles")


@pytest.mark.parametrize("dt", list(DT), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    ("m", "n", "d", "kind", "gkind"),
    [
        (1, 5, 7, "contiguous", "contiguous"),
        (3, 33, 9, "transposed", "broadcast"),
        (8, 4, 300, "strided", "transposed"),
    ],
)
def test_product_fusion_kernels(lib, dt, m, n, d, kind, gkind):
    g = torch.Generator().manual_seed(m)
    xs = [_layout(torch.randn(n, d, generator=g, dtype=torch.float64).to(dt), kind) for _ in range(m)]
    xs[0] = xs[0].clone()
    xs[0][0, 0] = 0  # zeros are fine: no division
    args = [
        _ptrs(xs),
        _arr(I64, [x.stride(0) for x in xs]),
        _arr(I64, [x.stride(1) for x in xs]),
        I64(n),
        I64(d),
    ]
    p = _nan(n, d, dtype=dt)
    assert lib.pf_f(INT(DT[dt]), INT(m), *args, _ptr(p)) == 0
    rx = [x.double().clone().requires_grad_() for x in xs]
    ep = ref.product_fusion(rx)
    _close(p, ep, dt, "forward")
    gp = _grad((n, d), dt, gkind, 1)
    dx = [_nan(n, d, dtype=dt) for _ in xs]
    assert (
        lib.pf_b(INT(DT[dt]), INT(m), _ptr(gp), I64(gp.stride(0)), I64(gp.stride(1)), *args, _ptrs(dx)) == 0
    )
    for i, e in enumerate(torch.autograd.grad(ep, rx, gp.double())):
        _close(dx[i], e, dt, f"dx[{i}]")
