"""The one-pass accept of common eager CPU calls (issue 15: fixed cost).

``_backend.choose_cpu_eager`` makes :func:`_backend.choose`'s decision for the common case
(CPU, float, not traced, no autocast, no transform, forced backend none or cpu) without
building reasons; ops call it after ``_checks.plain_cpu_modalities`` and their own one-pass
shape test, and leave every other call (each malformed one included) to the full path.
Checked here: the same decision as ``choose`` for every registered op around its thresholds,
None wherever the common case does not hold, and product fusion's one pass (tensor fusion's
is in test_tensor_fusion_eager.py).
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import assert_close_to, skip_unless_usable
from inputs import make_xs

import fusionops
import fusionops.ops.product_fusion  # noqa: F401  (the module, not the function of that name)
from fusionops import _backend, reference
from fusionops._checks import plain_cpu_like, plain_cpu_modalities
from fusionops.registry import OPS

PF = sys.modules["fusionops.ops.product_fusion"]
CPU = torch.device("cpu")


def _sizes(op):
    out = {0, 1, 1 << 40}
    for t in (op.cpu_min_size, op.cpu_min_size_forward):
        out |= {max(t - 1, 0), t, t + 1}
    return sorted(out)


@pytest.mark.parametrize("forced", [None, "cpu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", sorted(OPS))
def test_same_decision_as_choose(name, training, forced):
    op = OPS[name]
    for modalities in (1, 2, 3, 5):
        for size in _sizes(op):
            with fusionops.backend(forced):
                fusionops.reset_dispatch_counts()
                got = _backend.choose_cpu_eager(op, modalities, size, training)
                counted = fusionops.dispatch_counts()
                fusionops.reset_dispatch_counts()
                want = _backend.choose(op, CPU, torch.float32, modalities, size, training)
            assert got == want, (name, modalities, size, training, forced)
            assert counted == fusionops.dispatch_counts()


def test_none_outside_the_common_case(monkeypatch):
    op = OPS["tensor_fusion"]
    assert _backend.choose_cpu_eager(op, 2, 1 << 30, True) == "cpu"
    for name in ("reference", "triton", "cuda"):
        with fusionops.backend(name):
            assert _backend.choose_cpu_eager(op, 2, 1 << 30, True) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _backend.choose_cpu_eager(op, 2, 1 << 30, True) is None
    seen = []
    torch.func.vmap(lambda x: seen.append(_backend.choose_cpu_eager(op, 2, 1 << 30, True)) or x)(
        torch.ones(2)
    )
    assert seen == [None]
    monkeypatch.setattr(_backend, "_env_forced", "triton")
    assert _backend.choose_cpu_eager(op, 2, 1 << 30, True) is None
    monkeypatch.setattr(_backend, "_env_forced", "cpu")
    assert _backend.choose_cpu_eager(op, 2, 1, True) == "cpu"  # forced: the size rule is off
    monkeypatch.setattr(_backend, "_cpu_serves", {"tensor_fusion": False})  # as if not built
    assert _backend.choose_cpu_eager(op, 2, 1 << 30, True) is None


def test_plain_cpu_modalities():
    x = torch.randn(3, 2)
    assert plain_cpu_modalities([x, torch.randn(3, 4)]) == torch.float32
    assert plain_cpu_modalities((x, torch.nn.Parameter(torch.randn(3, 2)))) == torch.float32
    for bad in ([], x, [x, x.double()], [x, 1.0], [x.long()], [x, x.to("meta")], [x.to("meta")], "ab"):
        assert plain_cpu_modalities(bad) is None, bad
    assert plain_cpu_like(x, torch.float32)
    assert not plain_cpu_like(x, torch.float64) and not plain_cpu_like([x], torch.float32)


# --- product fusion's one pass ---------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 5])
def test_product_one_pass_like_the_full_path(m, monkeypatch):
    """Served without the full checks; output and gradients those of the full path, on the
    reference (small) and on the cpu kernels (forced), leading shapes kept."""
    skip_unless_usable("cpu", "cpu", op=PF.OPDEF)
    xs = [x.requires_grad_() for x in make_xs((2, 5), (7,) * m, torch.float32)]
    g = torch.randn(2, 5, 7)
    want = reference.product_fusion(xs)
    want_grads = torch.autograd.grad(want, xs, g)

    def refuse(*args, **kwargs):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(PF, "_check_args", refuse)
    fusionops.reset_dispatch_counts()
    got = fusionops.product_fusion(xs)
    with fusionops.backend("cpu"):
        got_cpu = fusionops.product_fusion(xs)
    assert fusionops.dispatch_counts()["product_fusion"] == {"reference": 1, "cpu": 1}
    assert got.shape == got_cpu.shape == (2, 5, 7)
    for out in (got, got_cpu):
        assert_close_to(out, want.detach(), torch.float32)
        for a, e in zip(torch.autograd.grad(out, xs, g), want_grads, strict=True):
            assert_close_to(a, e, torch.float32)


def _product_others():
    x = torch.randn(4, 3)
    return {
        "broadcastable": [x, x[:1]],
        "other width": [x, x[:, :2]],
        "0-d": [x[0, 0], x[0, 1]],
        "zero width": [x[:, :0], x[:, :0]],
        "dtype": [x, x.double()],
        "integer": [x.long(), x.long()],
        "meta": [x, x.to("meta")],
        "not a list": x,
        "empty": [],
    }


@pytest.mark.parametrize("case", list(_product_others()))
def test_product_one_pass_leaves_everything_else_to_the_full_path(case):
    fusionops.reset_dispatch_counts()
    assert PF._eager_cpu(_product_others()[case]) is None
    assert fusionops.dispatch_counts() == {}


def test_product_full_path_errors_unchanged():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"xs\[1\] has leading shape \(1,\)"):
        fusionops.product_fusion([x, x[:1]])
    with pytest.raises(ValueError, match=r"xs\[1\] has width 2 but xs\[0\] has 3"):
        fusionops.product_fusion([x, x[:, :2]])
