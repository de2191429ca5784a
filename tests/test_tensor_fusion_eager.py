"""The C++ eager path of the projected tensor fusion (issue 15: near-zero fixed cost).

``fusionops::_tf_projected_eager`` (csrc/cpu/eager_autograd.cpp) carries the autograd of eager
cpu/cuda calls in C++, and the CPU kernels take plain loops below a size limit (the small path
of csrc/cpu/tensor_fusion.cpp). Checked here: both paths against the float64 reference and
against the Python eager path (ops/_eager.py), every gradient subset, gradcheck and gradgradcheck
in float64, create_graph, dropout, masks, strides, N = 0 and non-finite inputs with the blocked
kernels forced (the other test files meet mostly the small path now that their shapes are tiny).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import assert_close_to, skip_unless_usable
from inputs import LAYOUTS, detached64, make_grad, make_mask, make_weight, make_xs, saved_shapes

import fusionops
import fusionops.ops.tensor_fusion  # noqa: F401  (the module, not the function of that name)
from fusionops import reference

TF = sys.modules["fusionops.ops.tensor_fusion"]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _cpu_kernels():
    skip_unless_usable("cpu", "cpu", op=TF.OPDEF)


@pytest.fixture(params=["small", "blocked"])
def path(request):
    """The CPU kernels' small-problem path (plain loops) or, with its limit at 0, the blocked one."""
    limit = 2**62 if request.param == "small" else 0
    previous = torch.ops.fusionops._tf_small_work(limit)
    yield request.param
    torch.ops.fusionops._tf_small_work(previous)


def _eager(xs, w, b, mask=None, dropout=0.0, seed=0):
    return torch.ops.fusionops._tf_projected_eager(xs, w, b, mask, dropout, seed)


def _python_eager(xs, w, b, mask=None, dropout=0.0, seed=0):
    """The Python autograd.Function path (what the triton backend keeps) on the same kernels."""
    call = TF._ProjectedCall(TF._kernels("cpu"), len(xs), dropout, seed)
    return TF._eager.apply(call, (*xs, w, b, mask))


def _grads(y, leaves, g):
    live = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(y, live, g, allow_unused=True)


def _check(xs, w, b, mask, dtype, dropout=0.0, seed=0, grad_layout="contiguous"):
    """Output and every gradient of the eager op against the float64 reference."""
    n, o = xs[0].shape[0], w.shape[0]
    g = make_grad((n, o), dtype, "cpu", layout=grad_layout)
    y = _eager(xs, w, b, mask, dropout, seed)
    assert y.dtype == dtype and y.shape == (n, o)
    got = _grads(y, [*xs, w, b], g)
    leaves64 = detached64([*xs, w, b])
    want_y = reference.tensor_fusion(leaves64[: len(xs)], leaves64[-2], leaves64[-1], mask, dropout, seed)
    want = _grads(want_y, leaves64, g.to(F64))
    assert_close_to(y, want_y, dtype, "y")
    names = [*(f"dx{m}" for m in range(len(xs))), "dw", "db"]
    for name, a, e in zip(names, got, want, strict=True):
        assert_close_to(a, e, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [(4,), (4, 4), (3, 2, 4), (2, 3, 2, 1), (16, 15)], ids=str)
@pytest.mark.parametrize("n", [7, 8])
def test_matches_reference(path, dims, dtype, n):
    xs = make_xs((n,), dims, dtype)
    w, b = make_weight(dims, 5, dtype)
    _check(xs, w, b, None, dtype)


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strides(path, layout, grad_layout):
    """Non-contiguous and stride-0 inputs, a transposed weight, non-contiguous and stride-0 grad."""
    dims = (3, 2, 4)
    xs = make_xs((6,), dims, torch.float32, layout=layout)
    w, b = make_weight(dims, 6, torch.float32, transposed=True)
    _check(xs, w, b, None, torch.float32, grad_layout=grad_layout)


def test_expanded_weight(path):
    """A weight with stride 0 along O (every row the same) and a stride-0 bias."""
    dims = (3, 4)
    xs = make_xs((5,), dims, F64)
    w0, _ = make_weight(dims, 1, F64)
    w = w0.detach().expand(4, -1).requires_grad_(True)
    b = torch.randn(1, dtype=F64).expand(4).requires_grad_(True)
    _check(xs, w, b, None, F64)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("dims", [(4,), (3, 4), (2, 3, 2, 1)], ids=str)
def test_mask_and_dropout(path, dims, dropout):
    xs = make_xs((9,), dims, F64)
    w, b = make_weight(dims, 4, F64)
    mask = make_mask((9,), len(dims))
    _check(xs, w, b, mask, F64, dropout, seed=1234)


