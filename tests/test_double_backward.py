"""Second order (a backward with ``create_graph=True``): tensor, low-rank and product fusion
give differentiable gradients on every backend (through the reference: ops/_eager.py), equal
to the kernels' own first-order gradients; skew-pair attention and multiple kernel fusion
refuse at that first backward with an error that says what to do."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_to, skip_unless_usable
from inputs import make_factors, make_mask, make_weight, make_xs

import fusionops
from fusionops.ops._eager import DoubleBackwardError
from fusionops.registry import OPS

F64 = torch.float64
BACKENDS = ["cpu", "triton", "reference"]


def _usable(backend: str, op: str) -> None:
    if backend != "reference":
        skip_unless_usable(backend, "cpu", F64, op=OPS[op])


def _leaves(ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# Each case: (op name, inputs as leaves, function of those leaves under a forced backend).
def _tf_features():
    xs = _leaves(make_xs((3,), (2, 3), F64, seed=11))
    mask = make_mask((3,), 2, seed=5)
    return "tensor_fusion", xs, lambda *t: fusionops.tensor_fusion(list(t), mask=mask)


def _tf_projected():
    dims = (2, 1, 2)
    xs = make_xs((4,), dims, F64, seed=12)
    w, b = make_weight(dims, 3, F64, seed=13)
    mask = make_mask((4,), 3, seed=6)
    leaves = _leaves([*xs, w, b])
    return "tensor_fusion", leaves, lambda *t: fusionops.tensor_fusion(list(t[:3]), t[3], t[4], mask=mask)


def _lmf():
    dims = (2, 3)
    xs = make_xs((3,), dims, F64, seed=14)
    factors, rank_weight, bias = make_factors(dims, 2, 3, F64, seed=15)
    mask = make_mask((3,), 2, seed=7)
    leaves = _leaves([*xs, *factors, rank_weight, bias])

    def f(*t):
        return fusionops.low_rank_fusion(list(t[:2]), list(t[2:4]), t[4], t[5], mask=mask)

    return "low_rank_fusion", leaves, f


def _product():
    xs = _leaves(make_xs((3,), (4, 4, 4), F64, seed=16))
    return "product_fusion", xs, lambda *t: fusionops.product_fusion(list(t))


SUPPORTED = {"tf_features": _tf_features, "tf_projected": _tf_projected, "lmf": _lmf, "product": _product}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SUPPORTED)
def test_gradgradcheck(backend, case):
    op, leaves, f = SUPPORTED[case]()
    _usable(backend, op)

    def under_backend(*t):
        with fusionops.backend(backend):
            return f(*t)

    assert torch.autograd.gradgradcheck(under_backend, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", SUPPORTED)
def test_first_order_with_create_graph_equals_the_kernels(backend, case):
    """The differentiable gradients (create_graph=True) are the kernels' gradients, and they
    carry a graph back to the inputs."""
    op, leaves, f = SUPPORTED[case]()
    _usable(backend, op)
    with fusionops.backend(backend):
        y = f(*leaves)
    g = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    plain = torch.autograd.grad(y, leaves, g, retain_graph=True, allow_unused=True)
    graphed = torch.autograd.grad(y, leaves, g, create_graph=True, allow_unused=True)
    assert any(t is not None and t.requires_grad for t in graphed)
    for i, (a, b) in enumerate(zip(plain, graphed, strict=True)):
        if a is None or b is None:  # a masked-out modality may get no gradient on one path
            assert (a is None or not a.any()) and (b is None or not b.any()), f"input {i}"
            continue
        assert_close_to(b.detach(), a, F64, f"grad of input {i}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_custom_op_called_directly_supports_double_backward(backend):
    """``torch.ops.fusionops.tensor_fusion_projected`` (what compiled graphs hold) as well."""
    _usable(backend, "tensor_fusion")
    dims = (2, 2)
    xs = make_xs((3,), dims, F64, seed=17)
    w, b = make_weight(dims, 2, F64, seed=18)
    leaves = _leaves([*xs, w, b])

    def f(x1, x2, w, b):
        return torch.ops.fusionops.tensor_fusion_projected([x1, x2], w, b, None, backend)

    assert torch.autograd.gradgradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _skew():
    gen = torch.Generator().manual_seed(19)
    n, la, lb, d = 2, 3, 2, 4
    ha, hb = torch.randn(n, la, d, dtype=F64, generator=gen), torch.randn(n, lb, d, dtype=F64, generator=gen)
    ws = [torch.randn(d, d, dtype=F64, generator=gen) / math.sqrt(d) for _ in range(4)]
    leaves = _leaves([ha, hb, *ws])

    def f(*t):
        return fusionops.skew_pair_attention(t[0], t[1], [(0, 1), (2, 0)], *t[2:], heads=2, window=1)

    def direct(backend):
        def g(*t):
            pairs = torch.tensor([[0, 1], [2, 0]])
            return torch.ops.fusionops.skew_pair_attention(
                t[0], t[1], pairs, *t[2:], None, None, None, None, 2, 1, backend
            )

        return g

    return "skew_pair_attention", leaves, f, direct


def _mkl():
    gen = torch.Generator().manual_seed(20)
    xs = [torch.randn(5, d, dtype=F64, generator=gen) for d in (2, 3)]
    beta = torch.tensor([0.7, 0.4], dtype=F64)
    leaves = _leaves([*xs, beta])

    def f(*t):
        return fusionops.multiple_kernel(list(t[:2]), None, t[2], ["rbf", "linear"])

    def direct(backend):
        def g(*t):
            params = torch.tensor([0.5, 0.0], dtype=F64)
            xs = list(t[:2])
            return torch.ops.fusionops.multiple_kernel(xs, xs, t[2], [1, 0], params, [0, 0], backend)

        return g

    return "multiple_kernel", leaves, f, direct


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", [_skew, _mkl], ids=["skew_pair", "multiple_kernel"])
@pytest.mark.parametrize("entry", ["public", "custom_op"])
def test_unsupported_double_backward_fails_at_the_first_backward(backend, case, entry):
    op, leaves, f, direct = case()
    _usable(backend, op)
    with fusionops.backend(backend):
        y = f(*leaves) if entry == "public" else direct(backend)(*leaves)
    message = rf"fusionops\.{op}: double backward .*create_graph=True.*reference"
    with pytest.raises(DoubleBackwardError, match=message):
        torch.autograd.grad(y.sum(), leaves, create_graph=True)
    # Without create_graph the same call differentiates as before.
    with fusionops.backend(backend):
        y = f(*leaves)
    assert all(g is not None for g in torch.autograd.grad(y.sum(), leaves))


@pytest.mark.parametrize("case", [_skew, _mkl], ids=["skew_pair", "multiple_kernel"])
def test_reference_backend_gives_second_order_for_the_others(case):
    """What the error message advises works."""
    _, leaves, f, _ = case()

    def under_reference(*t):
        with fusionops.backend("reference"):
            return f(*t)

    assert torch.autograd.gradgradcheck(under_reference, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)
