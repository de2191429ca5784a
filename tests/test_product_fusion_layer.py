"""ProductFusion, the paper's ProductConcat (batch flip included) and Concat."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to, assert_compiled_matches_reference, skip_unless_usable
from inputs import make_xs

import fusionops
from fusionops import Concat, ProductConcat, ProductFusion


def paper_product_concat(xs):
    """Michaels et al.'s ProductConcat.forward, as written there."""
    prod = xs[0] * xs[1]
    inv_prod = xs[0] * xs[1].flip(0)
    return torch.cat([prod, inv_prod], dim=1)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_product_concat_is_the_papers_layer(backend):
    if backend != "reference":
        skip_unless_usable(backend, "cpu")
    v, t = (x.detach() for x in make_xs((5,), (6, 6), torch.float64))
    with fusionops.backend(backend):
        got = ProductConcat()([v, t])
    assert got.shape == (5, 12)
    assert_close_to(got, paper_product_concat([v, t]), torch.float64, "ProductConcat")
    # the second half pairs sample i with sample B-1-i
    assert torch.equal(got[0, 6:], v[0] * t[4])


def test_product_concat_gradients_match_the_paper():
    v, t = make_xs((4,), (3, 3), torch.float64)
    g = torch.randn(4, 6, dtype=torch.float64)
    ProductConcat()([v, t]).backward(g)
    mine = v.grad.clone(), t.grad.clone()
    v.grad = t.grad = None
    paper_product_concat([v, t]).backward(g)
    assert_close_to(mine[0], v.grad, torch.float64, "dv")
    assert_close_to(mine[1], t.grad, torch.float64, "dt")


def test_product_fusion_and_concat_layers():
    xs = [x.detach() for x in make_xs((4,), (3, 3, 3), torch.float64)]
    assert_close_to(ProductFusion()(xs), xs[0] * xs[1] * xs[2], torch.float64, "ProductFusion")
    ys = [x.detach() for x in make_xs((4,), (2, 5), torch.float64)]
    assert torch.equal(Concat()(ys), torch.cat(ys, dim=1))
    zs = [x.detach() for x in make_xs((4, 3), (2, 5), torch.float64)]
    assert Concat()(zs).shape == (4, 21)  # MultiBench's: flattened from dim 1 (tests/test_concat_layer.py)


def test_layer_errors():
    with pytest.raises(ValueError, match=r"ProductConcat: expected two modalities \[v, t\], got 3"):
        ProductConcat()([torch.randn(2, 3)] * 3)
    with pytest.raises(ValueError, match=r"product_fusion: xs\[1\] has width 4 but xs\[0\] has 3"):
        ProductConcat()([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(ValueError, match=r"Concat: modalities must be a non-empty list"):
        Concat()(torch.randn(2, 3))


class SmallModel(torch.nn.Module):
    def __init__(self, d: int, m: int):
        super().__init__()
        self.enc = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(m))
        self.fusion = ProductFusion()
        self.head = torch.nn.Linear(d, 2)

    def forward(self, xs):
        return self.head(self.fusion([e(x) for e, x in zip(self.enc, xs, strict=True)]))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compile_fullgraph(backend):
    if backend != "reference":
        skip_unless_usable(backend, "cpu")
    torch.manual_seed(0)
    model = SmallModel(5, 3)
    xs = [x.detach() for x in make_xs((6,), (5, 5, 5), torch.float32)]
    assert_compiled_matches_reference(model, xs, backend)
