"""Non-finite values (NaN, +inf, -inf) through every op, on every fused backend usable here,
against the reference backend (fusionops.reference) in the same dtype.

The contract, forward and every gradient: NaN exactly where the reference has NaN, +inf and
-inf exactly where it has them (same sign), and the finite elements within TOL[dtype] of the
reference, relative to the largest output or gradient of the same call before injection (a
finite gradient next to a NaN is often a sum that cancels to rounding noise). A masked
modality's values are ignored, NaN and inf included (DESIGN.md: a missing modality
contributes ``[1, 0…0]``): nothing non-finite comes out of a call whose non-finite values all
sit in masked rows.

hypothesis draws the problems (shapes, masks, optional arguments, contents) and where the
non-finite values go (which input, which element, 1 to 3 of them), seeded per test so that every
run checks the same examples. Fixed problems add: every masked row non-finite; RBF far apart
(exactly 0) and across exp's underflow; the CUDA C++ kernels, emulated on the CPU (see
test_cuda_kernels_emulated), for the ops they serve.

Skew-pair attention over a band of one key (``window = 0``, or a stack B of one layer) has
``α = 1`` where the band's one score is finite, and its gradient ``α (dα - α dα)`` is 0 where dα
is finite: the kernels skip the scores only where a cheap bound proves both finite, and compute
them otherwise, so a NaN or inf that reaches a score (through ha, hb, wq, wk, bq, bk, or a q·k
that overflows) or dα (wv, bv, wo, the upstream gradient) gives the reference's NaN. bk is read
too (the shift q·bk it adds to every score of a band cancels in the softmax only when finite),
and its gradient is compared like any other. The drawn problems include both;
test_skew_pair_one_key_band and test_skew_pair_nonfinite_bk pin them.

Tensor fusion projected on the cpu backend when K > 4096 factors Z = P ⊗ T (head and tail
outer products) and sums ``Σ_t dZ[h, t] T[t]`` over the flat tail (and the forward's direct
path ``Σ_h P_h (T W_hᵀ)``), a different grouping of the same products from autograd through
the reference's ``flatten(z_1 ⊗ … ⊗ z_M)``: with an inf, ``a · (b + c)`` is ±inf where
``a·b + a·c`` is NaN. So a call whose features or upstream gradient hold an inf or a NaN takes
the kernel's whole-row path (the reference's grouping), which
test_tensor_fusion_cpu_head_tail_split checks at such a K.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import DEVICES, KERNEL_BACKENDS, TOL, skip_unless_usable
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from torch import Tensor

import fusionops
from fusionops import BaseKernel
from fusionops.registry import OPS

# The Triton interpreter computes in numpy, which warns about the very values under test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:All-NaN slice encountered:RuntimeWarning",
)

NAN, INF = float("nan"), float("inf")
VALUE_SETS = {"nan": (NAN,), "+inf": (INF,), "-inf": (-INF,), "mixed": (NAN, INF, -INF)}
DTYPES = [torch.float32, torch.float64]
WHERE = [(d, b) for d in DEVICES for b in KERNEL_BACKENDS[d]]
WHERE_IDS = [f"{b}-{d}" for d, b in WHERE]
EXAMPLES = {"cpu": 8, "cuda": 8, "triton": 3}  # the Triton interpreter is slow
Leaves = dict[str, "Tensor | list[Tensor] | None"]


# --- comparison ------------------------------------------------------------------------------


def _where(mask: Tensor) -> str:
    """A few positions of ``mask``, for messages."""
    idx = mask.nonzero().tolist()
    return f"{len(idx)} at {idx[:6]}{' …' if len(idx) > 6 else ''}"


def assert_same_nonfinite(
    actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str, scale: float | None = None
) -> None:
    """NaN, +inf and -inf exactly where ``expected`` has them; the finite elements within
    ``TOL[dtype] * (|expected| + scale)``, scale by default the largest finite |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, want = test(a), test(e)
        if not torch.equal(got, want):
            raise AssertionError(
                f"{what}: {name} where the reference has none: {_where(got & ~want)}; "
                f"the reference's {name} missing: {_where(want & ~got)}"
            )
    finite = torch.isfinite(e)
    if finite.any():
        tol = TOL[dtype]
        top = e[finite].abs().max().item()
        scale = top if scale is None else max(scale, top)
        torch.testing.assert_close(
            a[finite], e[finite], rtol=tol, atol=tol * scale + 1e-300, msg=lambda m: f"{what}: {m}"
        )


# --- problems --------------------------------------------------------------------------------


