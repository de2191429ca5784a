"""The one-pass accept of common eager CPU calls (issue 15: fixed cost).

``_backend.choose_cpu_eager`` makes :func:`_backend.choose`'s decision for the common case
(CPU, float, not traced, no autocast, no transform, forced backend none or cpu) without
building reasons; ops call it after ``_checks.plain_cpu_modalities`` and their own one-pass
shape test, and leave every other call (each malformed one included) to the full path.
Checked here: the same decision as ``choose`` for every registered op around its thresholds,
None wherever the common case does not hold, and the one passes of product, multiple kernel and
low-rank fusion (tensor fusion's is in test_tensor_fusion_eager.py).
"""

from __future__ import annotations

import functools
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


def check_one_pass(monkeypatch, module, full_checks, call, leaves, want, counts):
    """``call()`` served without ``module``'s full checks (``full_checks`` refused), once on the
    automatic choice and once with the cpu kernels forced: counted as ``counts``, output and
    every gradient of ``leaves`` those of ``want`` (the reference, same inputs)."""
    skip_unless_usable("cpu", "cpu", op=module.OPDEF)
    g = torch.randn(want.shape)
    want_grads = torch.autograd.grad(want, leaves, g)

    def refuse(*args, **kwargs):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(module, full_checks, refuse)
    fusionops.reset_dispatch_counts()
    outs = [call()]
    with fusionops.backend("cpu"):
        outs.append(call())
    assert fusionops.dispatch_counts()[module.OP] == counts
    for out in outs:
        assert out.shape == want.shape
        assert_close_to(out, want.detach(), torch.float32)
        for a, e in zip(torch.autograd.grad(out, leaves, g), want_grads, strict=True):
            assert_close_to(a, e, torch.float32)


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
    narrow = op.cpu_narrow_width if training else op.cpu_narrow_width_forward
    for modalities in (1, 2, 3, 5):
        for size in _sizes(op):
            for widest in sorted({1, 8, 300, narrow, narrow + 1} - {0}):
                with fusionops.backend(forced):
                    fusionops.reset_dispatch_counts()
                    got = _backend.choose_cpu_eager(op, modalities, size, training, widest)
                    counted = fusionops.dispatch_counts()
                    fusionops.reset_dispatch_counts()
                    want = _backend.choose(op, CPU, torch.float32, modalities, size, training, widest)
                assert got == want, (name, modalities, size, training, forced, widest)
                assert counted == fusionops.dispatch_counts()
            # without a width (0 / None) the size threshold alone decides
            assert _backend.choose_cpu_eager(op, modalities, size, training) == _backend.choose(
                op, CPU, torch.float32, modalities, size, training
            )


def test_narrow_width_rule():
    """Tensor fusion's inference and multiple kernel fusion's training rules exempt narrow
    modalities from the size threshold (measured: they won at every crossover size)."""
    tf, mkl = OPS["tensor_fusion"], OPS["multiple_kernel"]
    assert _backend.choose(tf, CPU, torch.float32, 2, 100, False, 8) == "cpu"
    assert _backend.choose(tf, CPU, torch.float32, 2, 100, False, 9) == "reference"
    assert _backend.choose(tf, CPU, torch.float32, 2, 100, False) == "reference"
    assert _backend.choose(mkl, CPU, torch.float32, 3, 64, True, 32) == "cpu"
    assert _backend.choose(mkl, CPU, torch.float32, 3, 64, True, 33) == "reference"
    assert _backend.choose(mkl, CPU, torch.float32, 3, 64, False, 4) == "cpu"  # inference: every size
    assert "unless every modality is at most 8 wide" in tf.size_rule()


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


