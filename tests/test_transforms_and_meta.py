"""Calls the fused kernels cannot serve go to the reference, or fail clearly: meta tensors
(shape inference), torch.func transforms (vmap, grad), and value checks that cannot read
values there."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to, skip_unless_usable

import fusionops
from fusionops import reference
from fusionops._backend import BackendUnavailableError

GEN = torch.Generator().manual_seed(0)


def _r(*shape: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=GEN).to(device)


def _stacks(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer stacks (N, 1, 4) and (N, 3, 4) built from rows (N, 2) and (N, 3)."""
    return a.repeat(1, 2)[:, None, :], b[:, :, None].expand(-1, -1, 4)


# Per op: a function of batched tensors (one per vmapped argument) and its reference.
def _ops():
    beta = torch.tensor([0.6, 0.3])
    w = _r(3, 12)
    factors, rank_weight = [_r(2, 3, 4), _r(2, 4, 4)], _r(2)
    ws = [_r(4, 4) for _ in range(4)]
    return {
        "tensor_fusion": (
            lambda a, b: fusionops.tensor_fusion([a, b], w),
            lambda a, b: reference.tensor_fusion([a, b], w),
        ),
        "low_rank_fusion": (
            lambda a, b: fusionops.low_rank_fusion([a, b], factors, rank_weight),
            lambda a, b: reference.low_rank_fusion([a, b], factors, rank_weight),
        ),
        "product_fusion": (
            lambda a, b: fusionops.product_fusion([a, b[..., :2]]),
            lambda a, b: reference.product_fusion([a, b[..., :2]]),
        ),
        "multiple_kernel": (
            lambda a, b: fusionops.multiple_kernel([a, b], None, beta, ["rbf", "linear"]),
            lambda a, b: reference.multiple_kernel([a, b], [a, b], beta, ["rbf", "linear"]),
        ),
        "skew_pair_attention": (
            lambda a, b: fusionops.skew_pair_attention(*_stacks(a, b), [(0, 2)], *ws),
            lambda a, b: reference.skew_pair_attention(*_stacks(a, b), [(0, 2)], *ws),
        ),
    }


OPS = list(_ops())


@pytest.mark.parametrize("op", OPS)
def test_vmap_matches_the_reference_per_sample(op):
    fused, ref = _ops()[op]
    a, b = _r(3, 5, 2), _r(3, 5, 3)
    out = torch.vmap(fused)(a, b)
    expected = torch.stack([ref(a[i], b[i]) for i in range(3)])
    assert_close_to(out, expected.double(), torch.float32, f"vmap of {op}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_forced_fused_backend_inside_vmap_says_why(op, backend):
    fused, _ = _ops()[op]
    with (
        fusionops.backend(backend),
        pytest.raises(
            BackendUnavailableError,
            match=rf"{op}: the forced backend '{backend}' cannot serve a call inside a torch.func transform",
        ),
    ):
        torch.vmap(fused)(_r(3, 5, 2), _r(3, 5, 3))


def test_multiple_kernel_vmapped_over_beta():
    """beta batched by vmap: its values cannot be checked on the host there, and the call
    still gives each sample's kernel."""
    xs = [_r(4, 2), _r(4, 3)]
    betas = torch.rand(3, 2, generator=GEN)
    out = torch.vmap(lambda beta: fusionops.multiple_kernel(xs, None, beta, ["rbf", "linear"]))(betas)
    expected = torch.stack([reference.multiple_kernel(xs, xs, b, ["rbf", "linear"]) for b in betas])
    assert_close_to(out, expected.double(), torch.float32, "vmap over beta")


def test_grad_transform_matches_autograd():
    w = _r(3, 12)
    a, b = _r(5, 2), _r(5, 3)
    got = torch.func.grad(lambda w: fusionops.tensor_fusion([a, b], w).square().sum())(w)
    w2 = w.clone().requires_grad_(True)
    reference.tensor_fusion([a, b], w2).square().sum().backward()
    assert_close_to(got, w2.grad.double(), torch.float32, "torch.func.grad of tensor fusion")


def test_meta_tensors_give_shapes():
    """Shape inference on meta tensors (the automatic choice serves them with the reference),
    including multiple_kernel, whose beta check used to read the values."""
    xs = [_r(5, 2, device="meta"), _r(5, 3, device="meta")]
    beta = torch.tensor([0.5, 0.5], device="meta")
    gamma = torch.tensor(0.5, device="meta")
    kernels = [fusionops.BaseKernel("rbf", gamma=gamma), "linear"]
    assert fusionops.multiple_kernel(xs, None, beta, kernels).shape == (5, 5)
    assert fusionops.tensor_fusion(xs, torch.empty(7, 12, device="meta")).shape == (5, 7)
    factors = [torch.empty(2, 3, 4, device="meta"), torch.empty(2, 4, 4, device="meta")]
    assert fusionops.low_rank_fusion(xs, factors, torch.empty(2, device="meta")).shape == (5, 4)
    assert fusionops.product_fusion([xs[0], xs[0]]).shape == (5, 2)


@pytest.mark.parametrize("backend", ["cpu", "triton", None])
def test_fake_tensors_go_through_the_custom_ops(backend):
    """Under FakeTensorMode (shape propagation, e.g. on fake CUDA tensors without a GPU) every
    public function gives its output's metadata, pairs given as a fake tensor included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend == "triton":
        skip_unless_usable("triton", "cpu", op=fusionops.registry.OPS["tensor_fusion"])
    with FakeTensorMode(), fusionops.backend(backend):
        xs = [torch.randn(6, 3), torch.randn(6, 2)]
        ha, hb = torch.randn(6, 3, 4), torch.randn(6, 2, 4)
        ws = [torch.randn(4, 4) for _ in range(4)]
        pairs = torch.tensor([[0, 1], [2, 0], [1, 1]])
        assert fusionops.skew_pair_attention(ha, hb, pairs, *ws, heads=2).shape == (6, 3, 4)
        assert fusionops.tensor_fusion(xs, torch.randn(5, 12)).shape == (6, 5)
        factors = [torch.randn(2, 4, 5), torch.randn(2, 3, 5)]
        assert fusionops.low_rank_fusion(xs, factors, torch.randn(2)).shape == (6, 5)
        assert fusionops.product_fusion([xs[0], xs[0], xs[0]]).shape == (6, 3)
        beta = torch.tensor([0.5, 0.5])
        assert fusionops.multiple_kernel(xs, None, beta, ["rbf", "linear"]).shape == (6, 6)