@dataclass
class Case:
    """An op call on named float64 leaves (tensors, lists of tensors, or None), run in any dtype."""

    op: str
    leaves: Leaves
    call: Callable[[Leaves], Tensor]
    # The leaves non-finite values may go into, per target ("inputs" or "weights").
    targets: dict[str, list[str]]
    # (leaf, list index) -> its masked rows (bool), for "every injected value is masked".
    masked_rows: dict[tuple[str, int | None], Tensor] = field(default_factory=dict)
    # Leaves whose gradient is not compared with the reference (module docstring).
    skip_grads: tuple[str, ...] = ()
    # The values put in by inject(): (leaf, list index, flat position, value).
    injected: list[tuple[str, int | None, int, float]] = field(default_factory=list)
    clean: Leaves | None = None  # the leaves before inject()

    def tensors(self, target: str) -> list[tuple[str, int | None, Tensor]]:
        out = []
        for name in self.targets[target]:
            leaf = self.leaves[name]
            if isinstance(leaf, list):
                out += [(name, i, t) for i, t in enumerate(leaf) if t.numel()]
            elif leaf is not None and leaf.numel():
                out.append((name, None, leaf))
        return out

    def put(self, name: str, i: int | None, pos: int, value: float) -> None:
        """One non-finite value at flat position ``pos`` of a leaf."""
        if self.clean is None:
            self.clean = _copy(self.leaves)
        t = self.leaves[name][i] if i is not None else self.leaves[name]
        t.view(-1)[pos] = value
        self.injected.append((name, i, pos, value))

    def inject(self, draw, target: str, values: tuple[float, ...]) -> None:
        """1 to 3 non-finite values at drawn positions of the target's leaves."""
        pool = self.tensors(target)
        for _ in range(draw(st.integers(1, 3), "count")):
            name, i, t = draw(st.sampled_from(pool), "leaf")
            self.put(
                name,
                i,
                draw(st.integers(0, t.numel() - 1), "position"),
                draw(st.sampled_from(values), "value"),
            )

    def all_injected_masked(self) -> bool:
        for name, i, pos, _ in self.injected:
            rows = self.masked_rows.get((name, i))
            t = self.leaves[name][i] if i is not None else self.leaves[name]
            if rows is None or not rows[pos // t.shape[-1]]:
                return False
        return bool(self.injected)


def _copy(leaves: Leaves) -> Leaves:
    return {
        k: [t.clone() for t in v] if isinstance(v, list) else None if v is None else v.clone()
        for k, v in leaves.items()
    }


def _leaf(t: Tensor, dtype: torch.dtype, device: str) -> Tensor:
    return t.detach().to(dtype=dtype, device=device).requires_grad_(True)


def run(
    call: Callable[[Leaves], Tensor], leaves: Leaves, backend: str, dtype: torch.dtype, device: str
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """Forward on ``backend`` and backward of a fixed finite upstream gradient; the gradient
    of every leaf by name (``name[i]`` for list leaves)."""
    args: Leaves = {}
    for k, v in leaves.items():
        if isinstance(v, list):
            args[k] = [_leaf(t, dtype, device) for t in v]
        else:
            args[k] = None if v is None else _leaf(v, dtype, device)
    with fusionops.backend(backend):
        out = call(args)
    gen = torch.Generator().manual_seed(11)
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device))
    grads: dict[str, Tensor | None] = {}
    for k, v in args.items():
        if isinstance(v, list):
            grads.update({f"{k}[{i}]": t.grad for i, t in enumerate(v)})
        elif v is not None:
            grads[k] = v.grad
    return out, grads


def _scale(t: Tensor | None) -> float:
    return 0.0 if t is None or not t.numel() else t.detach().abs().max().item()


def check(case: Case, backend: str, dtype: torch.dtype, device: str) -> None:
    """The backend against the reference, same dtype and device (module docstring)."""
    what = f"{case.op} on {backend}, {dtype}, injected {case.injected}"
    expected, expected_grads = run(case.call, case.leaves, "reference", dtype, device)
    # The scale of the finite elements' tolerance: the largest output or gradient of the same
    # call before injection (the size of the terms whose rounding a sum keeps, where it cancels
    # to near 0: a point's own distance in a Gram matrix, dγ with g of both signs).
    clean, clean_grads = run(case.call, case.clean or case.leaves, "reference", dtype, device)
    scale = max([_scale(clean)] + [_scale(g) for g in clean_grads.values()])
    out, grads = run(case.call, case.leaves, backend, dtype, device)
    assert out.dtype == dtype
    assert_same_nonfinite(out, expected, dtype, f"{what}: forward", scale)
    for name, g in grads.items():
        if name.split("[")[0] in case.skip_grads:
            continue
        e = expected_grads[name]
        assert (g is None) == (e is None), f"{what}: grad of {name}: {g} against the reference's {e}"
        if g is not None:
            assert_same_nonfinite(g, e, dtype, f"{what}: grad of {name}", scale)
    if case.all_injected_masked():  # masked values are ignored, whatever they are
        assert torch.isfinite(expected).all(), f"{what}: the reference propagated a masked value"
        assert torch.isfinite(out).all(), f"{what}: forward propagated a masked value"
        for name, g in grads.items():
            assert g is None or torch.isfinite(g).all(), f"{what}: grad of {name} propagated a masked value"


def _randn(draw, *shape: int, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), "seed"))
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _mask(draw, n: int, m: int) -> Tensor | None:
    if not draw(st.booleans(), "masked"):
        return None
    rows = st.lists(st.lists(st.booleans(), min_size=m, max_size=m), min_size=n, max_size=n)
    return torch.tensor(draw(rows, "mask rows"))


def _masked_rows(mask: Tensor | None, m: int) -> dict[tuple[str, int | None], Tensor]:
    return {} if mask is None else {("xs", i): ~mask[:, i] for i in range(m)}


def _dims(draw, most: int = 3) -> list[int]:
    return draw(st.lists(st.integers(1, 4), min_size=1, max_size=most), "dims")


def tensor_fusion_case(draw, mode: str, dims: list[int] | None = None, rows: int | None = None) -> Case:
    """``mode``: features, projected (with bias) or projected_nobias."""
    dims = dims or _dims(draw)
    n = rows if rows is not None else draw(st.integers(1, 5), "rows")
    o = draw(st.integers(1, 4), "O")
    k = math.prod(d + 1 for d in dims)
    leaves: Leaves = {"xs": [_randn(draw, n, d) for d in dims]}
    if mode != "features":
        leaves["weight"] = _randn(draw, o, k, scale=1 / math.sqrt(k))
        leaves["bias"] = _randn(draw, o) if mode == "projected" else None
    mask = _mask(draw, n, len(dims))

    def call(v: Leaves) -> Tensor:
        return fusionops.tensor_fusion(v["xs"], v.get("weight"), v.get("bias"), mask=mask)

    targets = {"inputs": ["xs"], "weights": ["weight", "bias"]}
    return Case("tensor_fusion", leaves, call, targets, _masked_rows(mask, len(dims)))