@pytest.mark.parametrize("compiled_entry", [True, False])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_product_one_pass_like_the_full_path(m, compiled_entry, monkeypatch):
    """On the reference (small) and on the cpu kernels (forced), leading shapes kept; with
    the compiled eager entry (test_product_fusion_entry.py) and with the Python one pass alone,
    as without the extension."""
    if not compiled_entry:
        monkeypatch.setattr(PF, "_COMPILED_ENTRY", None)
    xs = [x.requires_grad_() for x in make_xs((2, 5), (7,) * m, torch.float32)]
    want = reference.product_fusion(xs)
    call = functools.partial(fusionops.product_fusion, xs)
    counts = {"reference": 1, "cpu": 1} if m < PF.OPDEF.cpu_min_modalities else {"cpu": 2}
    check_one_pass(monkeypatch, PF, "_check_args", call, xs, want, counts)


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


# --- multiple kernel fusion's one pass -------------------------------------------------------

MK = sys.modules["fusionops.ops.multiple_kernel"]


def _mkl_case(n_b=None):
    xs_a = [x.requires_grad_() for x in make_xs((6,), (3, 40), torch.float32, seed=4)]
    xs_b = None if n_b is None else make_xs((n_b,), (3, 40), torch.float32, seed=5)
    beta = torch.tensor([0.3, 0.9]).requires_grad_()
    return xs_a, xs_b, beta


@pytest.mark.parametrize("n_b", [None, 4])
def test_mkl_one_pass_like_the_full_path(n_b, monkeypatch):
    xs_a, xs_b, beta = _mkl_case(n_b)
    kinds = ["rbf", "polynomial"]
    want = reference.multiple_kernel(xs_a, xs_a if xs_b is None else xs_b, beta, kinds)
    call = functools.partial(fusionops.multiple_kernel, xs_a, xs_b, beta, kinds)
    check_one_pass(monkeypatch, MK, "_check_sides", call, [*xs_a, beta], want, {"reference": 1, "cpu": 1})


def _mkl_others():
    xs_a, xs_b, beta = _mkl_case(4)
    a0, a1 = xs_a
    return {
        "beta 2-d": (xs_a, None, beta[None]),
        "beta length": (xs_a, None, beta[:1]),
        "beta dtype": (xs_a, None, beta.double()),
        "xs_b count": (xs_a, xs_b[:1], beta),
        "xs_b width": (xs_a, [xs_b[0], xs_b[1][:, :2]], beta),
        "xs_b dtype": (xs_a, [x.double() for x in xs_b], beta),
        "xs_a rows": ([a0, a1[:5]], None, beta),
        "xs_b rows": (xs_a, [xs_b[0], xs_b[1][:3]], beta),
        "1-d": ([a0[0], a1[0]], None, beta),
        "zero width": ([a0[:, :0], a1], None, beta),
        "meta beta": (xs_a, None, beta.to("meta")),
    }


@pytest.mark.parametrize("case", list(_mkl_others()))
def test_mkl_one_pass_leaves_everything_else_to_the_full_path(case):
    xs_a, xs_b, beta = _mkl_others()[case]
    assert MK._one_pass_sides(xs_a, xs_a if xs_b is None else xs_b, beta) is None


def test_mkl_one_pass_errors_as_the_full_path():
    """Values are still checked, in the full path's order (beta before the kernels)."""
    xs_a, _, beta = _mkl_case()
    with pytest.raises(ValueError, match="beta must be >= 0"):
        fusionops.multiple_kernel(xs_a, None, torch.tensor([0.5, -1.0]), ["nope", "rbf"])
    with pytest.raises(ValueError, match="beta must be finite"):
        fusionops.multiple_kernel(xs_a, None, torch.tensor([0.5, float("nan")]), ["rbf", "rbf"])
    with pytest.raises((TypeError, ValueError), match="nope"):
        fusionops.multiple_kernel(xs_a, None, beta, ["nope", "rbf"])


# --- low-rank fusion's one pass --------------------------------------------------------------

LR = sys.modules["fusionops.ops.low_rank_fusion"]


