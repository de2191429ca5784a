"""The TensorFusion layer: drop-in for MultiBench / Michaels et al., projected form, compile."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import assert_close_to, assert_compiled_matches_reference, skip_unless_usable
from inputs import make_mask, make_xs
from torch import nn

import fusionops
from fusionops import TensorFusion, reference


def peers_tensor_fusion(modalities):
    """The features as MultiBench's and Michaels et al.'s ``TensorFusion().forward`` compute
    them (rewritten here: prepend ones, chained einsum outer products, reshape)."""
    if len(modalities) == 1:
        return modalities[0]
    lead = modalities[0].shape[:-1]
    m = None
    for mod in modalities:
        mod = torch.cat((torch.ones(*lead, 1, dtype=mod.dtype, device=mod.device), mod), dim=-1)
        m = mod if m is None else torch.einsum("...i,...j->...ij", m, mod).reshape(*lead, -1)
    return m


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=str)
@pytest.mark.parametrize("dims", [(4,), (3, 5), (2, 3, 4), (1, 2, 3, 2)], ids=str)
def test_drop_in_features(device, dims, lead):
    xs = [x.detach() for x in make_xs(lead, dims, torch.float64, device)]
    ours = TensorFusion()(xs)
    theirs = peers_tensor_fusion(xs)
    assert ours.shape == theirs.shape
    assert_close_to(ours, theirs, torch.float64, "drop-in features")


def test_layout_is_row_major_modality_one_slowest():
    x1, x2, x3 = (torch.randn(2, d, dtype=torch.float64) for d in (2, 3, 1))
    z = fusionops.tensor_fusion([x1, x2, x3])  # any backend: products may round in any order
    assert torch.equal(z[:, 0], torch.ones(2))
    assert torch.equal(z[:, 1:2], x3)  # z[..., 1 : d_M + 1] = x_M
    d = (3, 4, 2)
    for i in range(3):
        for j in range(4):
            for k in range(2):
                zi = 1.0 if i == 0 else x1[:, i - 1]
                zj = 1.0 if j == 0 else x2[:, j - 1]
                zk = 1.0 if k == 0 else x3[:, k - 1]
                idx = (i * d[1] + j) * d[2] + k
                expected = zi * zj * zk + torch.zeros(2, dtype=torch.float64)
                assert_close_to(z[:, idx], expected, torch.float64, f"Z[:, {idx}]")


def test_projected_layer_equals_features_then_linear(device):
    dims = (3, 4, 2)
    k = math.prod(d + 1 for d in dims)
    torch.manual_seed(0)
    layer = TensorFusion(dims, 7).to(device)
    torch.manual_seed(0)
    linear = nn.Linear(k, 7).to(device)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    xs = [x.detach() for x in make_xs((5,), dims, torch.float32, device)]
    assert_close_to(layer(xs), linear(peers_tensor_fusion(xs)).to(torch.float64), torch.float32, "layer")
    adopted = TensorFusion.from_linear(dims, linear)
    assert (
        torch.equal(adopted.weight, linear.weight) and adopted.weight.data_ptr() != linear.weight.data_ptr()
    )
    assert_close_to(
        adopted(xs), linear(peers_tensor_fusion(xs)).to(torch.float64), torch.float32, "from_linear"
    )
    assert TensorFusion(dims, 7, bias=False).bias is None


def test_layer_state_dict_round_trip_and_cast():
    layer = TensorFusion((2, 3), 4)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    other = TensorFusion((2, 3), 4)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(other.weight, layer.weight)
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    assert layer.double().weight.dtype == torch.float64


def test_single_modality_like_peers():
    x = torch.randn(4, 3)
    assert torch.equal(TensorFusion()([x]), x)  # the peers return a lone modality unchanged
    assert fusionops.tensor_fusion([x]).shape == (4, 4)  # the op follows DESIGN.md: [1, x]


def test_layer_mask():
    dims = (2, 3)
    xs = [x.detach() for x in make_xs((5,), dims, torch.float64, "cpu")]
    mask = make_mask((5,), 2)
    layer = TensorFusion(dims, 3).double()
    expected = reference.tensor_fusion(xs, layer.weight, layer.bias, mask)
    assert_close_to(layer(xs, mask=mask), expected, torch.float64, "masked layer")


class SmallModel(nn.Module):
    def __init__(self, dims, fused: bool):
        super().__init__()
        self.enc = nn.ModuleList(nn.Linear(d, d) for d in dims)
        k = math.prod(d + 1 for d in dims)
        self.fusion = TensorFusion(dims, 8) if fused else TensorFusion()
        self.head = nn.Linear(8 if fused else k, 2)

    def forward(self, xs):
        return self.head(torch.relu(self.fusion([e(x) for e, x in zip(self.enc, xs, strict=True)])))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compile_fullgraph(backend, fused):
    skip_unless_usable(backend, "cpu") if backend != "reference" else None
    dims = (3, 2, 4)
    torch.manual_seed(0)
    model = SmallModel(dims, fused)
    xs = [x.detach() for x in make_xs((6,), dims, torch.float32, "cpu")]
    assert_compiled_matches_reference(model, xs, backend)