def low_rank_fusion_case(draw, skip_grads: tuple[str, ...] = ()) -> Case:
    dims = _dims(draw)
    n, r, o = draw(st.integers(1, 5), "rows"), draw(st.integers(1, 3), "R"), draw(st.integers(1, 4), "O")
    leaves: Leaves = {
        "xs": [_randn(draw, n, d) for d in dims],
        "factors": [_randn(draw, r, d + 1, o, scale=1 / math.sqrt(d + 1)) for d in dims],
        "rank_weight": _randn(draw, r),
        "bias": _randn(draw, o) if draw(st.booleans(), "bias") else None,
    }
    mask = _mask(draw, n, len(dims))

    def call(v: Leaves) -> Tensor:
        return fusionops.low_rank_fusion(v["xs"], v["factors"], v["rank_weight"], v["bias"], mask=mask)

    targets = {"inputs": ["xs"], "weights": ["factors", "rank_weight", "bias"]}
    return Case("low_rank_fusion", leaves, call, targets, _masked_rows(mask, len(dims)), skip_grads)


def product_fusion_case(draw) -> Case:
    lead = draw(st.sampled_from([(1,), (3,), (5,), (2, 3)]), "leading shape")
    d, m = draw(st.integers(1, 5), "width"), draw(st.integers(1, 4), "modalities")
    leaves: Leaves = {"xs": [_randn(draw, *lead, d) for _ in range(m)]}
    return Case("product_fusion", leaves, lambda v: fusionops.product_fusion(v["xs"]), {"inputs": ["xs"]})


SKEW_WEIGHTS = ["wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo"]


def skew_pair_case(draw, window: int | None = None, lb: int | None = None) -> Case:
    """Bands of one key (window 0, or a stack B of one layer) beside wider ones."""
    heads = draw(st.integers(1, 2), "heads")
    d = heads * draw(st.integers(1, 3), "head width")
    n, la = draw(st.integers(1, 3), "rows"), draw(st.integers(1, 4), "La")
    lb = lb or draw(st.integers(1, 4), "Lb")
    window = window if window is not None else draw(st.integers(0, 2), "window")
    pair = st.tuples(st.integers(0, la - 1), st.integers(0, lb - 1))
    pairs = draw(st.lists(pair, min_size=1, max_size=3), "pairs")
    leaves: Leaves = {"ha": _randn(draw, n, la, d), "hb": _randn(draw, n, lb, d)}
    for name in ("wq", "wk", "wv", "wo"):
        leaves[name] = _randn(draw, d, d, scale=1 / math.sqrt(d))
    for name in ("bq", "bk", "bv", "bo"):
        leaves[name] = _randn(draw, d) if draw(st.booleans(), f"{name} given") else None

    def call(v: Leaves) -> Tensor:
        ws = [v[k] for k in ("wq", "wk", "wv", "wo")]
        bs = [v[k] for k in ("bq", "bk", "bv", "bo")]
        return fusionops.skew_pair_attention(v["ha"], v["hb"], pairs, *ws, *bs, heads=heads, window=window)

    targets = {"inputs": ["ha", "hb"], "weights": SKEW_WEIGHTS}
    return Case("skew_pair_attention", leaves, call, targets)


def multiple_kernel_case(draw) -> Case:
    """Non-finite values in the inputs only: beta, γ and c must be finite (checked at the op
    boundary). γ and c are leaves, so their gradients are compared too."""
    dims = _dims(draw)
    na, nb = draw(st.integers(1, 5), "rows of a"), draw(st.integers(1, 5), "rows of b")
    kinds = draw(
        st.lists(st.sampled_from(["rbf", "polynomial", "linear"]), min_size=len(dims), max_size=len(dims))
    )
    degrees = [draw(st.integers(1, 3), "degree") for _ in dims]
    params = [draw(st.floats(0.2, 1.2) if k == "rbf" else st.floats(-0.5, 0.5), "param") for k in kinds]
    symmetric = draw(st.booleans(), "xs_b is None (Gram matrix)")
    leaves: Leaves = {
        "xs_a": [_randn(draw, na, d) for d in dims],
        "xs_b": None if symmetric else [_randn(draw, nb, d) for d in dims],
        "beta": torch.tensor([draw(st.floats(0.1, 1.1), "beta") for _ in dims], dtype=torch.float64),
        "params": [torch.tensor(p, dtype=torch.float64) for p in params],
    }

    def call(v: Leaves) -> Tensor:
        kernels = [
            BaseKernel("rbf", gamma=p) if k == "rbf"
            else BaseKernel("polynomial", degree=deg, offset=p) if k == "polynomial"
            else BaseKernel("linear")
            for k, deg, p in zip(kinds, degrees, v["params"], strict=True)
        ]  # fmt: skip
        return fusionops.multiple_kernel(v["xs_a"], v["xs_b"], v["beta"], kernels)

    return Case("multiple_kernel", leaves, call, {"inputs": ["xs_a", "xs_b"]})


BILINEAR_WEIGHTS = ["w0", "b0", "w1", "b1", "wo", "bo"]


def _bilinear_leaves(
    draw, n: int, dx: int, dt: int, p: int, s: int, chunks: int | None, chained: bool = False
) -> Leaves:
    """x (n, dx), t (n, dt) and the six parameters (MFB's 2-d; chunked, BLOCK's 3-d), each bias
    present or not: w0 (p, dx), w1 (p, dt), wo (O, s), scaled like nn.Linear. ``chained``
    (MFH): each of the ``chunks`` blocks reads the whole of x and t."""
    lead = () if chunks is None else (chunks,)
    w_in = dx if chunks is None or chained else dx // chunks
    w_t = dt if chunks is None or chained else dt // chunks
    o = draw(st.integers(1, 3), "O")
    leaves: Leaves = {"x": _randn(draw, n, dx), "t": _randn(draw, n, dt)}
    leaves["w0"] = _randn(draw, *lead, p, w_in, scale=1 / math.sqrt(w_in))
    leaves["b0"] = _randn(draw, *lead, p) if draw(st.booleans(), "b0 given") else None
    leaves["w1"] = _randn(draw, *lead, p, w_t, scale=1 / math.sqrt(w_t))
    leaves["b1"] = _randn(draw, *lead, p) if draw(st.booleans(), "b1 given") else None
    leaves["wo"] = _randn(draw, o, s, scale=1 / math.sqrt(s))
    leaves["bo"] = _randn(draw, o) if draw(st.booleans(), "bo given") else None
    return leaves