def _lmf_case(dims=(3, 40), rank=4, out=5):
    xs = [x.requires_grad_() for x in make_xs((6,), dims, torch.float32, seed=4)]
    gen = torch.Generator().manual_seed(6)
    factors = [(torch.randn(rank, d + 1, out, generator=gen) * 0.3).requires_grad_() for d in dims]
    rank_weight = torch.randn(rank, generator=gen).requires_grad_()
    bias = torch.randn(out, generator=gen).requires_grad_()
    return xs, factors, rank_weight, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_lmf_one_pass_like_the_full_path(with_bias, monkeypatch):
    xs, factors, rank_weight, bias = _lmf_case()
    bias = bias if with_bias else None
    leaves = [*xs, *factors, rank_weight] + ([bias] if with_bias else [])
    want = reference.low_rank_fusion(xs, factors, rank_weight, bias)
    call = functools.partial(fusionops.low_rank_fusion, xs, factors, rank_weight, bias)
    check_one_pass(monkeypatch, LR, "_check_args", call, leaves, want, {"cpu": 2})  # rule: always fused


def _lmf_others():
    xs, factors, w, b = [[t.detach() for t in v] if isinstance(v, list) else v.detach() for v in _lmf_case()]
    f0, f1 = factors
    return {
        "leading dims": ([x[None] for x in xs], factors, w, b),
        "rows differ": ([xs[0], xs[1][:3]], factors, w, b),
        "one factor": (xs, [f0], w, b),
        "factors a tensor": (xs, f0, w, b),
        "factor width": (xs, [f0, f1[:, :-1]], w, b),
        "factor rank": (xs, [f0, f1[:2]], w, b),
        "factor output": (xs, [f0, f1[..., :2]], w, b),
        "rank_weight shape": (xs, factors, w[:2], b),
        "bias shape": (xs, factors, w, b[:2]),
        "dtype": (xs, [f0, f1.double()], w, b),
        "integer": ([x.long() for x in xs], factors, w, b),
        "meta": (xs, factors, w.to("meta"), b),
        "zero width": ([xs[0][:, :0], xs[1]], [f0[:, :1], f1], w, b),
        "zero rank": (xs, [f0[:0], f1[:0]], w[:0], b),
        "empty": ([], [], w, b),
    }


@pytest.mark.parametrize("case", list(_lmf_others()))
def test_lmf_one_pass_leaves_everything_else_to_the_full_path(case):
    fusionops.reset_dispatch_counts()
    assert LR._eager_cpu(*_lmf_others()[case]) is None
    assert fusionops.dispatch_counts() == {}


# --- skew-pair attention's one pass ----------------------------------------------------------

SK = sys.modules["fusionops.ops.skew_pair"]


def _skew_case(d=8, layers=(4, 3)):
    gen = torch.Generator().manual_seed(7)
    ha = torch.randn(5, layers[0], d, generator=gen).requires_grad_()
    hb = torch.randn(5, layers[1], d, generator=gen).requires_grad_()
    ws = tuple((torch.randn(d, d, generator=gen) / d**0.5).requires_grad_() for _ in range(4))
    bs = tuple(torch.randn(d, generator=gen).requires_grad_() for _ in range(4))
    return ha, hb, ws, bs


