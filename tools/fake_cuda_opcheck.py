"""Checks of the CUDA build that need no GPU (issue 17, item 4), run by ``.ci/cuda_torch_build``
against a CUDA build of torch (it also runs with ``--device cpu`` on a CPU torch, as a self-test).

1. **registration**: ``fusionops._C`` imports, was built with CUDA, every compiled kernel of
   an op with CUDA C++ kernels has a CUDA implementation in the dispatcher, and the C++ eager
   ops (``EAGER_OPS``) have their CPU, CUDA and Autograd ones.
2. **fake kernels vs. a real run**: every registered op (forward and backward custom ops, every
   backend that serves the device and the call; the ops of ``DEVICE_OPS``, which take no
   backend, on the device's kernel) is run under ``FakeTensorMode`` on fake tensors of
   ``--device`` and its output metadata (shape, dtype, strides, device) is compared with a real
   CPU run of the same op (what opcheck's ``test_faketensor`` compares, except that the real
   run is on CPU: a real CUDA run needs a GPU). Note: ``torch.library.opcheck`` itself skips its
   fake check when the inputs are already fake, so calling it on fake CUDA tensors proves
   nothing; this script does not count that as a check.
3. **tracing**: every public function under ``FakeTensorMode`` on fake ``--device`` tensors,
   as it is and through its custom op (what torch.compile takes): the forward, and on CPU (or
   with a GPU) the backward through autograd (the engine needs a CUDA context for CUDA
   tensors, fake ones too). Failures listed in ``KNOWN_TRACE_FAILURES``
   are reported as KNOWN (with the issue that tracks them) instead of failing the run.

Exit status: 0 when every check passed (or failed as known), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback
from collections.abc import Callable

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusionops  # noqa: E402
from fusionops import _extension  # noqa: E402
from fusionops.registry import OPS  # noqa: E402

# Public functions known not to trace under FakeTensorMode yet, and why (none: fake inputs go
# through the custom ops, fusionops/ops/_eager.traced).
KNOWN_TRACE_FAILURES: dict[str, str] = {}

# The ops of fusionops._C that eager calls take, and the op they serve: no backend argument,
# the dispatcher picks the device's kernel. The C++ eager op of tensor fusion's projection and
# the backward kernel that its C++ autograd calls (csrc/cpu/eager_autograd.cpp).
DEVICE_OPS = {"_tf_projected_eager": "tensor_fusion", "_tf_projected_bwd": "tensor_fusion"}
# The C++ eager ops: CPU, CUDA and Autograd kernels, in every build.
EAGER_OPS = ("_tf_projected_eager",)

OPS_NS = torch.ops.fusionops
RESULTS: list[tuple[str, str, str]] = []  # (check, status, detail)


def record(check: str, ok: bool | None, detail: str = "") -> None:
    status = "PASS" if ok else "FAIL" if ok is False else "KNOWN"
    RESULTS.append((check, status, detail))
    print(f"{status:5} {check}{(': ' + detail) if detail else ''}", flush=True)


def _randn(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN, dtype=torch.float64).to(dtype)


GEN = torch.Generator().manual_seed(0)


# --- the cases: (op overload packet, args builder taking the backend) ---------------------------
# A builder returns None for a backend that cannot serve the call (the CUDA C++ kernels have no
# dropout on Z: tensor fusion sends such calls to triton).


def _cases(dtype: torch.dtype) -> list[tuple[str, Callable[[str], tuple | None]]]:
    dims, n = (2, 3, 4), 5
    xs = [_randn(n, d, dtype=dtype) for d in dims]
    k = math.prod(d + 1 for d in dims)
    w, b = _randn(4, k, dtype=dtype), _randn(4, dtype=dtype)
    mask = torch.rand(n, 3, generator=GEN) > 0.3
    gz, gy = _randn(n, k, dtype=dtype), _randn(n, 4, dtype=dtype)
    factors = [_randn(3, d + 1, 4, dtype=dtype) for d in dims]
    rw = _randn(3, dtype=dtype)
    same = [_randn(n, 6, dtype=dtype) for _ in range(3)]
    ha, hb = _randn(n, 3, 6, dtype=dtype), _randn(n, 4, 6, dtype=dtype)
    ws = [_randn(6, 6, dtype=dtype) for _ in range(4)]
    bs = [_randn(6, dtype=dtype) for _ in range(4)]
    pairs = torch.tensor([[2, 0], [0, 3], [1, 1]])
    gs = _randn(n, 3, 6, dtype=dtype)
    xa, xb = (
        [_randn(5, 3, dtype=dtype), _randn(5, 2, dtype=dtype)],
        [_randn(4, 3, dtype=dtype), _randn(4, 2, dtype=dtype)],
    )
    beta, params = _randn(2, dtype=dtype).abs(), torch.tensor([0.5, 1.5])  # params: float32 always
    gk = _randn(5, 4, dtype=dtype)
    # MFB: d_x = 3, d_t = 4, k = 2, o = 3, O = 4; BLOCK: m = 6 in C = 2 chunks of s = 3, R = 2
    # (and MUTAN: one chunk of 6, R = 2).
    bx, bt = _randn(n, 3, dtype=dtype), _randn(n, 4, dtype=dtype)
    uw, ub, vw, vb = (
        _randn(6, 3, dtype=dtype),
        _randn(6, dtype=dtype),
        _randn(6, 4, dtype=dtype),
        _randn(6, dtype=dtype),
    )
    ow3 = _randn(4, 3, dtype=dtype)
    mx, mt = same[0], same[1]
    mw0, mb0, mw1, mb1 = (
        _randn(2, 6, 3, dtype=dtype),
        _randn(2, 6, dtype=dtype),
        _randn(2, 6, 3, dtype=dtype),
        _randn(2, 6, dtype=dtype),
    )
    mutan0, mutan1 = _randn(1, 12, 6, dtype=dtype), _randn(1, 12, 6, dtype=dtype)
    ow6 = _randn(4, 6, dtype=dtype)
    # MFH: x, t and O as MFB's; p = 2 blocks of k = 2, o = 3 (and p = 3 of k = 1, o = 2), so
    # out_weight is (4, p·o = 6) in both.
    hw0, hb0, hw1, hb1 = (
        _randn(2, 6, 3, dtype=dtype),
        _randn(2, 6, dtype=dtype),
        _randn(2, 6, 4, dtype=dtype),
        _randn(2, 6, dtype=dtype),
    )
    hw0_3, hw1_3, hb1_3 = (
        _randn(3, 2, 3, dtype=dtype),
        _randn(3, 2, 4, dtype=dtype),
        _randn(3, 2, dtype=dtype),
    )
    needs_some = [True, False, True, True, False, True, True, False]
    drop = (0.3, 1)  # dropout on Z, seed

    def no_cuda(args: tuple) -> Callable[[str], tuple | None]:
        return lambda be: None if be == "cuda" else (*args[:-1], be, *args[-1])

    return [
        ("tensor_fusion_features", lambda be: (xs, mask, be)),
        ("tensor_fusion_features_backward", lambda be: (gz, xs, mask, be)),
        ("tensor_fusion_projected", lambda be: (xs, w, b, mask, be)),
        ("tensor_fusion_projected", lambda be: (xs, w, None, None, be)),
        ("tensor_fusion_projected_backward", lambda be: (gy, xs, w, mask, True, True, True, be)),
        ("tensor_fusion_projected_backward", lambda be: (gy, xs, w, None, False, True, False, be)),
        ("low_rank_fusion", lambda be: (xs, factors, rw, b, mask, be)),
        ("low_rank_fusion_backward", lambda be: (gy, xs, factors, rw, mask, True, True, True, True, be)),
        ("product_fusion", lambda be: (same, be)),
        ("product_fusion_backward", lambda be: (same[0], same, be)),
        ("skew_pair_attention", lambda be: (ha, hb, pairs, *ws, *bs, 2, 1, be)),
        ("skew_pair_attention", lambda be: (ha, hb, pairs, *ws, None, None, None, None, 3, 0, be)),
        ("skew_pair_attention_backward", lambda be: (gs, ha, hb, pairs, *ws, *bs[:3], 2, 1, [True] * 10, be)),
        ("multiple_kernel", lambda be: (xa, xb, beta, [1, 2], params, [0, 2], be)),
        ("multiple_kernel_backward", lambda be: (gk, xa, xb, beta, [1, 2], params, [0, 2], [True] * 4, be)),
        ("tensor_fusion_projected", no_cuda((xs, w, b, mask, drop))),
        ("tensor_fusion_projected", no_cuda((xs, w, None, None, drop))),
        ("tensor_fusion_projected_backward", no_cuda((gy, xs, w, mask, True, True, True, drop))),
        ("tensor_fusion_projected_backward", no_cuda((gy, xs, w, None, True, False, True, drop))),
        ("_tf_projected_eager", lambda be: (xs, w, b, mask)),
        ("_tf_projected_eager", lambda be: (xs, w, None, None)),
        ("_tf_projected_eager", lambda be: None if be == "cuda" else (xs, w, b, mask, *drop)),
        ("_tf_projected_bwd", lambda be: (gy, xs, w, mask, True, True, True)),
        ("_tf_projected_bwd", lambda be: (gy, xs, w, None, False, True, False)),
        (
            "_tf_projected_bwd",
            lambda be: None if be == "cuda" else (gy, xs, w, mask, True, True, True, *drop),
        ),
        ("mfb", lambda be: (bx, bt, uw, ub, vw, vb, ow3, b, 2, "relu", False, be)),
        ("mfb", lambda be: (bx, bt, uw, None, vw, None, ow6, None, 1, "tanh", True, be)),
        ("mfb_backward", lambda be: (gy, bx, bt, uw, ub, vw, vb, ow3, 2, "relu", True, [True] * 8, be)),
        ("mfb_backward", lambda be: (gy, bx, bt, uw, None, vw, vb, ow3, 2, "none", False, needs_some, be)),
        ("mfh", lambda be: (bx, bt, hw0, hb0, hw1, hb1, ow6, b, 2, "relu", False, be)),
        ("mfh", lambda be: (bx, bt, hw0_3, None, hw1_3, None, ow6, None, 1, "tanh", True, be)),
        ("mfh_backward", lambda be: (gy, bx, bt, hw0, hb0, hw1, hb1, ow6, 2, "relu", True, [True] * 8, be)),
        (
            "mfh_backward",
            lambda be: (gy, bx, bt, hw0_3, None, hw1_3, hb1_3, ow6, 1, "none", False, needs_some, be),
        ),
        ("block_fusion", lambda be: (mx, mt, mw0, mb0, mw1, mb1, ow6, b, 2, "before_cat", be)),
        ("block_fusion", lambda be: (mx, mt, mutan0, None, mutan1, None, ow6, None, 2, "after_cat", be)),
        (
            "block_fusion_backward",
            lambda be: (gy, mx, mt, mw0, mb0, mw1, mb1, ow6, 2, "none", [True] * 8, be),
        ),
        (
            "block_fusion_backward",
            lambda be: (gy, mx, mt, mutan0, None, mutan1, None, ow6, 2, "before_cat", needs_some, be),
        ),
    ]


def _op_def(name: str):
    if name in DEVICE_OPS:
        return OPS[DEVICE_OPS[name]]
    return OPS[name.removesuffix("_backward").replace("_features", "").replace("_projected", "")]


def _meta(t: object) -> object:
    if isinstance(t, torch.Tensor):
        return (tuple(t.shape), t.dtype, tuple(t.stride()) if t.numel() else None)
    return t


def check_registration(device: str) -> None:
    ok = _extension.extension_loaded()
    record("fusionops._C imports", ok, _extension.extension_error() or "")
    if not ok or device != "cuda":
        return
    record("fusionops._C built with CUDA", _extension.extension_built_with_cuda())
    for op in OPS.values():
        if not op.cuda_kernels:
            continue
        for kernel in op.kernels:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fusionops::{kernel}", "CUDA")
            record(f"CUDA kernel registered: fusionops::{kernel}", has)
    for name in EAGER_OPS:
        for key in ("CPU", "CUDA", "Autograd"):
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fusionops::{name}", key)
            record(f"{key} kernel registered: fusionops::{name}", has)


def check_fake_kernels(device: str) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for name, make in _cases(dtype):
            op = getattr(OPS_NS, name)
            backends = ["triton"] + (["cuda"] if _op_def(name).cuda_kernels else [])
            if device == "cpu" or name in DEVICE_OPS:  # no backend argument: the device's kernel
                backends = [device]
            try:
                real = op(*make("cpu"))
            except Exception as exc:  # noqa: BLE001
                record(f"real {name} [cpu, {dtype}]", False, f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            for backend in backends:
                if make(backend) is None:  # the backend cannot serve this call
                    continue
                label = f"fake {name} [{backend}, {str(dtype).removeprefix('torch.')}, {device}]"
                try:
                    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
                        args = pytree.tree_map_only(
                            torch.Tensor, lambda t, m=mode: m.from_tensor(t).to(device), make(backend)
                        )
                        fake = op(*args)
                    real_meta = [_meta(t) for t in pytree.tree_leaves(real)]
                    fake_meta = [_meta(t) for t in pytree.tree_leaves(fake)]
                    devices = {t.device.type for t in pytree.tree_leaves(fake) if isinstance(t, torch.Tensor)}
                    same = real_meta == fake_meta and devices <= {device}
                    record(label, same, "" if same else f"real {real_meta} vs fake {fake_meta} on {devices}")
                except Exception as exc:  # noqa: BLE001 - every failure is reported
                    record(label, False, f"{type(exc).__name__}: {str(exc)[:300]}")


def _public_calls(dtype: torch.dtype) -> list[tuple[str, Callable[[], list[torch.Tensor]]]]:
    """(op, fn) pairs: fn runs the public function on fresh fake inputs and returns the leaves
    whose gradients backward must produce (run inside FakeTensorMode on ``device``)."""

    def leaf(*shape: int) -> torch.Tensor:
        # empty: fake tensors hold no values (randn would ask the CUDA generator for a seed)
        return torch.empty(*shape, device=DEVICE, dtype=dtype).requires_grad_(True)

    def tf():
        xs, w, b = [leaf(5, d) for d in (2, 3, 4)], leaf(4, 60), leaf(4)
        return fusionops.tensor_fusion(xs, w, b), [*xs, w, b]

    def tf_dropout(seed: int | None, projected: bool = True):
        def run():
            xs, w, b = [leaf(5, d) for d in (2, 3, 4)], leaf(4, 60), leaf(4)
            if not projected:
                return fusionops.tensor_fusion(xs, dropout=0.3, seed=seed), xs
            return fusionops.tensor_fusion(xs, w, b, dropout=0.3, seed=seed), [*xs, w, b]

        return run

    def mfb():
        shapes = [(5, 3), (5, 4), (6, 3), (6,), (6, 4), (6,), (4, 3), (4,)]  # k = 2, o = 3, O = 4
        x, t, uw, ub, vw, vb, ow, ob = (leaf(*s) for s in shapes)
        return fusionops.mfb(x, t, uw, ub, vw, vb, ow, ob, factor=2), [x, t, uw, ub, vw, vb, ow, ob]

    def mfh():
        shapes = [(5, 3), (5, 4), (2, 6, 3), (2, 6), (2, 6, 4), (2, 6), (4, 6), (4,)]  # p = 2, k = 2, o = 3
        x, t, uw, ub, vw, vb, ow, ob = (leaf(*s) for s in shapes)
        return fusionops.mfh(x, t, uw, ub, vw, vb, ow, ob, factor=2), [x, t, uw, ub, vw, vb, ow, ob]

    def block():
        x, t, ow, ob = leaf(2, 5, 6), leaf(2, 5, 6), leaf(4, 6), leaf(4)
        w0, b0, w1, b1 = leaf(2, 6, 3), leaf(2, 6), leaf(2, 6, 3), leaf(2, 6)
        return fusionops.block_fusion(x, t, w0, b0, w1, b1, ow, ob, rank=2), [x, t, w0, b0, w1, b1, ow, ob]

    def lmf():
        xs, fs, rw = [leaf(5, d) for d in (2, 3, 4)], [leaf(3, d + 1, 4) for d in (2, 3, 4)], leaf(3)
        return fusionops.low_rank_fusion(xs, fs, rw, leaf(4)), [*xs, *fs, rw]

    def prod():
        xs = [leaf(5, 6) for _ in range(3)]
        return fusionops.product_fusion(xs), xs

    def skew(pairs):
        def run():
            ha, hb, ws = leaf(5, 3, 6), leaf(5, 4, 6), [leaf(6, 6) for _ in range(4)]
            p = pairs() if callable(pairs) else pairs
            return fusionops.skew_pair_attention(ha, hb, p, *ws, heads=2, window=1), [ha, hb, *ws]

        return run

    def mkl():
        xa, xb = [leaf(5, 3), leaf(5, 2)], [leaf(4, 3), leaf(4, 2)]
        beta = torch.empty(2, device=DEVICE, dtype=dtype).requires_grad_(True)
        kernels = [fusionops.BaseKernel("rbf", gamma=0.5), fusionops.BaseKernel("linear")]
        return fusionops.multiple_kernel(xa, xb, beta, kernels), [*xa, *xb, beta]

    return [
        ("tensor_fusion", tf),
        ("low_rank_fusion", lmf),
        ("product_fusion", prod),
        ("skew_pair_attention (pairs as a list)", skew([(2, 0), (0, 3), (1, 1)])),
        (
            "skew_pair_attention (pairs as a tensor)",
            skew(lambda: torch.tensor([[2, 0], [0, 3], [1, 1]], device=DEVICE)),
        ),
        ("multiple_kernel", mkl),
        ("tensor_fusion (dropout 0.3, seed 1)", tf_dropout(1)),
        ("tensor_fusion (dropout 0.3, seed drawn)", tf_dropout(None)),
        ("tensor_fusion features (dropout 0.3, seed 1)", tf_dropout(1, projected=False)),
        ("mfb", mfb),
        ("mfh", mfh),
        ("block_fusion (leading shape (2, 5))", block),
    ]


DEVICE = "cuda"


@contextlib.contextmanager
def _through_custom_ops():
    """The public functions take their custom-op path (as under torch.compile): what they would
    do under FakeTensorMode with the change proposed for fusionops/ops (route fake inputs to
    torch.ops.fusionops.<op>, whose fake kernels and autograd are registered)."""
    saved = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        yield
    finally:
        torch.compiler.is_compiling = saved


def check_tracing(device: str) -> None:
    for route in ("as is", "through the custom ops"):
        for dtype in (torch.float32, torch.bfloat16):
            for name, fn in _public_calls(dtype):
                # The autograd engine needs a CUDA context for CUDA tensors, fake ones too: without
                # a GPU only the forward is traced there (the backward custom ops' fake kernels
                # are checked above).
                backward = device == "cpu" or torch.cuda.is_available()
                what = "fwd+bwd" if backward else "fwd"
                label = f"trace {name} {what} [{route}, {str(dtype).removeprefix('torch.')}, {device}]"
                try:
                    path = _through_custom_ops() if route != "as is" else contextlib.nullcontext()
                    with FakeTensorMode(), path:
                        out, leaves = fn()
                        assert out.device.type == device, out.device
                        if backward:
                            out.sum().backward()
                            missing = [i for i, t in enumerate(leaves) if t.grad is None]
                            assert not missing, f"no gradient for leaves {missing}"
                    record(label, True)
                except Exception as exc:  # noqa: BLE001
                    tag = f"{name} [{route}]"
                    known = next((v for k, v in KNOWN_TRACE_FAILURES.items() if tag.startswith(k)), None)
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    first = str(exc).splitlines()[0][:200] if str(exc) else ""
                    detail = f"{type(exc).__name__}: {first} (at {where.filename}:{where.lineno})"
                    record(label, None if known else False, detail + (f" [known: {known}]" if known else ""))


def main() -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    DEVICE = args.device
    print(
        f"torch {torch.__version__} (cuda {torch.version.cuda}, GPU available: {torch.cuda.is_available()}), "
        f"fusionops from {os.path.dirname(fusionops.__file__)}",
        flush=True,
    )
    if args.device == "cuda" and torch.version.cuda is None:
        print("this torch is a CPU build: fake CUDA tensors need a CUDA build of torch", file=sys.stderr)
        return 1
    check_registration(args.device)
    check_fake_kernels(args.device)
    check_tracing(args.device)
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    known = [r for r in RESULTS if r[1] == "KNOWN"]
    print(
        f"\n{len(RESULTS)} checks: {len(RESULTS) - len(failed) - len(known)} passed, "
        f"{len(known)} failed as known, {len(failed)} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