def mfb_case(draw, variant: str) -> Case:
    """``variant``: "mfb" (k from 1 to 3) or "mlb" (k = 1); every activation, normalised or not."""
    n, dx, dt = draw(st.integers(1, 4), "rows"), draw(st.integers(1, 4), "dx"), draw(st.integers(1, 4), "dt")
    k = 1 if variant == "mlb" else draw(st.integers(1, 3), "factor")
    o = draw(st.integers(1, 3), "o")
    activation = draw(st.sampled_from([None, "relu", "tanh"]), "activation")
    normalize = draw(st.booleans(), "normalize")
    leaves = _bilinear_leaves(draw, n, dx, dt, k * o, o, None)

    def call(v: Leaves) -> Tensor:
        params = [v[k_] for k_ in BILINEAR_WEIGHTS]
        return fusionops.mfb(v["x"], v["t"], *params, factor=k, activation=activation, normalize=normalize)

    return Case("mfb", leaves, call, {"inputs": ["x", "t"], "weights": BILINEAR_WEIGHTS})


def mfh_case(draw) -> Case:
    """1 to 3 chained blocks (k from 1 to 3), every activation, normalised or not."""
    n, dx, dt = draw(st.integers(1, 4), "rows"), draw(st.integers(1, 4), "dx"), draw(st.integers(1, 4), "dt")
    k, o = draw(st.integers(1, 3), "factor"), draw(st.integers(1, 3), "o")
    blocks = draw(st.integers(1, 3), "blocks")
    activation = draw(st.sampled_from([None, "relu", "tanh"]), "activation")
    normalize = draw(st.booleans(), "normalize")
    leaves = _bilinear_leaves(draw, n, dx, dt, k * o, blocks * o, blocks, chained=True)

    def call(v: Leaves) -> Tensor:
        params = [v[k_] for k_ in BILINEAR_WEIGHTS]
        return fusionops.mfh(v["x"], v["t"], *params, factor=k, activation=activation, normalize=normalize)

    return Case("mfh", leaves, call, {"inputs": ["x", "t"], "weights": BILINEAR_WEIGHTS})


def block_fusion_case(draw, variant: str) -> Case:
    """``variant``: "block" (1 to 3 chunks) or "mutan" (one chunk); every normalisation."""
    n, s = draw(st.integers(1, 4), "rows"), draw(st.integers(1, 3), "s")
    chunks = 1 if variant == "mutan" else draw(st.integers(1, 3), "chunks")
    rank = draw(st.integers(1, 3), "rank")
    normalize = draw(st.sampled_from(["none", "before_cat", "after_cat"]), "normalize")
    m = chunks * s
    leaves = _bilinear_leaves(draw, n, m, m, rank * s, m, chunks)

    def call(v: Leaves) -> Tensor:
        params = [v[k] for k in BILINEAR_WEIGHTS]
        return fusionops.block_fusion(v["x"], v["t"], *params, rank=rank, normalize=normalize)

    return Case("block_fusion", leaves, call, {"inputs": ["x", "t"], "weights": BILINEAR_WEIGHTS})


def _usable(where: tuple[str, str], dtype: torch.dtype, op: str) -> tuple[str, str]:
    device, backend = where
    skip_unless_usable(backend, device, dtype, op=OPS[op])
    return device, backend


def check_drawn(build: Callable, target: str, values: str, where, dtype, op: str) -> None:
    """EXAMPLES[backend] drawn problems with non-finite values in ``target``, each checked."""
    device, backend = _usable(where, dtype, op)

    @seed(zlib.crc32(f"{op}/{target}/{values}/{dtype}/{backend}".encode()))
    @settings(
        max_examples=EXAMPLES[backend],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.data())
    def drawn(data) -> None:
        case = build(data.draw)
        case.inject(data.draw, target, VALUE_SETS[values])
        check(case, backend, dtype, device)

    drawn()


# --- drawn problems, every op ------------------------------------------------------------------

params_values = pytest.mark.parametrize("values", list(VALUE_SETS))
params_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=str)
params_where = pytest.mark.parametrize("where", WHERE, ids=WHERE_IDS)


@params_where
@params_dtype
@params_values
@pytest.mark.parametrize(
    ("mode", "target"),
    [
        ("features", "inputs"),
        ("projected", "inputs"),
        ("projected", "weights"),
        ("projected_nobias", "weights"),
    ],
)
def test_tensor_fusion(where, dtype, values, mode, target):
    check_drawn(lambda draw: tensor_fusion_case(draw, mode), target, values, where, dtype, "tensor_fusion")


@params_where
@params_dtype
@params_values
@pytest.mark.parametrize("target", ["inputs", "weights"])
def test_low_rank_fusion(where, dtype, values, target):
    check_drawn(lambda draw: low_rank_fusion_case(draw), target, values, where, dtype, "low_rank_fusion")


@params_where
@params_dtype
@params_values
def test_product_fusion(where, dtype, values):
    check_drawn(product_fusion_case, "inputs", values, where, dtype, "product_fusion")


@params_where
@params_dtype
@params_values
@pytest.mark.parametrize("target", ["inputs", "weights"])
def test_skew_pair_attention(where, dtype, values, target):
    check_drawn(skew_pair_case, target, values, where, dtype, "skew_pair_attention")


@params_where
@params_dtype
@params_values
def test_multiple_kernel(where, dtype, values):
    check_drawn(multiple_kernel_case, "inputs", values, where, dtype, "multiple_kernel")


@contextlib.contextmanager
def mkl_cpu_tiles():
    """The cpu kernels' tiled forward at any size (their small-problem limit at 0): the problems
    drawn here are small enough for the plain loops, which the cpu cases take by default."""
    previous = torch.ops.fusionops._mkl_small_work(0)
    try:
        yield
    finally:
        torch.ops.fusionops._mkl_small_work(previous)