def test_empty_batch(path):
    xs = make_xs((0,), (3, 4), torch.float32)
    w, b = make_weight((3, 4), 5, torch.float32)
    y = _eager(xs, w, b)
    assert y.shape == (0, 5)
    dx0, dx1, dw, db = torch.autograd.grad(y, [*xs, w, b], torch.randn(0, 5))
    assert dx0.shape == (0, 3) and dx1.shape == (0, 4)
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_same_as_python_path(path, masked, dropout):
    """The C++ autograd gives the Python autograd.Function's output and gradients, bit for bit:
    the same kernels, called with the same arguments."""
    dims = (3, 2, 4)
    xs = make_xs((7,), dims, torch.float32)
    w, b = make_weight(dims, 5, torch.float32)
    mask = make_mask((7,), 3) if masked else None
    g = torch.randn(7, 5)
    y1 = _eager(xs, w, b, mask, dropout, 99)
    y2 = _python_eager(xs, w, b, mask, dropout, 99)
    assert torch.equal(y1, y2)
    for a, e in zip(_grads(y1, [*xs, w, b], g), _grads(y2, [*xs, w, b], g), strict=True):
        assert torch.equal(a, e)


# which leaves require grad: every subset kind the backward distinguishes
SUBSETS = {
    "all": (True, True, True, True),
    "x1 only": (False, True, False, False),
    "weight only": (False, False, True, False),
    "bias only": (False, False, False, True),
    "xs only": (True, True, False, False),
    "weight and bias": (False, False, True, True),
}


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_needs_grad_subsets(path, subset):
    dims = (3, 4)
    xs = [x.detach() for x in make_xs((6,), dims, F64)]
    w, b = (t.detach() for t in make_weight(dims, 5, F64))
    leaves = [*xs, w, b]
    for t, need in zip(leaves, SUBSETS[subset], strict=True):
        t.requires_grad_(need)
    g = torch.randn(6, 5, dtype=F64)
    got = _grads(_eager(xs[:2], w, b), leaves, g)
    ref = detached64(leaves)
    for t, r in zip(leaves, ref, strict=True):
        r.requires_grad_(t.requires_grad)
    want = _grads(reference.tensor_fusion(ref[:2], ref[2], ref[3]), ref, g)
    assert len(got) == len(want) == sum(SUBSETS[subset])
    for a, e in zip(got, want, strict=True):
        assert_close_to(a, e, F64)


def test_no_bias_and_no_grad(path):
    """Without a bias; and with nothing requiring grad, a plain tensor (no graph)."""
    dims = (2, 3)
    xs = make_xs((4,), dims, F64)
    w, _ = make_weight(dims, 3, F64)
    y = _eager(xs, w, None)
    want = reference.tensor_fusion(detached64(xs), w.detach(), None)
    assert_close_to(y, want, F64)
    dw = torch.autograd.grad(y.sum(), w)[0]
    assert_close_to(
        dw, torch.autograd.grad(reference.tensor_fusion(detached64(xs), w, None).sum(), w)[0], F64
    )
    with torch.no_grad():
        y = _eager(xs, w, None)
    assert y.grad_fn is None and not y.requires_grad
    with torch.inference_mode():  # below autograd: the CompositeExplicitAutograd kernel
        assert_close_to(_eager([x.detach() for x in xs], w.detach(), None), want, F64)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(path, masked, dropout):
    dims = (2, 3, 1)
    xs = [x.detach().requires_grad_(True) for x in make_xs((4,), dims, F64)]
    w, b = make_weight(dims, 3, F64)
    mask = make_mask((4,), 3) if masked else None

    def f(*t):
        return _eager(list(t[:3]), t[3], t[4], mask, dropout, 7)

    assert torch.autograd.gradcheck(f, (*xs, w, b))
    assert torch.autograd.gradgradcheck(f, (*xs, w, b))


def test_create_graph_matches_reference(path):
    """Second order: gradients taken with create_graph=True are the reference's, and
    differentiating them again gives the reference's second derivatives."""
    dims = (2, 1, 2)
    xs = make_xs((4,), dims, F64, seed=12)
    w, b = make_weight(dims, 3, F64, seed=13)
    mask = make_mask((4,), 3, seed=6)
    leaves = [t.detach().clone().requires_grad_(True) for t in [*xs, w, b]]
    ref = [t.detach().clone().requires_grad_(True) for t in leaves]

    def second(fn, ls):
        y = fn(ls)
        first = torch.autograd.grad((y * y).sum(), ls, create_graph=True)  # grad = 2y: depends on all
        s = sum((g * g).sum() for g in first)
        return first, torch.autograd.grad(s, ls)

    got1, got2 = second(lambda t: _eager(t[:3], t[3], t[4], mask, 0.2, 3), leaves)
    want1, want2 = second(lambda t: reference.tensor_fusion(t[:3], t[3], t[4], mask, 0.2, 3), ref)
    for a, e in zip([*got1, *got2], [*want1, *want2], strict=True):
        assert_close_to(a, e, F64)


