"""Every fused skew-pair attention backend against fusionops.reference (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close_to, skip_unless_usable
from inputs import STACK_LAYOUTS, WEIGHT_LAYOUTS, detached64, make_grad, make_skew_pair_inputs

import fusionops
from fusionops import reference
from fusionops.ops.skew_pair import GRAD_NAMES

# (D, heads, La, Lb, pairs): odd widths and head counts beside round ones; pairs at both ends
# of the stacks, duplicates, and the paper's 12-layer example.
PROBLEMS = {
    "d12h4": (12, 4, 4, 6, [(0, 0), (3, 5), (2, 2), (1, 4)]),
    "d15h3-dup": (15, 3, 5, 3, [(4, 0), (0, 2), (0, 2)]),
    "d7h1": (7, 1, 3, 3, [(1, 1), (2, 0)]),
    "d16h2-paper": (16, 2, 12, 12, fusionops.skew_pairs(12, 12, 7, 5 / 12).tolist()),
}


def run(backend, ha, hb, pairs, ws, bs, heads, window):
    with fusionops.backend(backend):
        return fusionops.skew_pair_attention(ha, hb, pairs, *ws, *bs, heads=heads, window=window)


def check_against_reference(backend, ha, hb, pairs, ws, bs, heads, window, dtype, grad_layout="contiguous"):
    """Forward and every gradient of ``backend`` against the float64 reference."""
    out = run(backend, ha, hb, pairs, ws, bs, heads, window)
    ha64, hb64, *rest = detached64([ha, hb, *ws, *bs])
    ws64, bs64 = rest[:4], rest[4:]
    expected = reference.skew_pair_attention(
        ha64, hb64, torch.tensor(pairs), *ws64, *bs64, heads=heads, window=window
    )
    assert out.dtype == dtype
    assert_close_to(out, expected, dtype, "forward")
    if out.numel() == 0:
        return out
    g = make_grad(tuple(out.shape), dtype, out.device, grad_layout)
    out.backward(g)
    expected.backward(g.to(torch.float64))
    for name, t, t64 in zip(GRAD_NAMES, [ha, hb, *ws, *bs], [ha64, hb64, *ws64, *bs64], strict=True):
        if t is not None and name != "bk":
            assert_close_to(t.grad, t64.grad, dtype, f"grad of {name}")
    if bs[1] is not None:
        assert_bk_grad_is_zero(bs[1].grad, ws[1].grad, dtype)
    return out


def assert_bk_grad_is_zero(dbk, dwk, dtype) -> None:
    """``bk`` shifts every score of a band by the same ``q·bk``, which softmax ignores: for finite
    inputs its gradient (the sum of dk) is rounding noise around 0, as the reference's is, so it
    is bounded rather than compared."""
    assert not torch.isnan(dbk).any(), "grad of bk: NaN"
    scale = dwk.abs().max().item() if dwk.numel() else 0.0
    assert dbk.abs().max().item() <= TOL[dtype] * max(scale, 1.0), f"grad of bk not ~0: {dbk}"


@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_matches_reference(kernel_backend, device, problem, dtype, window):
    d, heads, la, lb, pairs = PROBLEMS[problem]
    ha, hb, ws, bs = make_skew_pair_inputs(5, la, lb, d, dtype, device)
    check_against_reference(kernel_backend, ha, hb, pairs, ws, bs, heads, window, dtype)


@pytest.mark.parametrize("biases", ["none", "q_and_o", "k_only"])
def test_optional_biases(kernel_backend, device, biases):
    ha, hb, ws, bs = make_skew_pair_inputs(4, 3, 5, 12, torch.float64, device)
    keep = {"none": (), "q_and_o": (0, 3), "k_only": (1,)}[biases]
    bs = [b if k in keep else None for k, b in enumerate(bs)]
    check_against_reference(kernel_backend, ha, hb, [(2, 4), (0, 1)], ws, bs, 2, 1, torch.float64)


def test_more_rows_than_a_block(kernel_backend, device):
    n = 97 if kernel_backend == "triton" else 1025
    ha, hb, ws, bs = make_skew_pair_inputs(n, 4, 4, 8, torch.float32, device)
    check_against_reference(kernel_backend, ha, hb, [(3, 0), (1, 2)], ws, bs, 2, 1, torch.float32)


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("layout", STACK_LAYOUTS)
def test_strides(kernel_backend, device, layout, weight_layout, grad_layout):
    """Transposed, strided and stride-0 stacks; transposed and stride-0 weights and biases;
    non-contiguous and stride-0 upstream gradients."""
    ha, hb, ws, bs = make_skew_pair_inputs(6, 3, 4, 12, torch.float32, device, layout, weight_layout)
    pairs = [(2, 0), (0, 3), (1, 1)]
    check_against_reference(kernel_backend, ha, hb, pairs, ws, bs, 3, 1, torch.float32, grad_layout)


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precisions(kernel_backend, device, dtype, window):
    skip_unless_usable(kernel_backend, device, dtype)
    ha, hb, ws, bs = make_skew_pair_inputs(9, 4, 5, 16, dtype, device)
    check_against_reference(kernel_backend, ha, hb, [(3, 0), (0, 4), (2, 2)], ws, bs, 4, window, dtype)


@pytest.mark.parametrize("window", [0, 2])
def test_empty_batch(kernel_backend, device, window):
    ha, hb, ws, bs = make_skew_pair_inputs(0, 3, 4, 6, torch.float32, device)
    out = run(kernel_backend, ha, hb, [(0, 1), (2, 3)], ws, bs, 2, window)
    assert out.shape == (0, 2, 6)
    out.sum().backward()
    assert ha.grad.shape == ha.shape and hb.grad.shape == hb.shape
    for p in (*ws, *bs):  # no rows: the parameter gradients are exactly zero
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_window_zero_gives_query_and_key_no_gradient(kernel_backend, device):
    """With one key per band the softmax is 1, so wq, wk, bq and bk get exactly zero."""
    ha, hb, ws, bs = make_skew_pair_inputs(5, 3, 3, 8, torch.float32, device)
    run(kernel_backend, ha, hb, [(0, 2), (1, 1)], ws, bs, 2, 0).sum().backward()
    for t in (ws[0], ws[1], bs[0], bs[1]):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("window", [0, 1])
def test_gradcheck(kernel_backend, device, window):
    ha, hb, ws, bs = make_skew_pair_inputs(2, 3, 4, 4, torch.float64, device)
    leaves = [t.detach().requires_grad_(True) for t in (ha, hb, *ws, *bs)]

    def f(*args):
        with fusionops.backend(kernel_backend):
            return fusionops.skew_pair_attention(
                args[0], args[1], [(2, 0), (0, 3), (0, 3)], *args[2:], heads=2, window=window
            )

    # The interpreted Triton kernels take ~0.1 s a call: fast mode checks random directions of
    # the Jacobian instead of every column (still a full comparison, far fewer calls).
    assert torch.autograd.gradcheck(f, tuple(leaves), fast_mode=kernel_backend == "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(kernel_backend, device, dtype):
    ha, hb, ws, bs = make_skew_pair_inputs(5, 3, 4, 6, dtype, device)
    ha, hb = ha.detach().requires_grad_(True), hb.detach().requires_grad_(True)
    ws = [w.detach().requires_grad_(True) for w in ws]
    bs = [b.detach().requires_grad_(True) for b in bs]
    pairs = torch.tensor([[2, 0], [0, 3], [1, 1]], device=device)
    ops = torch.ops.fusionops
    for window in (0, 1):
        torch.library.opcheck(ops.skew_pair_attention, (ha, hb, pairs, *ws, *bs, 2, window, kernel_backend))
    torch.library.opcheck(
        ops.skew_pair_attention, (ha, hb, pairs, *ws, None, None, None, None, 3, 2, kernel_backend)
    )
    plain = [t.detach() for t in (ha, hb, pairs, *ws, *bs[:3])]
    g = make_grad((5, 3, 6), dtype, device)
    for needs in ([True] * 10, [True, False, False, False, False, True] + [False] * 4, [False] * 9 + [True]):
        torch.library.opcheck(ops.skew_pair_attention_backward, (g, *plain, 2, 1, needs, kernel_backend))


def test_saves_only_the_inputs(kernel_backend, device):
    """Autograd keeps the inputs, never a per-pair (N, P, ...) intermediate."""
    ha, hb, ws, bs = make_skew_pair_inputs(16, 3, 4, 8, torch.float32, device)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(kernel_backend, ha, hb, [(0, 0), (2, 3), (1, 1)], ws, bs, 2, 1)
    out.sum().backward()
    allowed = {tuple(ha.shape), tuple(hb.shape), (8, 8), (8,), (3, 2)}
    assert saved, "nothing was saved: the hook did not see the op"
    assert set(saved) <= allowed, saved


@pytest.mark.parametrize(
    "wants", [("ha",), ("hb",), ("wq", "wk"), ("wv", "wo"), ("bq", "bv", "bo"), ("hb", "wo", "bk")]
)
def test_partial_gradients(kernel_backend, device, wants):
    """Only what requires grad gets one, and it still matches the reference."""
    ha, hb, ws, bs = make_skew_pair_inputs(5, 3, 4, 6, torch.float64, device)
    tensors = dict(zip(GRAD_NAMES, [t.detach() for t in (ha, hb, *ws, *bs)], strict=True))
    chosen = [tensors[name].requires_grad_(True) for name in wants]
    args = list(tensors.values())
    out = run(kernel_backend, args[0], args[1], [(2, 0), (0, 3)], args[2:6], args[6:], 3, 1)
    g = make_grad(tuple(out.shape), torch.float64, device)
    got = torch.autograd.grad(out, chosen, g)
    ref = reference.skew_pair_attention(
        args[0], args[1], torch.tensor([(2, 0), (0, 3)]), *args[2:], heads=3, window=1
    )
    for name, a, e in zip(wants, got, torch.autograd.grad(ref, chosen, g), strict=True):
        if name == "bk":
            assert_bk_grad_is_zero(a, tensors["wk"], torch.float64)
        else:
            assert_close_to(a, e, torch.float64, f"grad of {name}")


def test_samples_do_not_see_each_other(kernel_backend, device):
    ha, hb, ws, bs = make_skew_pair_inputs(7, 3, 4, 8, torch.float64, device)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    out = run(kernel_backend, ha, hb, [(0, 1), (2, 3)], ws, bs, 2, 1)
    out_perm = run(kernel_backend, ha[perm], hb[perm], [(0, 1), (2, 3)], ws, bs, 2, 1)
    assert_close_to(out_perm, out[perm], torch.float64, "permuted batch")


def test_repeated_calls_are_identical(kernel_backend, device):
    """Same inputs, same bits: no read of memory the kernel did not write, no race."""
    ha, hb, ws, bs = make_skew_pair_inputs(9, 4, 4, 8, torch.float32, device)
    pairs = [(3, 0), (1, 2), (1, 2)]
    grads = []
    for _ in range(2):
        for t in (ha, hb, *ws, *bs):
            t.grad = None
        out = run(kernel_backend, ha, hb, pairs, ws, bs, 2, 2)
        out.backward(make_grad(tuple(out.shape), torch.float32, device))
        grads.append([out.detach().clone()] + [t.grad.clone() for t in (ha, hb, *ws, *bs)])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_compiled(kernel_backend, device):
    """torch.compile(fullgraph) of a function calling the op gives the eager reference's
    output and gradients."""
    ha, hb, ws, bs = make_skew_pair_inputs(5, 3, 4, 8, torch.float32, device)
    leaves = (ha, hb, *ws, *bs)

    def f(*args):
        return fusionops.skew_pair_attention(args[0], args[1], [(2, 0), (0, 3)], *args[2:], heads=2, window=1)

    torch._dynamo.reset()
    with fusionops.backend(kernel_backend):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
        got = torch.autograd.grad(out.sum(), leaves)
    with fusionops.backend("reference"):
        expected = f(*leaves)
        want = torch.autograd.grad(expected.sum(), leaves)
    assert_close_to(out, expected.detach().to(torch.float64), torch.float32, "compiled forward")
    for name, a, e in zip(GRAD_NAMES, got, want, strict=True):
        if name == "bk":
            assert_bk_grad_is_zero(a, got[3], torch.float32)
        else:
            assert_close_to(a, e.to(torch.float64), torch.float32, f"compiled grad of {name}")