@params_dtype
@params_values
def test_multiple_kernel_cpu_tiles(dtype, values):
    _usable(("cpu", "cpu"), dtype, "multiple_kernel")
    with mkl_cpu_tiles():
        check_drawn(multiple_kernel_case, "inputs", values, ("cpu", "cpu"), dtype, "multiple_kernel")


def _bilinear_params(variants: list[str]) -> list:
    """(where, dtype, values, target, variant): every combination on the compiled backends; on
    the Triton interpreter (slow) the mixed values only, each variant once per dtype and target."""
    out = []
    for where, wid in zip(WHERE, WHERE_IDS, strict=True):
        for dtype in DTYPES:
            for values in VALUE_SETS:
                for target in ("inputs", "weights"):
                    for variant in variants:
                        if where[1] == "triton" and values != "mixed":
                            continue
                        ids = f"{wid}-{dtype}-{values}-{target}-{variant}"
                        out.append(pytest.param(where, dtype, values, target, variant, id=ids))
    return out


@pytest.mark.parametrize(("where", "dtype", "values", "target", "variant"), _bilinear_params(["mfb", "mlb"]))
def test_mfb(where, dtype, values, target, variant):
    """MFB (k from 1 to 3) and MLB (k = 1), every activation, normalised or not."""
    check_drawn(lambda draw: mfb_case(draw, variant), target, values, where, dtype, "mfb")


@pytest.mark.parametrize(("where", "dtype", "values", "target", "variant"), _bilinear_params(["mfh"]))
def test_mfh(where, dtype, values, target, variant):
    """MFH: 1 to 3 chained blocks (k from 1 to 3), every activation, normalised or not."""
    check_drawn(mfh_case, target, values, where, dtype, "mfh")


@pytest.mark.parametrize(
    ("where", "dtype", "values", "target", "variant"), _bilinear_params(["block", "mutan"])
)
def test_block_fusion(where, dtype, values, target, variant):
    """BLOCK (1 to 3 chunks) and MUTAN (one chunk), every normalisation."""
    check_drawn(lambda draw: block_fusion_case(draw, variant), target, values, where, dtype, "block_fusion")


# --- fixed problems ------------------------------------------------------------------------------


def fixed(**values) -> Callable:
    """A ``draw`` for the problem builders: each label's value from ``values`` (labels ending in
    "given": True), seeds 0, 1, 2…"""
    seeds = iter(range(1 << 20))

    def draw(strategy, label: str | None = None):
        if label == "seed":
            return next(seeds)
        return True if label.endswith("given") and label not in values else values[label]

    return draw


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("op", ["tensor_fusion", "low_rank_fusion"])
def test_masked_rows_ignore_nonfinite(backend, value, op):
    """Every masked row of every modality holds the value (the first row has every modality
    masked, the second none): nothing non-finite comes out, forward or backward, as in the
    reference."""
    device, _ = _usable(("cpu", backend), torch.float64, op)
    dims, n = [3, 1, 2], 5
    mask = [[False] * 3, [True] * 3, [True, False, True], [False, True, True], [True, True, False]]
    draw = fixed(dims=dims, rows=n, O=3, R=2, masked=True, bias=True, **{"mask rows": mask})
    case = (
        tensor_fusion_case(draw, "projected", dims, n)
        if op == "tensor_fusion"
        else low_rank_fusion_case(draw)
    )
    for (_, m), rows in case.masked_rows.items():
        for r in rows.nonzero().flatten().tolist():
            for col in range(dims[m]):
                case.put("xs", m, r * dims[m] + col, value)
    assert case.all_injected_masked()
    check(case, backend, torch.float64, device)


def _skew_fixed(window: int, lb: int) -> Case:
    """Two rows, two heads of width 2 (D = 4), pairs (0, 0) and (1, Lb - 1), every bias."""
    draw = fixed(
        heads=2, rows=2, La=2, Lb=lb, window=window, pairs=[(0, 0), (1, lb - 1)], **{"head width": 2}
    )
    return skew_pair_case(draw, window, lb)


# What goes where (leaf, flat position, value) for a band of one key, whose softmax is NaN where
# its score is not finite and whose gradient α (dα - α dα) is NaN where dα is not.
ONE_KEY_CASES = {
    "wq-nan": [("wq", 5, NAN)],  # the scores, through q, k or the shift q·bk
    "wk-+inf": [("wk", 2, INF)],
    "bq--inf": [("bq", 1, -INF)],
    "bk-nan": [("bk", 3, NAN)],
    "ha-+inf": [("ha", 3, INF)],  # row 0, layer 0 (pair (0, 0)): the score besides the residual
    "hb-nan": [("hb", 1, NAN)],
    "wv-nan": [("wv", 6, NAN)],  # dα = dc · v: ds is NaN, so are the gradients of wq, wk, bq, bk
    "wo-+inf": [("wo", 9, INF)],  # dc = g Wo
    # Finite, but past what the kernels' bound proves finite (q large in head 0, k in head 1):
    # the scores are computed, and α = 1 and ds = 0 all the same.
    "unproven-finite": [("bq", 0, 1e200), ("bk", 3, 1e200)],
}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("put", list(ONE_KEY_CASES))
@pytest.mark.parametrize(("window", "lb"), [(0, 3), (1, 1)], ids=["window0", "one-layer-stack"])
def test_skew_pair_one_key_band(backend, put, window, lb):
    device, _ = _usable(("cpu", backend), torch.float64, "skew_pair_attention")
    case = _skew_fixed(window, lb)
    for leaf, pos, value in ONE_KEY_CASES[put]:
        case.put(leaf, None, pos, value)
    check(case, backend, torch.float64, device)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_skew_pair_one_key_overflow(backend):
    """float32 rows of 1e20: q·k overflows, so the reference's softmax of that one score is NaN
    (row 0); row 1 is finite, in the same block of rows."""
    device, _ = _usable(("cpu", backend), torch.float32, "skew_pair_attention")
    case = _skew_fixed(0, 3)
    case.clean = _copy(case.leaves)
    for name in ("ha", "hb"):
        case.leaves[name][0] *= 1e20
    check(case, backend, torch.float32, device)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "+inf"])