@pytest.mark.parametrize("pairs", [[(1, 0), (3, 2), (1, 0)], ([2, 1],)], ids=["list", "tuple-of-lists"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_skew_one_pass_like_the_full_path(pairs, with_bias, monkeypatch):
    """(The second call reuses the cached index tensor of the first.)"""
    ha, hb, ws, bs = _skew_case()
    bs = bs if with_bias else (None,) * 4
    # not bk: softmax ignores the shift q·bk it gives every score, so its gradient is ~0 noise
    leaves = [ha, hb, *ws] + ([bs[0], bs[2], bs[3]] if with_bias else [])
    want = reference.skew_pair_attention(ha, hb, pairs, *ws, *bs, heads=2, window=1)
    call = functools.partial(fusionops.skew_pair_attention, ha, hb, pairs, *ws, *bs, heads=2, window=1)
    check_one_pass(monkeypatch, SK, "_check_args", call, leaves, want, {"cpu": 2})  # rule: always fused


def _skew_others():
    ha, hb, ws, bs = (t.detach() if isinstance(t, torch.Tensor) else tuple(u.detach() for u in t)
                      for t in _skew_case())  # fmt: skip
    pairs = [(1, 0)]
    wq = ws[0]
    return {
        "pairs a tensor": (ha, hb, torch.tensor(pairs), ws, bs, 2, 0),
        "pairs empty": (ha, hb, [], ws, bs, 2, 0),
        "pair i out of range": (ha, hb, [(4, 0)], ws, bs, 2, 0),
        "pair j out of range": (ha, hb, [(0, 3)], ws, bs, 2, 0),
        "negative pair": (ha, hb, [(-1, 0)], ws, bs, 2, 0),
        "bool in a pair": (ha, hb, [(True, 0)], ws, bs, 2, 0),
        "three in a pair": (ha, hb, [(1, 0, 0)], ws, bs, 2, 0),
        "a pair a string": (ha, hb, ["10"], ws, bs, 2, 0),
        "heads not dividing D": (ha, hb, pairs, ws, bs, 3, 0),
        "heads a bool": (ha, hb, pairs, ws, bs, True, 0),
        "negative window": (ha, hb, pairs, ws, bs, 2, -1),
        "weight shape": (ha, hb, pairs, (wq[:, :4], *ws[1:]), bs, 2, 0),
        "weight dtype": (ha, hb, pairs, (wq.double(), *ws[1:]), bs, 2, 0),
        "bias shape": (ha, hb, pairs, ws, (bs[0][:4], *bs[1:]), 2, 0),
        "rows differ": (ha, hb[:3], pairs, ws, bs, 2, 0),
        "widths differ": (ha, hb[..., :4], pairs, ws, bs, 2, 0),
        "2-d ha": (ha[:, 0], hb, pairs, ws, bs, 2, 0),
        "dtype": (ha, hb.double(), pairs, ws, bs, 2, 0),
    }


@pytest.mark.parametrize("case", list(_skew_others()))
def test_skew_one_pass_leaves_everything_else_to_the_full_path(case):
    fusionops.reset_dispatch_counts()
    assert SK._eager_cpu(*_skew_others()[case]) is None
    assert fusionops.dispatch_counts() == {}


@pytest.mark.parametrize("op", ["skew_pair_attention", "multiple_kernel"])
def test_cached_constants_survive_inference_mode(op):
    """The index (skew-pair) and parameter (multiple kernel) tensors cached by eager calls: one
    first made under torch.inference_mode is still saved by a later call that records a
    gradient (an inference tensor cannot be)."""
    skip_unless_usable("cpu", "cpu", op=OPS[op])
    if op == "skew_pair_attention":
        SK._CPU_INDEX.clear()
        ha, hb, ws, bs = _skew_case()
        call = functools.partial(fusionops.skew_pair_attention, ha, hb, [(2, 1)], *ws, *bs, heads=2)
        leaf = hb
    else:
        MK._CONSTANT_PARAMS.clear()
        xs_a, _, beta = _mkl_case()
        call = functools.partial(fusionops.multiple_kernel, xs_a, None, beta, ["rbf", "linear"])
        leaf = xs_a[0]
    with torch.inference_mode():
        call()
    call().sum().backward()
    assert leaf.grad is not None


def test_cached_parameters_follow_their_values():
    """Multiple kernel fusion's cached parameter vectors are keyed by the values: calls with
    other γ, c or widths get their own (each against the reference)."""
    skip_unless_usable("cpu", "cpu", op=MK.OPDEF)
    MK._CONSTANT_PARAMS.clear()
    xs_a, _, beta = _mkl_case()
    xs_a = [x.detach() for x in xs_a]
    for gamma, offset in ((0.5, 1.0), (0.7, 1.0), (0.5, -0.3), (None, 2.0)):
        rbf = fusionops.BaseKernel("rbf", gamma=gamma)
        kinds = [rbf, fusionops.BaseKernel("polynomial", degree=2, offset=offset)]
        got = fusionops.multiple_kernel(xs_a, None, beta.detach(), kinds)
        want = reference.multiple_kernel(xs_a, xs_a, beta.detach(), kinds)
        assert_close_to(got, want, torch.float32, f"gamma={gamma}, offset={offset}")
    assert len(MK._CONSTANT_PARAMS) == 4
