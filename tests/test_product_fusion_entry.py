"""Product fusion's compiled eager entry (csrc/cpu/product_eager.cpp; issue 15: fixed cost).

``fusionops._C._product_reference_eager(xs)`` serves the calls the size rule gives to the
reference, with the reference's own multiplies (the same bits, the same autograd graph), and
returns None for everything else, which then takes the Python path as before. The public op
takes it only while no backend is forced anywhere and nothing is traced.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from inputs import LAYOUTS, make_xs
from test_one_pass import _product_others

import fusionops
import fusionops.ops.product_fusion  # noqa: F401  (the module, not the function of that name)
from fusionops import _backend, reference

PF = sys.modules["fusionops.ops.product_fusion"]
ENTRY = PF._REFERENCE_EAGER
pytestmark = pytest.mark.skipif(ENTRY is None, reason="fusionops._C is not built")


def _graph(t: torch.Tensor) -> list[str]:
    """The names of the autograd nodes behind ``t``, depth first."""
    out, todo = [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            out.append(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_serves_the_reference_bit_for_bit(m, dtype, layout):
    xs = make_xs((3, 5), (7,) * m, dtype, layout=layout, seed=m)
    if layout != "broadcast":  # non-finite values propagate as in the reference
        xs[1].data[0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    fusionops.reset_dispatch_counts()
    got = ENTRY(xs)
    assert fusionops.dispatch_counts() == {"product_fusion": {"reference": 1}}
    want = reference.product_fusion(xs)
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
    assert _graph(got) == _graph(want)
    g = torch.randn(want.shape, dtype=torch.float64).to(dtype)
    for a, e in zip(torch.autograd.grad(got, xs, g), torch.autograd.grad(want, xs, g), strict=True):
        assert torch.equal(a.nan_to_num(), e.nan_to_num())


def test_one_modality_is_returned_itself_and_a_tuple_or_parameters_are_accepted():
    x = torch.randn(4, 3)
    assert ENTRY([x]) is x and ENTRY((x,)) is x
    ps = (torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3)))
    out = ENTRY(ps)
    assert type(out) is torch.Tensor and torch.equal(out, ps[0] * ps[1])
    with torch.no_grad():  # and inference: no graph
        assert ENTRY(ps).grad_fn is None


def test_large_call_releases_and_takes_back_the_gil():
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
    big = torch.randn(1, 1)
    cases = dict(_product_others())
    cases.update(
        {
            "subclass": [x.as_subclass(_Sub), x.as_subclass(_Sub)],
            "float and list": [x, [x]],
            "sparse": [x.to_sparse(), x.to_sparse()],
            "integer first": [x.int(), x],
            # the size rule gives these to the fused kernels (stride 0: no memory)
            "fused, inference": [big.expand(1 << 11, 1 << 11)] * 3,
            "fused, training": [big.requires_grad_().expand(1 << 10, 1 << 10)] * 3,
        }
    )
    return cases


@pytest.mark.parametrize("case", list(_declined()))
def test_declines_what_it_does_not_serve(case):
    xs = _declined()[case]
    fusionops.reset_dispatch_counts()
    assert ENTRY(xs) is None
    assert fusionops.dispatch_counts() == {}


def test_declines_under_autocast_and_torch_function_modes():
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


def test_vmap_sees_the_same_multiply():
    xs = [torch.randn(5, 4, 3), torch.randn(5, 4, 3)]
    got = torch.func.vmap(lambda a, b: ENTRY([a, b]))(*xs)
    assert torch.equal(got, xs[0] * xs[1])


def test_public_op_steps_aside_while_a_backend_is_forced(monkeypatch):
    """Forced in this thread, in another one, or by FUSIONOPS_BACKEND: the Python path decides
    (it alone knows which thread forces what)."""
    xs = [torch.randn(4, 3), torch.randn(4, 3)]
    calls = PF._REFERENCE_EAGER
    monkeypatch.setattr(PF, "_REFERENCE_EAGER", lambda xs: pytest.fail("the compiled entry ran"))
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
    monkeypatch.setattr(PF, "_REFERENCE_EAGER", calls)
    monkeypatch.setattr(_backend, "_env_forced", "")
    with fusionops.backend(None):
        fusionops.product_fusion(xs)
    assert fusionops.dispatch_counts() == {"product_fusion": {"cpu": 3, "reference": 2}}


def test_compiled_graph_never_calls_it():
    xs = [torch.randn(4, 3), torch.randn(4, 3)]
    fn = torch.compile(lambda a, b: fusionops.product_fusion([a, b]) + 1, fullgraph=True, backend="eager")
    assert torch.equal(fn(*xs), xs[0] * xs[1] + 1)