@pytest.mark.parametrize("window", [0, 1])
def test_skew_pair_nonfinite_bk(backend, value, window):
    """bk shifts every score of a band by q·bk, which the softmax cancels only while it is
    finite: non-finite, the band's weights are NaN, and so is the gradient of bk (the sum of dk)."""
    device, _ = _usable(("cpu", backend), torch.float64, "skew_pair_attention")
    case = _skew_fixed(window, 3)
    case.put("bk", None, 2, value)
    check(case, backend, torch.float64, device)


@pytest.mark.parametrize(
    ("modality", "value"),
    [
        pytest.param(None, NAN, id="nan"),
        pytest.param(0, INF, id="head-+inf"),
        pytest.param(1, INF, id="tail-+inf"),
        pytest.param(2, -INF, id="last--inf"),
    ],
)
def test_tensor_fusion_cpu_head_tail_split(modality, value):
    """(20, 20, 20): K = 9261, where finite inputs take the head (z_1) / tail (z_2, z_3) split
    of 441 columns (the direct path); an inf or a NaN must give the reference's NaN and ±inf
    exactly, forward and every gradient (the kernel's whole-row path). The Triton interpreter
    takes 15 s a call at this K, so this is the cpu backend's (whose split it is) alone."""
    device, backend = _usable(("cpu", "cpu"), torch.float64, "tensor_fusion")
    case = tensor_fusion_case(fixed(O=3, masked=False), "projected", [20, 20, 20], 2)
    for m, pos in ((0, 3), (1, 25)) if modality is None else ((modality, 7),):
        case.put("xs", m, pos, value)
    check(case, backend, torch.float64, device)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("variant", ["mfb", "mlb"])
def test_mfb_relu_clipped_nonfinite(backend, variant):
    """relu's backward selects (threshold_backward): 0 where the pre-activation is <= 0, even
    where the other factor is inf, so d act is inf there. The kernels once multiplied by relu'
    instead (0 · inf = NaN in dL/dA, then in the rows of dL/dU it reaches)."""
    device, _ = _usable(("cpu", backend), torch.float64, "mfb")
    draw = fixed(rows=3, dx=3, dt=2, factor=2, o=2, activation="relu", normalize=False, O=2)
    case = mfb_case(draw, variant)
    case.put("t", None, 0, INF)  # t[0, 0]: row 0 of B = t Vᵀ + b_v is ±inf
    v = case.leaves
    a = v["x"][0] @ v["w0"].T + v["b0"]
    b = v["t"][0] @ v["w1"].T + v["b1"]
    assert ((a <= 0) & (b == INF)).any(), "no clipped element meets an inf: the case tests nothing"
    check(case, backend, torch.float64, device)


def _mfh_fixed(activation: str | None = "relu") -> Case:
    """Three rows, two chained blocks of k = 2, o = 2 (d_x = 3, d_t = 2), every bias, O = 2."""
    return mfh_case(
        fixed(rows=3, dx=3, dt=2, factor=2, o=2, blocks=2, activation=activation, normalize=False, O=2)
    )


