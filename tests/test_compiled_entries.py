"""The compiled eager entries (csrc/cpu/eager_entry.h; issue 15: fixed cost).

``fusionops._C._product_eager(xs)`` serves the calls product fusion's size rule gives to the
reference; ``fusionops._C._tensor_fusion_eager(xs, weight, bias)`` the common projection on
either choice. On the reference they run the reference's own ATen ops (the same bits, the same
autograd graph); they make the Python rule's choice (``OpDef.prefers_fused``) and count it, and
return None for everything else, which then takes the Python path as before. The public ops take
them only while no backend is forced anywhere and nothing is traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading

import pytest
import torch
from conftest import assert_close_to
from inputs import LAYOUTS, make_weight, make_xs
from test_one_pass import _product_others

import fusionops
import fusionops.ops.product_fusion  # noqa: F401  (the module, not the function of that name)
import fusionops.ops.tensor_fusion  # noqa: F401
from fusionops import _backend, reference
from fusionops.registry import OPS

PF = sys.modules["fusionops.ops.product_fusion"]
TF = sys.modules["fusionops.ops.tensor_fusion"]
ENTRY = PF._COMPILED_ENTRY
TF_ENTRY = TF._COMPILED_ENTRY
pytestmark = pytest.mark.skipif(ENTRY is None or TF_ENTRY is None, reason="fusionops._C is not built")


def _graph(t: torch.Tensor) -> list[str]:
    """The names of the autograd nodes behind ``t``, depth first."""
    out, todo = [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            out.append(node.name())
            todo.extend(n for n, _ in node.next_functions)
    return out


@contextlib.contextmanager
def _entry_rule(name: str, **fields):
    """The compiled entry of op ``name`` given a rule with ``fields`` changed, for the block."""
    op = OPS[name]
    _backend.hand_rule_to_entry(dataclasses.replace(op, **fields))
    try:
        yield
    finally:
        _backend.hand_rule_to_entry(op)


def _same_bits(a: torch.Tensor, e: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(), e.nan_to_num()) and torch.equal(a.isnan(), e.isnan())


def _assert_same_grads(got: torch.Tensor, want: torch.Tensor, leaves, g: torch.Tensor) -> None:
    """The gradients of ``got`` and ``want`` with respect to ``leaves``, bit for bit."""
    for a, e in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), strict=True):
        assert _same_bits(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_product_serves_the_reference_bit_for_bit(m, dtype, layout):
    xs = make_xs((3, 5), (7,) * m, dtype, layout=layout, seed=m)
    if layout != "broadcast":  # non-finite values propagate as in the reference
        xs[1].data[0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    fusionops.reset_dispatch_counts()
    with _entry_rule("product_fusion", cpu_min_modalities=99):  # M >= 3 is fused at every size
        got = ENTRY(xs)
    assert fusionops.dispatch_counts() == {"product_fusion": {"reference": 1}}
    want = reference.product_fusion(xs)
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert _same_bits(got, want) and _graph(got) == _graph(want)
    _assert_same_grads(got, want, xs, torch.randn(want.shape, dtype=torch.float64).to(dtype))


def test_product_one_modality_is_returned_itself_and_a_tuple_or_parameters_are_accepted():
    x = torch.randn(4, 3)
    assert ENTRY([x]) is x and ENTRY((x,)) is x
    ps = (torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3)))
    out = ENTRY(ps)
    assert type(out) is torch.Tensor and torch.equal(out, ps[0] * ps[1])
    with torch.no_grad():  # and inference: no graph
        assert ENTRY(ps).grad_fn is None


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("lead", [(0,), (1,), (3, 5)])
@pytest.mark.parametrize("m", [2, 3])
def test_product_kernels_as_the_python_path_serves_them(m, lead, training):
    """Fused by the rule (here at every size): the same kernels as the Python path with cpu
    forced (the same bits), their autograd in C++, leading shapes kept."""
    xs = make_xs(lead, (7,) * m, torch.float32, layout="strided", seed=m)
    every_size = {"cpu_min_modalities": 1, "cpu_min_size": 0, "cpu_min_size_forward": 0}
    with torch.set_grad_enabled(training), _entry_rule("product_fusion", **every_size):
        fusionops.reset_dispatch_counts()
        got = ENTRY(xs)
        assert fusionops.dispatch_counts() == {"product_fusion": {"cpu": 1}}
        with fusionops.backend("cpu"):
            want = fusionops.product_fusion(xs)
    assert got.shape == want.shape and _same_bits(got, want) and (got.grad_fn is None) != training
    if training:
        assert _graph(got) == _graph(want) and any("ProductEager" in node for node in _graph(got))
        _assert_same_grads(got, want, xs, torch.randn(want.shape))


@pytest.mark.parametrize("m", [1, 2, 3])
def test_product_eager_op_opcheck(m):
    """The kernels' eager op with its C++ autograd (csrc/cpu/eager_autograd.cpp)."""
    xs = [x.detach().double().requires_grad_() for x in make_xs((5,), (4,) * m, torch.float32, seed=m)]
    torch.library.opcheck(torch.ops.fusionops._product_eager.default, (xs,))

    def op(*leaves):
        return torch.ops.fusionops._product_eager.default(list(leaves))

    assert torch.autograd.gradcheck(op, tuple(xs)) and torch.autograd.gradgradcheck(op, tuple(xs))


