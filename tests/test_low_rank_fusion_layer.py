"""The low-rank fusion layers: parameters, training, the CP identity, peers' weights, compile."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_to, assert_compiled_matches_reference, skip_unless_usable
from inputs import make_mask, make_xs
from torch import nn

import fusionops
from fusionops import LowRankFusion, LowRankTensorFusion, TensorFusion, reference


def cp_weight(factors, rank_weight):
    """The (O, K) tensor-fusion weight of the CP tensor Σ_r w_r ⊗_m F_m[r] (modality 1 slowest)."""
    rank, _, o = factors[0].shape
    terms = []
    for r in range(rank):
        t = factors[0][r]  # (D_0, O)
        for f in factors[1:]:
            t = (t.unsqueeze(1) * f[r].unsqueeze(0)).reshape(-1, o)  # (K_so_far * D_m, O)
        terms.append(rank_weight[r] * t)
    return torch.stack(terms).sum(0).t()


@pytest.mark.parametrize("dims", [(3,), (2, 3), (3, 2, 4), (2, 1, 2, 3)], ids=str)
def test_equals_tensor_fusion_with_cp_weight(device, dims):
    """LMF with rank R is tensor fusion whose weight is Σ_r w_r ⊗_m F_m[r] (its definition)."""
    torch.manual_seed(0)
    lmf = LowRankFusion(dims, 5, rank=3, device=device, dtype=torch.float64)
    tf = TensorFusion(dims, 5, device=device, dtype=torch.float64)
    with torch.no_grad():
        tf.weight.copy_(cp_weight(list(lmf.factors), lmf.rank_weight))
        tf.bias.copy_(lmf.bias.normal_())
    xs = [x.detach() for x in make_xs((6,), dims, torch.float64, device)]
    mask = make_mask((6,), len(dims), device)
    assert_close_to(lmf(xs), tf(xs).detach(), torch.float64, "LMF vs TF with the CP weight")
    assert_close_to(lmf(xs, mask=mask), tf(xs, mask=mask).detach(), torch.float64, "masked")


def test_parameters_are_registered_and_follow_the_module():
    layer = LowRankFusion((3, 4), 6, rank=2)
    names = dict(layer.named_parameters())
    assert set(names) == {"factors.0", "factors.1", "rank_weight", "bias"}
    assert names["factors.1"].shape == (2, 5, 6)
    copy = LowRankFusion((3, 4), 6, rank=2)
    copy.load_state_dict(layer.state_dict())
    xs = [torch.randn(4, 3), torch.randn(4, 4)]
    assert torch.equal(copy(xs), layer(xs))
    layer64 = layer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer64.parameters())
    assert layer64([x.double() for x in xs]).dtype == torch.float64
    assert LowRankFusion((3,), 2, rank=1, bias=False).bias is None


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_trains_and_every_parameter_gets_a_gradient(backend):
    """A small fixed task: the loss falls, and factors, rank weights and bias all learn."""
    if backend != "reference":
        skip_unless_usable(backend, "cpu")
    gen = torch.Generator().manual_seed(0)
    dims, n = (4, 3, 5), 64
    xs = [torch.randn(n, d, generator=gen) for d in dims]
    target = (xs[0][:, :1] * xs[1][:, 1:2] + xs[2][:, 2:3]).tanh()  # needs a cross-modal product
    torch.manual_seed(0)
    layer = LowRankFusion(dims, 1, rank=4)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    with fusionops.backend(backend):
        for _ in range(40 if backend != "triton" else 15):
            opt.zero_grad()
            loss = nn.functional.mse_loss(layer(xs), target)
            loss.backward()
            if not losses:
                for name, p in layer.named_parameters():
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def multibench_forward(xs, factors, fusion_weights, fusion_bias):
    """MultiBench's LowRankTensorFusion.forward, as written there (minus .cuda())."""
    batch = xs[0].shape[0]
    fused = 1
    for x, factor in zip(xs, factors, strict=True):
        ones = torch.ones(batch, 1, dtype=x.dtype)
        fused = fused * torch.matmul(torch.cat((ones, torch.flatten(x, start_dim=1)), dim=1), factor)
    out = torch.matmul(fusion_weights, fused.permute(1, 0, 2)).squeeze() + fusion_bias
    return out.view(-1, fusion_bias.shape[-1])


def test_low_rank_tensor_fusion_is_a_multibench_drop_in():
    """Same constructor, same forward(modalities, training) and flattening, same result."""
    torch.manual_seed(0)
    layer = LowRankTensorFusion([6, 4], 3, 2).double()  # the first modality arrives as (B, 2, 3)
    xs = [torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)]
    got = layer(xs, training=True)
    expected = multibench_forward(
        xs, list(layer.factors), layer.rank_weight.view(1, -1), layer.bias.view(1, -1)
    )
    assert got.shape == (5, 3)
    assert_close_to(got, expected.detach(), torch.float64, "MultiBench drop-in")
    one = layer([x[:1] for x in xs])  # MultiBench squeezes a batch of one; the shape stays (1, O)
    assert one.shape == (1, 3)
    assert len(list(layer.parameters())) == 4