def _mfh_acts(v: Leaves, block: int) -> tuple[Tensor, Tensor]:
    """Block ``block``'s relu(x U_iᵀ + b_u_i) and relu(t V_iᵀ + b_v_i) of the case's leaves."""
    a = torch.relu(v["x"] @ v["w0"][block].T + v["b0"][block])
    b = torch.relu(v["t"] @ v["w1"][block].T + v["b1"][block])
    return a, b


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_mfh_relu_clipped_nonfinite(backend):
    """As test_mfb_relu_clipped_nonfinite, in every block of the chain: t[0, 0] = inf makes row
    0 of every block's B = t V_iᵀ + b_v_i ±inf, which meets relu-clipped A elements (relu'
    selects: their gradient is 0, not 0 · inf)."""
    device, _ = _usable(("cpu", backend), torch.float64, "mfh")
    case = _mfh_fixed()
    case.put("t", None, 0, INF)
    v = case.leaves
    for block in range(2):
        a = v["x"][0] @ v["w0"][block].T + v["b0"][block]
        b = v["t"][0] @ v["w1"][block].T + v["b1"][block]
        assert ((a <= 0) & b.isinf()).any(), f"block {block}: no clipped element meets an inf"
    check(case, backend, torch.float64, device)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_mfh_chain_inf_times_zero(backend):
    """An inf in block 0's product e_0 (u_bias[0] = +inf at one column: relu(A_0) = inf there)
    meets a 0 of block 1's relu-clipped a_1 ⊙ b_1: e_1 = a_1 ⊙ b_1 ⊙ e_0 is 0 · inf = NaN, so
    the reference has inf in z_0 and NaN in z_1 (which out_weight's gradient keeps apart, one
    column per pooled output), and NaN through every gradient the chain reaches."""
    device, _ = _usable(("cpu", backend), torch.float64, "mfh")
    case = _mfh_fixed()
    v = case.leaves
    a0, b0 = _mfh_acts(v, 0)
    a1, b1 = _mfh_acts(v, 1)
    # A column where, in some row, e_0 becomes +inf (b_0 > 0) and block 1's a_1 ⊙ b_1 is 0.
    meets = (b0 > 0) & (a1 * b1 == 0)
    cols = meets.any(0).nonzero().flatten().tolist()
    assert cols, "no column where an inf of e_0 meets a 0 of block 1: the case tests nothing"
    col = cols[0]
    case.put("b0", None, col, INF)  # u_bias[0, col]: flat position col of the (p, k·o) bias
    # The reference's pooled blocks: inf in z_0, NaN in z_1, at the pooled column of col.
    with torch.no_grad():
        a0, _ = _mfh_acts(case.leaves, 0)
        e0 = a0 * b0
        e1 = a1 * b1 * e0
        z0, z1 = e0.unflatten(-1, (-1, 2)).sum(-1), e1.unflatten(-1, (-1, 2)).sum(-1)
    rows = meets[:, col]
    assert z0[rows, col // 2].isposinf().all() and z1[rows, col // 2].isnan().all(), (z0, z1)
    check(case, backend, torch.float64, device)


def test_low_rank_fusion_triton_rank_weight_padding():
    """The triton kernel's d rank_weight once summed tile padding, where 0 · inf is NaN."""
    device, backend = _usable(("cpu", "triton"), torch.float64, "low_rank_fusion")
    # One output: d rank_weight sums one ±inf per rank (no inf - inf), so the reference's is ±inf.
    draw = fixed(dims=[2, 3], rows=3, R=2, O=1, bias=True, masked=False)
    case = low_rank_fusion_case(draw)
    case.put("xs", 1, 0, INF)
    check(case, backend, torch.float64, device)


# --- extreme values ------------------------------------------------------------------------------


@params_where
@params_dtype
def test_rbf_far_apart_is_exactly_zero(where, dtype):
    """Points far apart (and an inf distance) give k = 0 exactly, as the reference's exp does,
    and exactly zero gradients: no smallest-normal floor."""
    device, backend = _usable(where, dtype, "multiple_kernel")
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 2, generator=gen, dtype=torch.float64) + 1e4).to(dtype=dtype, device=device)
    b = torch.randn(4, 2, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    beta = torch.tensor([0.7], dtype=dtype, device=device)
    gamma = torch.tensor(0.5, dtype=torch.float64, device=device, requires_grad=True)
    for bk in (backend, "reference"):
        xa, xb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        with fusionops.backend(bk):
            k = fusionops.multiple_kernel([xa], [xb], beta, [BaseKernel("rbf", gamma=gamma)])
        assert torch.equal(k, torch.zeros_like(k)), f"{bk}: {k}"
        k.backward(torch.ones_like(k))
        for name, g in (("xs_a", xa.grad), ("xs_b", xb.grad), ("gamma", gamma.grad)):
            assert torch.equal(g, torch.zeros_like(g)), f"{bk}: grad of {name}: {g}"
        gamma.grad = None


@params_dtype
def test_rbf_extremes_cpu_tiles(dtype):
    """The two RBF extreme-value tests around this one through the cpu kernels' tiled forward."""
    _usable(("cpu", "cpu"), dtype, "multiple_kernel")
    with mkl_cpu_tiles():
        test_rbf_far_apart_is_exactly_zero(("cpu", "cpu"), dtype)
        test_rbf_underflow_sweep(("cpu", "cpu"), dtype)


@params_where
@params_dtype
def test_rbf_underflow_sweep(where, dtype):
    """γD from 0 past the underflow of exp: within a few ulp of the reference down to the
    smallest normal number, 0 where the reference is 0, and never above a subnormal elsewhere
    (the cpu kernel's exp flushes values below about 0.7 × the smallest normal to 0)."""
    device, backend = _usable(where, dtype, "multiple_kernel")
    tiny, eps = torch.finfo(dtype).tiny, torch.finfo(dtype).eps
    top = 110.0 if dtype == torch.float32 else 760.0  # past ln(smallest subnormal)
    gamma = 0.75
    gd = torch.linspace(0, top, 600, dtype=torch.float64)
    a = torch.zeros(1, 1, dtype=dtype, device=device)
    b = (gd / gamma).sqrt()[:, None].to(dtype=dtype, device=device)
    beta = torch.ones(1, dtype=dtype, device=device)
    kernels = [BaseKernel("rbf", gamma=gamma)]
    with fusionops.backend(backend):
        k = fusionops.multiple_kernel([a], [b], beta, kernels)[0].double().cpu()
    with fusionops.backend("reference"):
        e = fusionops.multiple_kernel([a], [b], beta, kernels)[0].double().cpu()
    assert torch.all(k >= 0) and torch.all(e >= 0)
    normal = e >= tiny
    assert torch.all((k[normal] - e[normal]).abs() <= 4 * eps * e[normal]), (
        (k[normal] - e[normal]).abs().max()
    )
    assert torch.all(k[~normal] <= e[~normal] + tiny)
    assert torch.equal(k[e == 0], torch.zeros_like(k[e == 0]))


# --- the CUDA C++ kernels, emulated on the CPU ----------------------------------------------------


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory):
    """The plain CUDA kernels compiled by g++ with tests/cuda_emulation's shim (see
    test_cuda_kernels_emulated): their arithmetic, so their grouping, on this machine."""
    import test_cuda_kernels_emulated as emu

    return emu.lib.__wrapped__(tmp_path_factory)  # the fixture's function: one build per module