def test_public_function_takes_the_cpp_path():
    """Eager calls of the cpu backend record the C++ node (not the Python Function); inference
    calls record nothing; the triton backend keeps the Python path (tested elsewhere)."""
    dims = (3, 4)
    xs = make_xs((5,), dims, torch.float32)
    w, b = make_weight(dims, 2, torch.float32)
    with fusionops.backend("cpu"):
        y = fusionops.tensor_fusion(xs, w, b)
        assert "ProjectedEager" in y.grad_fn.name()
        with torch.no_grad():
            assert fusionops.tensor_fusion(xs, w, b).grad_fn is None
        y3 = fusionops.tensor_fusion([x.unsqueeze(0) for x in xs], w, b)  # leading shape (1, 5)
        assert y3.shape == (1, 5, 2)
    assert_close_to(y3[0], y, torch.float32)


def test_saves_inputs_only(path):
    """Autograd keeps the inputs, never Z or any (N, K) tensor."""
    dims, n = (6, 5, 4), 32
    k = math.prod(d + 1 for d in dims)
    xs = make_xs((n,), dims, torch.float32)
    w, b = make_weight(dims, 3, torch.float32)
    with saved_shapes() as saved:
        y = _eager(xs, w, b)
    y.sum().backward()
    assert sorted(saved) == sorted([(n, d) for d in dims] + [tuple(w.shape)]), saved
    assert all(math.prod(s) < n * k for s in saved)


def test_modified_input_is_detected():
    xs = make_xs((4,), (2, 3), F64)
    w, b = make_weight((2, 3), 3, F64)
    y = _eager(xs, w, b)
    with torch.no_grad():
        w.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
def test_nonfinite_like_reference(path, value):
    """A non-finite input value: NaN and ±inf exactly where the reference has them, forward and
    backward, on both paths (the blocked path groups Z as the reference then)."""
    from test_nonfinite import assert_same_nonfinite

    dims = (2, 3, 2)
    xs = [x.detach() for x in make_xs((5,), dims, F64)]
    xs[1][2, 1] = value
    w, b = (t.detach() for t in make_weight(dims, 3, F64))
    leaves = [t.requires_grad_(True) for t in [*xs, w, b]]
    ref = detached64(leaves)
    g = torch.randn(5, 3, dtype=F64)
    y = _eager(leaves[:3], leaves[3], leaves[4])
    want = reference.tensor_fusion(ref[:3], ref[3], ref[4])
    assert_same_nonfinite(y, want, F64, "y")
    for name, a, e in zip("x0 x1 x2 w b".split(), _grads(y, leaves, g), _grads(want, ref, g), strict=True):
        assert_same_nonfinite(a, e, F64, f"d{name}")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, dropout):
    dims = (2, 3, 4)
    xs = [x.detach().requires_grad_(True) for x in make_xs((5,), dims, F64)]
    w, b = make_weight(dims, 4, F64)
    mask = make_mask((5,), 3) if masked else None
    torch.library.opcheck(torch.ops.fusionops._tf_projected_eager.default, (xs, w, b, mask, dropout, 11))


def test_small_limit_knob():
    """The test knob: a negative limit reads it, another sets it and returns the previous one."""
    previous = torch.ops.fusionops._tf_small_work(-1)
    assert previous > 0
    assert torch.ops.fusionops._tf_small_work(5) == previous
    assert torch.ops.fusionops._tf_small_work(previous) == 5


# --- the one-pass path of the public function (TF._eager_cpu_rows) ---------------------------


def _one_pass_case():
    dims = (3, 4)
    xs = make_xs((5,), dims, torch.float32)
    w, b = make_weight(dims, 2, torch.float32)
    return xs, w, b