def test_product_large_call_releases_and_takes_back_the_gil():
    """From 2^16 elements the multiplies run without the GIL (as torch's own calls do)."""
    xs = [torch.randn(256, 257), torch.randn(256, 257)]
    out = [None]
    t = threading.Thread(target=lambda: out.__setitem__(0, ENTRY(xs)))
    t.start()
    t.join(30)
    assert torch.equal(out[0], xs[0] * xs[1])


class _Sub(torch.Tensor):
    pass


def _declined():
    x = torch.randn(4, 3)
    cases = dict(_product_others())
    cases.update(
        {
            "subclass": [x.as_subclass(_Sub), x.as_subclass(_Sub)],
            "float and list": [x, [x]],
            "sparse": [x.to_sparse(), x.to_sparse()],
            "integer first": [x.int(), x],
        }
    )
    return cases


@pytest.mark.parametrize("case", list(_declined()))
def test_product_declines_what_it_does_not_serve(case):
    xs = _declined()[case]
    fusionops.reset_dispatch_counts()
    assert ENTRY(xs) is None
    assert fusionops.dispatch_counts() == {}


def test_product_declines_under_autocast_and_torch_function_modes():
    xs = [torch.randn(4, 3), torch.randn(4, 3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ENTRY(xs) is None
    seen = []

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        assert ENTRY(xs) is None
        assert torch.equal(fusionops.product_fusion(xs), xs[0] * xs[1])
    assert torch.Tensor.mul in seen or torch.mul in seen, seen  # the mode saw the reference's `*`


def test_product_declines_under_functorch_transforms():
    xs = [torch.randn(5, 4, 3), torch.randn(5, 4, 3)]
    seen = []
    got = torch.func.vmap(lambda a, b: seen.append(ENTRY([a, b])) or fusionops.product_fusion([a, b]))(*xs)
    assert seen == [None] and torch.equal(got, xs[0] * xs[1])


def test_product_steps_aside_while_a_backend_is_forced(monkeypatch):
    """Forced in this thread, in another one, or by FUSIONOPS_BACKEND: the Python path decides
    (it alone knows which thread forces what)."""
    xs = [torch.randn(4, 3), torch.randn(4, 3)]
    entry = PF._COMPILED_ENTRY
    monkeypatch.setattr(PF, "_COMPILED_ENTRY", lambda xs: pytest.fail("the compiled entry ran"))
    fusionops.reset_dispatch_counts()
    with fusionops.backend("cpu"):
        fusionops.product_fusion(xs)
    inside, release = threading.Event(), threading.Event()

    def worker():
        with fusionops.backend("cpu"):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    try:
        fusionops.product_fusion(xs)  # this thread forces nothing: the reference, via Python
    finally:
        release.set()
        t.join(10)
    assert _backend._open_blocks == 0
    monkeypatch.setattr(_backend, "_env_forced", "cpu")
    fusionops.product_fusion(xs)
    with fusionops.backend(None):  # None forces nothing, but FUSIONOPS_BACKEND still does
        fusionops.product_fusion(xs)
    monkeypatch.setattr(PF, "_COMPILED_ENTRY", entry)
    monkeypatch.setattr(_backend, "_env_forced", "")
    with fusionops.backend(None):
        fusionops.product_fusion(xs)
    assert fusionops.dispatch_counts() == {"product_fusion": {"cpu": 3, "reference": 2}}


def test_product_compiled_graph_never_calls_it():
    xs = [torch.randn(4, 3), torch.randn(4, 3)]
    fn = torch.compile(lambda a, b: fusionops.product_fusion([a, b]) + 1, fullgraph=True, backend="eager")
    assert torch.equal(fn(*xs), xs[0] * xs[1] + 1)


# --- both entries: the size rule ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["product_fusion", "tensor_fusion"])
def test_entry_rule_is_the_opdefs(name):
    op = OPS[name]
    narrow = {op.cpu_narrow_width, op.cpu_narrow_width_forward} - {0}
    sizes = {0, 1, 1 << 40} | {t + e for t in (op.cpu_min_size, op.cpu_min_size_forward) for e in (-1, 0, 1)}
    for training in (True, False):
        for modalities in (1, 2, 3, 5):
            for size in sorted(s for s in sizes if s >= 0):
                for widest in sorted({1, 8, 300} | narrow | {w + 1 for w in narrow}):
                    want = op.prefers_fused(torch.device("cpu"), size, modalities, training, widest)
                    got = fusionops._C._eager_prefers_fused(name, size, modalities, training, widest)
                    assert got == want, (name, training, modalities, size, widest)


# --- tensor fusion's entry -----------------------------------------------------------------------


def _tf_call(dims, n, dtype, layout="contiguous", o=6, bias=True, seed=0):
    xs = make_xs((n,), dims, dtype, layout=layout, seed=seed)
    w, b = make_weight(dims, o, dtype, seed=seed + 1)
    return xs, w, (b if bias else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("dims", [(9,), (9, 13), (10, 3, 12), (9, 2, 3, 11)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_fusion_inference_serves_the_reference_bit_for_bit(dims, dtype, layout):
    """Widths above 8, small N*K: the rule's reference, run op for op in C++."""
    xs, w, b = _tf_call(dims, 7, dtype, layout, bias=len(dims) != 2)
    if layout != "broadcast":
        xs[0].data[1, :2] = torch.tensor([float("nan"), float("inf")])
    fusionops.reset_dispatch_counts()
    with torch.no_grad():
        got = TF_ENTRY(xs, w, b)
        want = reference.tensor_fusion(xs, w, b)
    assert fusionops.dispatch_counts() == {"tensor_fusion": {"reference": 1}}
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _same_bits(got, want)


def test_tensor_fusion_reference_graph_and_gradients_bit_for_bit(monkeypatch):
    """With gradients (the rule's choice is the fused kernels at every size: forced to the
    reference here by a rule that never prefers them), the reference's own graph."""
    xs, w, b = _tf_call((9, 13, 4), 5, torch.float32)
    with _entry_rule("tensor_fusion", cpu_min_modalities=99):
        got = TF_ENTRY(xs, w, b)
    want = reference.tensor_fusion(xs, w, b)
    assert torch.equal(got, want) and _graph(got) == _graph(want)
    _assert_same_grads(got, want, [*xs, w, b], torch.randn(want.shape))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("n", [0, 1, 9])
def test_tensor_fusion_kernels_as_the_python_path_serves_them(training, n):
    """Fused by the rule (with gradients: every size; inference: widths <= 8): the same
    kernels, so the same bits, as the Python path with cpu forced."""
    xs, w, b = _tf_call((3, 8, 5), n, torch.float32)
    g = torch.randn(n, 6)
    with torch.set_grad_enabled(training):
        fusionops.reset_dispatch_counts()
        got = TF_ENTRY(xs, w, b)
        assert fusionops.dispatch_counts() == {"tensor_fusion": {"cpu": 1}}
        with fusionops.backend("cpu"):
            want = fusionops.tensor_fusion(xs, w, b)
    assert torch.equal(got, want)
    assert (got.grad_fn is None) != training
    if training:
        assert type(got.grad_fn) is type(want.grad_fn)
        _assert_same_grads(got, want, [*xs, w, b], g)


def _tf_declined():
    from test_tensor_fusion_eager import _others

    xs, w, b = _tf_call((3, 4), 5, torch.float32)
    huge = torch.randn(1, 1).expand(1, 1 << 20)
    cases = dict(_others())
    cases.update(
        {
            "subclass weight": (xs, w.detach().as_subclass(_Sub), b),
            "subclass modality": ([xs[0].detach().as_subclass(_Sub), xs[1]], w, b),
            "sparse weight": (xs, w.detach().to_sparse(), b),
            "bias not a tensor": (xs, w, 1.0),
            "K overflows int64": ([huge] * 4, w, b),
        }
    )
    return cases


@pytest.mark.parametrize("case", list(_tf_declined()))
def test_tensor_fusion_declines_what_it_does_not_serve(case):
    xs, w, b = _tf_declined()[case]
    fusionops.reset_dispatch_counts()
    assert TF_ENTRY(xs, w, b) is None
    assert fusionops.dispatch_counts() == {}


def test_tensor_fusion_declines_under_modes_and_transforms():
    xs, w, b = _tf_call((3, 4), 5, torch.float32)
    assert TF_ENTRY(xs, w, b) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert TF_ENTRY(xs, w, b) is None
    with torch.overrides.TorchFunctionMode():
        assert TF_ENTRY(xs, w, b) is None
    seen = []
    call = lambda x: seen.append(TF_ENTRY([x[None], x[None]], w[:, :16], b))  # noqa: E731
    torch.func.vmap(lambda x: call(x) or x)(torch.randn(2, 3))
    torch.func.grad(lambda x: call(x) or x.sum())(torch.randn(3))
    assert seen == [None, None]
    assert TF_ENTRY(xs, w) is None and TF_ENTRY(xs, w, b, None) is None  # three arguments or None


def test_tensor_fusion_steps_aside_while_forced(monkeypatch):
    xs, w, b = _tf_call((3, 4), 5, torch.float32)
    monkeypatch.setattr(TF, "_COMPILED_ENTRY", lambda *a: pytest.fail("the compiled entry ran"))
    with fusionops.backend("reference"):
        assert torch.equal(fusionops.tensor_fusion(xs, w, b), reference.tensor_fusion(xs, w, b))
    monkeypatch.setattr(_backend, "_env_forced", "reference")
    fusionops.tensor_fusion(xs, w, b)
    fusionops.tensor_fusion(xs, w, b, mask=torch.ones(5, 2, dtype=torch.bool))  # a mask: never the entry


def test_tensor_fusion_compiled_graph_never_calls_it():
    """Automatic choice under torch.compile: the entry's guard is a constant there, so the
    graph holds the op's own custom op or ATen ops, never the entry (fullgraph would fail)."""
    xs, w, b = _tf_call((3, 4), 5, torch.float32)
    fn = torch.compile(
        lambda xs, w, b: fusionops.tensor_fusion(xs, w, b) + 1, fullgraph=True, backend="eager"
    )
    with torch.no_grad():
        assert_close_to(fn(xs, w, b), reference.tensor_fusion(xs, w, b) + 1, torch.float32)