def _emulated_inputs(seed_: int, dims, n, dtype, value, masked):
    """Modalities with 1 to 3 copies of ``value`` (seeded positions), the mask, and the
    reference's leaves (the same values, requiring grad)."""
    gen = torch.Generator().manual_seed(seed_)
    xs = [torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype) for d in dims]
    for _ in range(1 + seed_ % 3):
        m = int(torch.randint(len(dims), (), generator=gen))
        xs[m].view(-1)[int(torch.randint(xs[m].numel(), (), generator=gen))] = value
    mask = (torch.rand(n, len(dims), generator=gen) > 0.3) if masked else None
    return xs, mask, [x.clone().requires_grad_(True) for x in xs]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_cuda_kernels_emulated(cuda_lib, dtype, value, masked):
    """Tensor fusion (features and projected), low-rank fusion and product fusion through the
    emulated CUDA kernels, against the reference in the same dtype."""
    import test_cuda_kernels_emulated as emu

    from fusionops import reference as ref

    lib, dt = cuda_lib, emu.INT(emu.DT[dtype])
    for seed_ in range(4):
        dims, n, o, r = ([3, 1, 4], [2, 3], [2, 2, 1, 2], [4])[seed_], 5, 3, 2
        k = math.prod(d + 1 for d in dims)
        xs, mask, rx = _emulated_inputs(seed_, dims, n, dtype, value, masked)
        mods = emu._modalities(xs, mask)
        gen = torch.Generator().manual_seed(100 + seed_)
        what = f"emulated cuda, {dtype}, dims {dims}, seed {seed_}"

        def expect(out: Tensor, leaves: list[Tensor], grad: Tensor) -> list[Tensor]:
            grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
            return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)]

        def same(actual: Tensor, expected: Tensor, name: str, what: str = what) -> None:
            assert_same_nonfinite(actual, expected, dtype, f"{what}: {name}", 1.0)

        # tensor fusion, features
        z = emu._nan(n, k, dtype=dtype)
        assert lib.tf_ff(dt, *mods, emu._ptr(z)) == 0
        ez = ref.tensor_fusion(rx, None, None, mask)
        same(z, ez, "features")
        gz = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)
        dx = [emu._nan(n, d, dtype=dtype) for d in dims]
        assert lib.tf_fb(dt, emu._ptr(gz), emu.I64(k), emu.I64(1), *mods, emu._ptrs(dx)) == 0
        for m, e in enumerate(expect(ez, rx, gz)):
            same(dx[m], e, f"features dx[{m}]")

        # tensor fusion, projected
        w = (torch.randn(o, k, generator=gen, dtype=torch.float64) / k**0.5).to(dtype)
        b = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype)
        rw, rb = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = emu._nan(n, o, dtype=dtype)
        w_args = [emu._ptr(w), emu.I64(k), emu.I64(1), emu.I64(o)]
        assert lib.tf_pf(dt, *mods, *w_args, emu._ptr(b), emu.I64(1), emu._ptr(y)) == 0
        ey = ref.tensor_fusion(rx, rw, rb, mask)
        same(y, ey, "projected")
        gy = torch.randn(n, o, generator=gen, dtype=torch.float64).to(dtype)
        elems = lib.tf_pb_ws(*mods)
        ws = emu._nan(elems, dtype=emu._acc(dtype))
        dx = [emu._nan(n, d, dtype=dtype) for d in dims]
        dw, db = emu._nan(o, k, dtype=dtype), emu._nan(o, dtype=dtype)
        rc = lib.tf_pb(
            dt, emu._ptr(gy), emu.I64(o), emu.I64(1), *mods, *w_args, emu._ptrs(dx), emu._ptr(dw),
            emu._ptr(db), emu._ptr(ws), emu.I64(elems),
        )  # fmt: skip
        assert rc == 0
        grads = expect(ey, [*rx, rw, rb], gy)
        for m in range(len(dims)):
            same(dx[m], grads[m], f"projected dx[{m}]")
        same(dw, grads[-2], "projected dW")
        same(db, grads[-1], "projected db")

        # low-rank fusion
        fs = [torch.randn(r, d + 1, o, generator=gen, dtype=torch.float64).to(dtype) for d in dims]
        lw = torch.randn(r, generator=gen, dtype=torch.float64).to(dtype)
        rf, rlw = [f.clone().requires_grad_(True) for f in fs], lw.clone().requires_grad_(True)
        facs = emu._factors(fs)
        elems = lib.lmf_ws(*mods, *facs)
        y, ws = emu._nan(n, o, dtype=dtype), emu._nan(elems, dtype=emu._acc(dtype))
        rc = lib.lmf_f(
            dt, *mods, *facs, emu._ptr(lw), emu.I64(1), emu._ptr(b), emu.I64(1), emu._ptr(y), emu._ptr(ws),
            emu.I64(elems),
        )  # fmt: skip
        assert rc == 0
        ey = ref.low_rank_fusion(rx, rf, rlw, rb, mask)
        same(y, ey, "low-rank")
        dx = [emu._nan(n, d, dtype=dtype) for d in dims]
        dfs = [torch.zeros(r, d + 1, o, dtype=emu._acc(dtype)) for d in dims]
        dlw, db = torch.zeros(r, dtype=emu._acc(dtype)), emu._nan(o, dtype=dtype)
        ws = emu._nan(elems, dtype=emu._acc(dtype))
        rc = lib.lmf_b(
            dt, emu._ptr(gy), emu.I64(o), emu.I64(1), *mods, *facs, emu._ptr(lw), emu.I64(1), emu._ptrs(dx),
            emu._ptrs(dfs), emu._ptr(dlw), emu._ptr(db), emu._ptr(ws), emu.I64(elems),
        )  # fmt: skip
        assert rc == 0
        grads = expect(ey, [*rx, *rf, rlw], gy)
        for m in range(len(dims)):
            same(dx[m], grads[m], f"low-rank dx[{m}]")
            same(dfs[m].to(dtype), grads[len(dims) + m], f"low-rank dfactors[{m}]")
        same(dlw.to(dtype), grads[-1], "low-rank d rank_weight")

        # product fusion (equal widths, no mask)
        if mask is None:
            px = [x[:, :1].contiguous() for x in xs]
            prx = [x.detach().clone().requires_grad_(True) for x in px]
            args = [emu._ptrs(px), emu._arr(emu.I64, [1] * len(px)), emu._arr(emu.I64, [1] * len(px))]
            args += [emu.I64(n), emu.I64(1)]
            p = emu._nan(n, 1, dtype=dtype)
            assert lib.pf_f(dt, emu.INT(len(px)), *args, emu._ptr(p)) == 0
            ep = ref.product_fusion(prx)
            same(p, ep, "product")
            gp = torch.randn(n, 1, generator=gen, dtype=torch.float64).to(dtype)
            dpx = [emu._nan(n, 1, dtype=dtype) for _ in px]
            assert (
                lib.pf_b(dt, emu.INT(len(px)), emu._ptr(gp), emu.I64(1), emu.I64(1), *args, emu._ptrs(dpx))
                == 0
            )
            for m, e in enumerate(expect(ep, prx, gp)):
                same(dpx[m], e, f"product dx[{m}]")