@pytest.mark.parametrize("compiled_entry", [True, False])
def test_one_pass_serves_the_common_call_like_the_full_path(compiled_entry, monkeypatch):
    """The common call is served by the one pass (the full path's checks never run), with the
    same result, gradients and dispatch count as the full path; inference calls follow the
    size and narrow-width rules there too. With the compiled entry (test_compiled_entries.py)
    and with the Python one pass alone, as without the extension."""
    if not compiled_entry:
        monkeypatch.setattr(TF, "_COMPILED_ENTRY", None)
    xs, w, b = _one_pass_case()
    g = make_grad((5, 2), torch.float32, "cpu")
    fusionops.reset_dispatch_counts()
    y_full = fusionops.tensor_fusion(xs, w, b, mask=torch.ones(5, 2, dtype=torch.bool))  # full path
    grads_full = _grads(y_full, [*xs, w, b], g)

    def refuse(*args, **kwargs):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(TF, "_check_args", refuse)
    y = fusionops.tensor_fusion(xs, w, b)
    assert "ProjectedEager" in y.grad_fn.name()
    torch.testing.assert_close(y, y_full, rtol=0, atol=0)
    for a, e in zip(_grads(y, [*xs, w, b], g), grads_full, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert fusionops.dispatch_counts()["tensor_fusion"] == {"cpu": 2}
    with torch.no_grad():  # N*K = 100, widths <= 8: the narrow-width inference rule, fused
        y0 = fusionops.tensor_fusion(xs, w, b)
        assert fusionops.dispatch_counts()["tensor_fusion"] == {"cpu": 3}
        wide = make_xs((5,), (9, 2), torch.float32)  # one modality 9 wide: the reference serves
        w9, _ = make_weight((9, 2), 2, torch.float32)
        fusionops.tensor_fusion(wide, w9, None)
        assert fusionops.dispatch_counts()["tensor_fusion"] == {"cpu": 3, "reference": 1}
        with fusionops.backend("cpu"):
            y1 = fusionops.tensor_fusion(tuple(xs), w, None)
    assert fusionops.dispatch_counts()["tensor_fusion"] == {"cpu": 4, "reference": 1}
    assert_close_to(y0, y_full.detach(), torch.float32)
    assert_close_to(y1, reference.tensor_fusion(xs, w, None).detach(), torch.float32)


def _others():
    """Calls the one pass must leave to the full path (it returns None for each)."""
    xs, w, b = _one_pass_case()
    x0, x1 = xs
    return {
        "3-d rows": ([x0[None], x1[None]], w, b),
        "1-d modality": ([x0[0], x1[0]], w, b),
        "zero width": ([x0, x1[:, :0]], w[:, :4], b),
        "batch mismatch": ([x0, x1[:4]], w, b),
        "dtype mismatch": ([x0, x1.double()], w, b),
        "weight dtype": (xs, w.double(), b),
        "weight width": (xs, w[:, :-1], b),
        "weight 1-d": (xs, w[0], b),
        "bias dtype": (xs, w, b.double()),
        "bias shape": (xs, w, b[:1]),
        "bias 2-d": (xs, w, b[None]),
        "integer rows": ([x0.long(), x1.long()], w.long(), b.long()),
        "no weight": (xs, None, None),
        "not a list": (x0, w, b),
        "empty list": ([], w, b),
        "not a tensor": ([x0, x1.tolist()], w, b),
        "weight not a tensor": (xs, w.tolist(), b),
        "meta weight": (xs, w.to("meta"), b),
        "meta modality": ([x0, x1.to("meta")], w, b),
    }


@pytest.mark.parametrize("case", list(_others()))
def test_one_pass_leaves_everything_else_to_the_full_path(case):
    xs, w, b = _others()[case]
    fusionops.reset_dispatch_counts()
    assert TF._eager_cpu_rows(xs, w, b) is None
    assert fusionops.dispatch_counts() == {}


def test_one_pass_leaves_autocast_forced_backends_and_transforms_to_the_full_path():
    xs, w, b = _one_pass_case()
    assert TF._eager_cpu_rows(xs, w, b) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert TF._eager_cpu_rows(xs, w, b) is None
    for name in ("reference", "triton", "cuda"):
        with fusionops.backend(name):
            assert TF._eager_cpu_rows(xs, w, b) is None
    seen = []
    torch.func.vmap(lambda x: seen.append(TF._eager_cpu_rows([x[None], x[None]], w[:, :16], b)) or x)(
        torch.randn(2, 3)
    )
    assert seen == [None]
    sub = torch.nn.Parameter(w.detach().clone())  # a Parameter is served like a tensor
    assert TF._eager_cpu_rows(xs, sub, b) is not None


def test_one_pass_keeps_the_full_paths_errors():
    """A malformed call still gets the full path's message (naming the argument)."""
    xs, w, b = _one_pass_case()
    with pytest.raises(ValueError, match=r"weight must have shape \(O, K\)"):
        fusionops.tensor_fusion(xs, w[:, :-1], b)
    with pytest.raises(ValueError, match="bias must have shape"):
        fusionops.tensor_fusion(xs, w, b[:1])
    with pytest.raises(TypeError, match=r"xs\[1\] has dtype torch.float64"):
        fusionops.tensor_fusion([xs[0], xs[1].double()], w, b)
