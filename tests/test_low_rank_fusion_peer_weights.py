"""Peers' low-rank fusion weights: MultiBench's LowRankTensorFusion (live module and state_dict)
and the original LMF code's state_dict, laid out here exactly as their code lays them out
(keys, shapes, modality order), built from that layout (their code is not vendored)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to
from torch import nn

from fusionops import LowRankFusion, LowRankTensorFusion

F64 = torch.float64


class MultiBenchLRTF(nn.Module):
    """MultiBench's ``LowRankTensorFusion(input_dims, output_dim, rank, flatten=True)``
    (fusions/common_fusions.py) as laid out there: ``factors`` a plain list of
    ``nn.Parameter(torch.Tensor(R, d + 1, O)).to(device)``, ``fusion_weights (1, R)`` and
    ``fusion_bias (1, O)`` made the same way (on a CPU-only machine ``.to`` returns the Parameter
    itself, so those two are registered; the list is not). Forward: ``[1, flatten(x)] @ factor``
    multiplied over modalities, then ``fusion_weights @ (B, R, O)``, squeeze, + bias, view."""

    def __init__(self, input_dims, output_dim, rank, flatten=True):
        super().__init__()
        self.input_dims, self.output_dim, self.rank, self.flatten = input_dims, output_dim, rank, flatten
        self.factors = []
        for d in input_dims:
            factor = nn.Parameter(torch.empty(rank, d + 1, output_dim, dtype=F64)).to("cpu")
            nn.init.xavier_normal_(factor)
            self.factors.append(factor)
        self.fusion_weights = nn.Parameter(torch.empty(1, rank, dtype=F64)).to("cpu")
        self.fusion_bias = nn.Parameter(torch.empty(1, output_dim, dtype=F64)).to("cpu")
        nn.init.xavier_normal_(self.fusion_weights)
        with torch.no_grad():
            self.fusion_bias.normal_()  # theirs starts at 0; a trained one is not

    def forward(self, modalities):
        batch = modalities[0].shape[0]
        fused = 1
        for x, factor in zip(modalities, self.factors, strict=True):
            x = torch.flatten(x, start_dim=1) if self.flatten else x
            fused = fused * torch.matmul(torch.cat((torch.ones(batch, 1, dtype=x.dtype), x), dim=1), factor)
        out = torch.matmul(self.fusion_weights, fused.permute(1, 0, 2)).squeeze() + self.fusion_bias
        return out.view(-1, self.output_dim)


class MMDL(nn.Module):
    """MultiBench's ``MMDL(encoders, fusion, head)`` container: keys ``encoders.*``, ``fuse.*``,
    ``head.*``."""

    def __init__(self, fuse: nn.Module, dims=(6, 4), out=3):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Linear(d, d, dtype=F64) for d in dims)
        self.fuse = fuse
        self.head = nn.Linear(out, 2, dtype=F64)


class OriginalLMF(nn.Module):
    """The original LMF model (Justin1904/Low-rank-Multimodal-Fusion, model.py ``LMF``) as its
    state_dict lays it out: subnetworks (stand-ins here), then ``audio_factor (R, a + 1, O)``,
    ``video_factor (R, v + 1, O)``, ``text_factor (R, t + 1, O)``, ``fusion_weights (1, R)``,
    ``fusion_bias (1, O)``; ``forward(audio, video, text)``."""

    def __init__(self, a=4, v=3, t=5, out=2, rank=3):
        super().__init__()
        self.audio_subnet = nn.Linear(7, a, dtype=F64)
        self.video_subnet = nn.Linear(7, v, dtype=F64)
        self.text_subnet = nn.Linear(7, t, dtype=F64)
        self.audio_factor = nn.Parameter(torch.randn(rank, a + 1, out, dtype=F64))
        self.video_factor = nn.Parameter(torch.randn(rank, v + 1, out, dtype=F64))
        self.text_factor = nn.Parameter(torch.randn(rank, t + 1, out, dtype=F64))
        self.fusion_weights = nn.Parameter(torch.randn(1, rank, dtype=F64))
        self.fusion_bias = nn.Parameter(torch.randn(1, out, dtype=F64))

    def fusion(self, audio_h, video_h, text_h):
        ones = torch.ones(audio_h.shape[0], 1, dtype=F64)
        zy = (
            torch.matmul(torch.cat((ones, audio_h), dim=1), self.audio_factor)
            * torch.matmul(torch.cat((ones, video_h), dim=1), self.video_factor)
            * torch.matmul(torch.cat((ones, text_h), dim=1), self.text_factor)
        )
        out = torch.matmul(self.fusion_weights, zy.permute(1, 0, 2)).squeeze() + self.fusion_bias
        return out.view(-1, self.fusion_bias.shape[1])


def lmf_fusion_keys(sd):
    """The fusion part of an LMF state_dict (without the subnetworks)."""
    return {k: v for k, v in sd.items() if "subnet" not in k}


@pytest.mark.parametrize("cls", [LowRankFusion, LowRankTensorFusion])
def test_from_lmf_weights_builds_either_layer(cls):
    torch.manual_seed(0)
    lmf = OriginalLMF()
    layer = cls.from_lmf_weights([lmf.audio_factor, lmf.video_factor, lmf.text_factor],
                                 lmf.fusion_weights, lmf.fusion_bias)
    assert type(layer) is cls and layer.factors[0].dtype == F64
    xs = [torch.randn(6, d, dtype=F64) for d in (4, 3, 5)]
    assert_close_to(layer(xs), lmf.fusion(*xs).detach(), F64, "from_lmf_weights")
    from_sd = cls.from_lmf_state_dict(lmf.state_dict())
    assert type(from_sd) is cls and torch.equal(from_sd(xs), layer(xs))
    no_bias = cls.from_lmf_weights(list(layer.factors), lmf.fusion_weights)
    assert no_bias.bias is None


@pytest.mark.parametrize("flatten", [True, False])
def test_from_multibench_adopts_a_live_layer(flatten):
    torch.manual_seed(1)
    dims = (6, 4)
    peer = MultiBenchLRTF(dims, 3, 2, flatten=flatten)
    assert set(peer.state_dict()) == {"fusion_weights", "fusion_bias"}  # their layout, on CPU
    layer = LowRankTensorFusion.from_multibench(peer)
    assert layer.flatten is flatten and layer.input_dims == dims
    first = torch.randn(5, 2, 3, dtype=F64) if flatten else torch.randn(5, 6, dtype=F64)
    xs = [first.requires_grad_(), torch.randn(5, 4, dtype=F64, requires_grad=True)]
    got, expected = layer(xs, training=True), peer(xs)
    assert_close_to(got, expected.detach(), F64, "from_multibench forward")
    g = torch.randn_like(got)
    mine = torch.autograd.grad(got, xs, g)
    theirs = torch.autograd.grad(expected, xs, g)
    for a, b in zip(mine, theirs, strict=True):
        assert_close_to(a, b, F64, "from_multibench input gradient")
    same = LowRankTensorFusion.from_lmf_weights(peer.factors, peer.fusion_weights, peer.fusion_bias)
    assert torch.equal(same(xs), got)
    assert len(layer.state_dict()) == 4  # ours registers the factors: a save restores the model


def test_a_multibench_state_dict_says_its_factors_were_never_saved():
    torch.manual_seed(2)
    theirs = MMDL(MultiBenchLRTF((6, 4), 3, 2))
    sd = theirs.state_dict()
    assert {k for k in sd if k.startswith("fuse.")} == {"fuse.fusion_weights", "fuse.fusion_bias"}
    ours = MMDL(LowRankTensorFusion((6, 4), 3, 2, dtype=F64))
    with pytest.raises(RuntimeError) as err:
        ours.load_state_dict(sd)
    msg = str(err.value)
    assert "fusion_weights and fusion_bias but no factors" in msg
    assert "never registered" in msg and "from_multibench" in msg
    assert "fuse.factors.0" in msg and "fuse.factors.1" in msg  # torch's own list of missing keys
    # strict=False too: without its factors the model cannot be restored, so nothing is half-loaded
    # silently (torch passes no strict flag to load hooks either)
    with pytest.raises(RuntimeError, match="never registered"):
        ours.load_state_dict(sd, strict=False)
    with pytest.raises(KeyError, match="never registered"):
        LowRankTensorFusion.from_lmf_state_dict(theirs.fuse.state_dict())


@pytest.mark.parametrize("cls", [LowRankFusion, LowRankTensorFusion])
def test_the_original_lmf_state_dict_loads_through_load_state_dict(cls):
    torch.manual_seed(3)
    lmf = OriginalLMF()
    xs = [torch.randn(6, d, dtype=F64) for d in (4, 3, 5)]
    layer = cls([4, 3, 5], 2, 3, dtype=F64)
    layer.load_state_dict(lmf_fusion_keys(lmf.state_dict()))  # strict
    assert_close_to(layer(xs), lmf.fusion(*xs).detach(), F64, "LMF state_dict via load_state_dict")
    # the whole model's state_dict: only its subnetworks are left over
    fresh = cls([4, 3, 5], 2, 3, dtype=F64)
    result = fresh.load_state_dict(lmf.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == sorted(k for k in lmf.state_dict() if "subnet" in k)
    assert torch.equal(fresh(xs), layer(xs))
    # our own layout still round-trips, and another modality order is one attribute away
    again = cls([4, 3, 5], 2, 3, dtype=F64)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(xs), layer(xs))
    reordered = cls([5, 4, 3], 2, 3, dtype=F64)
    reordered.lmf_factor_keys = ("text_factor", "audio_factor", "video_factor")
    reordered.load_state_dict(lmf_fusion_keys(lmf.state_dict()))
    assert_close_to(reordered([xs[2], xs[0], xs[1]]), lmf.fusion(*xs).detach(), F64, "reordered")


def test_load_errors_list_every_missing_and_misshaped_key():
    torch.manual_seed(4)
    sd = lmf_fusion_keys(OriginalLMF().state_dict())
    layer = LowRankFusion([4, 3, 5], 2, 3, dtype=F64)
    before = [p.clone() for p in layer.parameters()]
    bad = {**sd, "video_factor": torch.randn(2, 4, 2, dtype=F64), "fusion_bias": torch.randn(1, 5, dtype=F64)}
    with pytest.raises(RuntimeError) as err:
        layer.load_state_dict(bad)
    msg = str(err.value)
    assert "video_factor must have shape (3, 4, 2), got (2, 4, 2)" in msg
    assert "fusion_bias must have shape (1, 2) or (2,), got (1, 5)" in msg
    assert "size mismatch" not in msg and "Missing key" not in msg  # reported once, by the peer's names
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
    without_text = {k: v for k, v in sd.items() if k != "text_factor"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "factors.2"'):
        layer.load_state_dict(without_text)  # text_factor: the third of lmf_factor_keys
    with pytest.raises(RuntimeError, match="lmf_factor_keys names 3"):
        LowRankFusion([4, 3], 2, 3, dtype=F64).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="bias=False"):
        LowRankFusion([4, 3, 5], 2, 3, bias=False, dtype=F64).load_state_dict(sd)
    with pytest.raises(ValueError) as err:
        LowRankFusion.from_lmf_state_dict(bad)
    assert "video_factor must have shape (3, 4, 2)" in str(err.value)
    assert "fusion_bias must have shape (1, 2) or (2,)" in str(err.value)
    with pytest.raises(ValueError) as err:
        LowRankFusion.from_lmf_weights(
            [torch.randn(2, 3, 4), torch.randn(3, 5, 4), torch.randn(2, 2, 5)], torch.randn(1, 3)
        )
    for part in ("factors[1] must have shape (2, 5, 4)", "factors[2] must have shape (2, 2, 4)",
                 "fusion_weights must have shape (1, 2) or (2,), got (1, 3)"):
        assert part in str(err.value)
    with pytest.raises(TypeError, match=r"Linear has no \['factors', 'fusion_weights', 'fusion_bias'\]"):
        LowRankTensorFusion.from_multibench(nn.Linear(2, 2))