class OriginalLMFFusion(nn.Module):
    """The fusion part of the original LMF model (Justin1904/Low-rank-Multimodal-Fusion)."""

    def __init__(self, a, v, t, out, rank):
        super().__init__()
        self.audio_factor = nn.Parameter(torch.randn(rank, a + 1, out, dtype=torch.float64))
        self.video_factor = nn.Parameter(torch.randn(rank, v + 1, out, dtype=torch.float64))
        self.text_factor = nn.Parameter(torch.randn(rank, t + 1, out, dtype=torch.float64))
        self.fusion_weights = nn.Parameter(torch.randn(1, rank, dtype=torch.float64))
        self.fusion_bias = nn.Parameter(torch.randn(1, out, dtype=torch.float64))

    def forward(self, audio_h, video_h, text_h):
        ones = torch.ones(audio_h.shape[0], 1, dtype=torch.float64)
        fusion_zy = (
            torch.matmul(torch.cat((ones, audio_h), dim=1), self.audio_factor)
            * torch.matmul(torch.cat((ones, video_h), dim=1), self.video_factor)
            * torch.matmul(torch.cat((ones, text_h), dim=1), self.text_factor)
        )
        out = torch.matmul(self.fusion_weights, fusion_zy.permute(1, 0, 2)).squeeze() + self.fusion_bias
        return out.view(-1, self.fusion_bias.shape[1])


def test_loads_the_original_lmf_weights():
    torch.manual_seed(0)
    original = OriginalLMFFusion(4, 3, 5, out=2, rank=3)
    xs = [torch.randn(6, d, dtype=torch.float64) for d in (4, 3, 5)]
    layer = LowRankFusion.from_lmf_state_dict(original.state_dict())
    assert_close_to(layer(xs), original(*xs).detach(), torch.float64, "from_lmf_state_dict")
    prefixed = {"module." + k: v for k, v in original.state_dict().items()}
    layer2 = LowRankFusion.from_lmf_state_dict(prefixed, prefix="module.")
    assert torch.equal(layer2(xs), layer(xs))
    layer3 = LowRankFusion.from_lmf_weights(
        [original.audio_factor, original.video_factor, original.text_factor],
        original.fusion_weights,
        original.fusion_bias,
    )
    assert torch.equal(layer3(xs), layer(xs))
    assert layer3.rank_weight.data_ptr() != original.fusion_weights.data_ptr()  # copies


def test_loader_errors():
    with pytest.raises(KeyError, match=r"missing keys \['text_factor'\]"):
        LowRankFusion.from_lmf_state_dict(
            {
                "audio_factor": torch.randn(2, 3, 4),
                "video_factor": torch.randn(2, 3, 4),
                "fusion_weights": torch.randn(1, 2),
            }
        )
    with pytest.raises(ValueError, match=r"fusion_weights must have shape \(1, 2\) or \(2,\).*got \(1, 3\)"):
        LowRankFusion.from_lmf_weights([torch.randn(2, 3, 4)], torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"fusion_bias must have shape \(1, 4\) or \(4,\).*got \(1, 5\)"):
        LowRankFusion.from_lmf_weights([torch.randn(2, 3, 4)], torch.randn(1, 2), torch.randn(1, 5))
    with pytest.raises(ValueError, match=r"factors\[1\] must have shape \(2, 5, 4\).*got \(3, 5, 4\)"):
        LowRankFusion.from_lmf_weights([torch.randn(2, 3, 4), torch.randn(3, 5, 4)], torch.randn(1, 2))


def test_layer_errors():
    with pytest.raises(ValueError, match="input_dims must be one or more widths >= 1"):
        LowRankFusion([3, 0], 4, 2)
    with pytest.raises(ValueError, match="output_dim must be >= 1"):
        LowRankFusion([3, 2], 0, 2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LowRankFusion([3, 2], 4, 0)
    layer = LowRankFusion([3, 2], 4, 2)
    with pytest.raises(ValueError, match=r"built for input_dims \(3, 2\), got modalities of widths \(3, 3\)"):
        layer([torch.randn(4, 3), torch.randn(4, 3)])


class SmallModel(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.enc = nn.ModuleList(nn.Linear(d, d) for d in dims)
        self.fusion = LowRankFusion(dims, 8, rank=3)
        self.head = nn.Linear(8, 2)

    def forward(self, xs):
        return self.head(torch.relu(self.fusion([e(x) for e, x in zip(self.enc, xs, strict=True)])))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compile_fullgraph(backend):
    if backend != "reference":
        skip_unless_usable(backend, "cpu")
    dims = (3, 2, 4)
    torch.manual_seed(0)
    model = SmallModel(dims)
    xs = [x.detach() for x in make_xs((6,), dims, torch.float32, "cpu")]
    assert_compiled_matches_reference(model, xs, backend)


def test_reference_is_the_definition():
    """The reference against the sum over ranks written out, on fresh random inputs."""
    gen = torch.Generator().manual_seed(3)
    dims, rank, o = (2, 3), 2, 4
    xs = [torch.randn(5, d, generator=gen, dtype=torch.float64) for d in dims]
    fs = [torch.randn(rank, d + 1, o, generator=gen, dtype=torch.float64) for d in dims]
    w = torch.randn(rank, generator=gen, dtype=torch.float64)
    zs = [torch.cat([torch.ones(5, 1, dtype=torch.float64), x], 1) for x in xs]
    expected = sum(w[r] * math.prod(z @ f[r] for z, f in zip(zs, fs, strict=True)) for r in range(rank))
    assert_close_to(reference.low_rank_fusion(xs, fs, w), expected, torch.float64, "reference")
