"""The skew-pair fusion layer (SSFN's co-attention block around the fused op), its pooling,
training, serialisation and errors; layer_summaries and EncoderStacks on tiny transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to
from torch import nn
from torch.nn import functional as F

import fusionops
from fusionops import EncoderStacks, SkewPairFusion, layer_summaries


def make_stacks(n=5, la=4, lb=5, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ha = torch.randn(n, la, d, generator=gen, dtype=torch.float64).to(dtype)
    hb = torch.randn(n, lb, d, generator=gen, dtype=torch.float64).to(dtype)
    return ha, hb


def randomise(layer: nn.Module, seed=1) -> nn.Module:
    """Every parameter random (LayerNorm's ones/zeros, the zero biases and pair logits too), so
    no term of the composition hides behind an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return layer


def direction(block, hq, hkv, pairs, heads, window):
    """One direction by hand: the public op, then LayerNorm, ReLU feed-forward + residual, LayerNorm."""
    attn, d = block.self_attn, hq.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    out = fusionops.skew_pair_attention(
        hq,
        hkv,
        pairs,
        w[:d],
        w[d : 2 * d],
        w[2 * d :],
        attn.out_proj.weight,
        b[:d],
        b[d : 2 * d],
        b[2 * d :],
        attn.out_proj.bias,
        heads=heads,
        window=window,
    )
    x = F.layer_norm(out, (d,), block.norm1.weight, block.norm1.bias, 1e-5)
    ff = F.linear(F.relu(F.linear(x, block.linear1.weight, block.linear1.bias)), block.linear2.weight)
    return F.layer_norm(x + ff + block.linear2.bias, (d,), block.norm2.weight, block.norm2.bias, 1e-5)


def composed(layer: SkewPairFusion, ha, hb):
    pairs = layer.pairs
    fused = direction(layer.block_ab, ha, hb, pairs, layer.heads, layer.window)
    if layer.symmetric:
        back = direction(layer.block_ba, hb, ha, pairs[:, [1, 0]], layer.heads, layer.window)
        fused = (fused + back) / 2
    if layer.pool == "uniform":
        return fused.mean(1)
    return (torch.softmax(layer.pair_logits, 0)[None, :, None] * fused).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-way"])
def test_shape_and_dtype(dtype, symmetric):
    ha, hb = make_stacks(n=3, la=4, lb=6, d=8, dtype=dtype)
    layer = SkewPairFusion(8, [(0, 1), (3, 5)], heads=2, symmetric=symmetric, dtype=dtype).eval()
    out = layer(ha, hb)
    assert out.shape == (3, 8) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (layer.block_ba is not None) == symmetric


@pytest.mark.parametrize("la, lb, skew, density", [(12, 12, 7, 5 / 12), (4, 6, -2, 0.5), (6, 3, 1, 1.0)])
def test_pairs_from_layers_equal_skew_pairs(la, lb, skew, density):
    layer = SkewPairFusion(4, layers=(la, lb), skew=skew, density=density, heads=1)
    expected = fusionops.skew_pairs(la, lb, skew, density)
    assert torch.equal(layer.pairs, expected) and layer.pairs.dtype == torch.int64
    assert layer.num_pairs == expected.shape[0]
    assert "pairs" in dict(layer.named_buffers())
    explicit = SkewPairFusion(4, expected.tolist(), heads=1)  # a list of (i, j) gives the same buffer
    assert torch.equal(explicit.pairs, expected)


@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-way"])
@pytest.mark.parametrize("pool", ["uniform", "learned"])
def test_equals_hand_composition(window, symmetric, pool):
    """Eval mode: the op, LayerNorm, feed-forward, LayerNorm per direction, averaged, pooled."""
    ha, hb = make_stacks(n=4, la=5, lb=6, d=8)
    layer = SkewPairFusion(
        8,
        [(0, 2), (4, 5), (2, 0), (2, 0)],
        heads=2,
        window=window,
        symmetric=symmetric,
        pool=pool,
        ff_dim=12,
        dtype=torch.float64,
    )
    randomise(layer).eval()
    with torch.no_grad():
        assert_close_to(layer(ha, hb), composed(layer, ha, hb), torch.float64, "layer vs composition")


class SSFNBlock(nn.Module):
    """The SSFN CoAttention block's computation (one block shared by both directions), written
    afresh for the test: MultiheadAttention + residual, LayerNorm, ReLU feed-forward + residual,
    LayerNorm; the two directions averaged. Fed one sample at a time, so its attention cannot
    mix samples."""

    def __init__(self, d, heads, ff):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dtype=torch.float64)
        self.norm1, self.norm2 = nn.LayerNorm(d, dtype=torch.float64), nn.LayerNorm(d, dtype=torch.float64)
        self.linear1, self.linear2 = (
            nn.Linear(d, ff, dtype=torch.float64),
            nn.Linear(ff, d, dtype=torch.float64),
        )

    def one_way(self, a, b):
        x = self.norm1(a + self.self_attn(a, b, b, need_weights=False)[0])
        return self.norm2(x + self.linear2(torch.relu(self.linear1(x))))

    def forward(self, a, b):
        return (self.one_way(a, b) + self.one_way(b, a)) / 2


def test_window_zero_is_ssfn_coattention_per_sample():
    """SSFN's CoAttention weights load into both blocks; at window 0 the layer is the mean over
    pairs of that block applied to each sample alone (batch of one)."""
    ha, hb = make_stacks(n=3, la=4, lb=4, d=8)
    torch.manual_seed(0)
    ssfn = randomise(SSFNBlock(8, 2, 16), seed=3).eval()
    pairs = fusionops.skew_pairs(4, 4, 1, 3 / 4)  # (1, 0) (2, 1) (3, 2)
    layer = SkewPairFusion(8, pairs, heads=2, ff_dim=16, dtype=torch.float64).eval()
    layer.block_ab.load_state_dict(ssfn.state_dict())
    layer.block_ba.load_state_dict(ssfn.state_dict())
    with torch.no_grad():
        expected = torch.stack(
            [
                torch.stack([ssfn(ha[n, i][None], hb[n, j][None])[0] for i, j in pairs.tolist()]).mean(0)
                for n in range(ha.shape[0])
            ]
        )
        assert_close_to(layer(ha, hb), expected, torch.float64, "SSFN block per sample")


def test_window_zero_ignores_query_and_key_weights_and_window_widens():
    ha, hb = make_stacks(n=3, la=4, lb=5, d=8)
    layer = randomise(SkewPairFusion(8, [(1, 2), (3, 0)], heads=2, dtype=torch.float64)).eval()
    with torch.no_grad():
        before = layer(ha, hb)
        d = 8
        for block in (layer.block_ab, layer.block_ba):
            block.self_attn.in_proj_weight[: 2 * d].mul_(-3.0)  # wq, wk: irrelevant with one key
            block.self_attn.in_proj_bias[: 2 * d].add_(1.0)
        assert_close_to(layer(ha, hb), before, torch.float64, "window 0, changed wq/wk")
        layer.window = 1
        assert (layer(ha, hb) - before).abs().max() > 1e-3  # the band now holds several keys


def test_per_sample_independence():
    """Permuting the batch permutes the output (SSFN's batch-as-sequence attention would not)."""
    ha, hb = make_stacks(n=6, la=4, lb=5, d=8)
    layer = randomise(SkewPairFusion(8, layers=(4, 5), skew=-1, density=0.75, heads=2, window=1)).eval()
    layer.double()
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    with torch.no_grad():
        out = layer(ha, hb)
        assert_close_to(layer(ha[perm], hb[perm]), out[perm], torch.float64, "permuted batch")
        assert_close_to(layer(ha[2:3], hb[2:3]), out[2:3], torch.float64, "a sample alone")


def test_learned_pool_starts_uniform():
    ha, hb = make_stacks(n=3, la=4, lb=5, d=8)
    uniform = SkewPairFusion(8, [(0, 1), (2, 4), (3, 3)], heads=2, dtype=torch.float64).eval()
    learned = SkewPairFusion(8, [(0, 1), (2, 4), (3, 3)], heads=2, pool="learned", dtype=torch.float64).eval()
    assert torch.equal(learned.pair_logits, torch.zeros(3, dtype=torch.float64))
    assert uniform.pair_logits is None
    learned.load_state_dict(uniform.state_dict(), strict=False)
    with torch.no_grad():
        assert_close_to(learned(ha, hb), uniform(ha, hb), torch.float64, "learned pool at init")


def test_initialisation_is_multihead_attentions():
    torch.manual_seed(0)
    layer = SkewPairFusion(16, [(0, 0)], heads=4)
    for block in (layer.block_ab, layer.block_ba):
        attn = block.self_attn
        assert torch.equal(attn.in_proj_bias, torch.zeros(48)) and torch.equal(
            attn.out_proj.bias, torch.zeros(16)
        )
        bound = (6 / (48 + 16)) ** 0.5  # Xavier-uniform over the (3D, D) in-projection
        assert attn.in_proj_weight.abs().max() <= bound and attn.in_proj_weight.abs().max() > 0.8 * bound
        assert attn.out_proj.weight.abs().max() <= 1 / 16**0.5  # nn.Linear's kaiming-uniform bound
    assert layer.block_ab.linear1.out_features == 64  # ff_dim defaults to 4 * dim
    randomise(layer)
    layer.reset_parameters()
    assert torch.equal(layer.block_ab.norm1.weight, torch.ones(16))
    assert torch.equal(layer.block_ba.self_attn.in_proj_bias, torch.zeros(48))


def test_dropout_only_in_training():
    ha, hb = make_stacks(n=4, la=4, lb=5, d=8)
    layer = SkewPairFusion(8, [(0, 1), (3, 4)], heads=2, window=1, dropout=0.3, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(ha, hb), layer(ha, hb))
    evaluated = layer(ha, hb)
    layer.train()
    torch.manual_seed(0)
    a, b = layer(ha, hb), layer(ha, hb)
    assert not torch.equal(a, b) and not torch.allclose(a, evaluated)
    quiet = SkewPairFusion(8, [(0, 1), (3, 4)], heads=2, window=1, dropout=0.0, dtype=torch.float64)
    quiet.load_state_dict(layer.state_dict())
    assert_close_to(quiet.train()(ha, hb), evaluated, torch.float64, "dropout 0 in training = eval")


@pytest.mark.parametrize("pool", ["uniform", "learned"])
def test_trains_and_every_parameter_gets_a_gradient(pool):
    """A toy cross-modal task: the loss falls, and every parameter (both blocks' attention,
    norms, feed-forwards, the pair logits) gets a nonzero gradient (window > 0, so the query and
    key weights matter)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 48, 8
    ha, hb = torch.randn(n, 4, d, generator=gen), torch.randn(n, 5, d, generator=gen)
    target = torch.tanh(ha[:, 2, :2].sum(1, keepdim=True) * hb[:, 1, 2:4].sum(1, keepdim=True))
    torch.manual_seed(0)
    layer = SkewPairFusion(d, layers=(4, 5), skew=1, density=0.75, heads=2, window=1, pool=pool, dropout=0.0)
    head = nn.Linear(d, 1)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=0.02)
    losses = []
    for step in range(15):
        opt.zero_grad()
        loss = F.mse_loss(head(layer(ha, hb)), target)
        loss.backward()
        if step == 0:
            for name, p in layer.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_state_dict_round_trip_and_to_float64():
    ha, hb = make_stacks(n=3, la=5, lb=4, d=8, dtype=torch.float32)
    layer = randomise(SkewPairFusion(8, layers=(5, 4), skew=2, density=0.5, heads=2, pool="learned")).eval()
    state = layer.state_dict()
    assert "pairs" in state and "pair_logits" in state and "block_ba.self_attn.in_proj_weight" in state
    copy = SkewPairFusion(8, layers=(5, 4), skew=2, density=0.5, heads=2, pool="learned").eval()
    copy.load_state_dict(state)
    assert torch.equal(copy(ha, hb), layer(ha, hb))
    layer64 = layer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer64.parameters())
    assert layer64.pairs.dtype == torch.int64
    out = layer64(ha.double(), hb.double())
    assert out.dtype == torch.float64
    assert_close_to(out, composed(layer64, ha.double(), hb.double()).detach(), torch.float64, "float64")


def test_loaded_pairs_are_the_pairs_used():
    """Loading a state_dict with other pairs (same count) changes what forward computes."""
    ha, hb = make_stacks(n=3, la=5, lb=4, d=8, dtype=torch.float64)
    src = randomise(SkewPairFusion(8, [(4, 0), (1, 3)], heads=2).double()).eval()
    dst = SkewPairFusion(8, [(0, 0), (1, 1)], heads=2).double().eval()
    dst.load_state_dict(src.state_dict())
    assert dst.pairs.tolist() == [[4, 0], [1, 3]]
    assert torch.equal(dst(ha, hb), src(ha, hb))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) of the layer, forward and backward, equals eager."""
    ha, hb = make_stacks(n=4, la=5, lb=4, d=8, dtype=torch.float32)
    layer = randomise(SkewPairFusion(8, layers=(5, 4), skew=1, density=0.5, heads=2, window=1)).float().eval()
    torch._dynamo.reset()
    with fusionops.backend(backend):
        out = torch.compile(layer, fullgraph=True, backend="aot_eager")(ha, hb)
        got = torch.autograd.grad(out.sum(), list(layer.parameters()))
    with fusionops.backend("reference"):
        expected = layer(ha, hb)
        want = torch.autograd.grad(expected.sum(), list(layer.parameters()))
    assert_close_to(out, expected.detach().double(), torch.float32, "compiled forward")
    for (name, _), a, e in zip(layer.named_parameters(), got, want, strict=True):
        if name.endswith("in_proj_bias"):  # its key third has gradient 0 (rounding noise in eager)
            a, e = torch.cat([a[:8], a[16:]]), torch.cat([e[:8], e[16:]])
        assert_close_to(a, e.double(), torch.float32, f"compiled grad of {name}")


def test_constructor_errors():
    with pytest.raises(ValueError, match="give either pairs .* not neither"):
        SkewPairFusion(8)
    with pytest.raises(ValueError, match="not both"):
        SkewPairFusion(8, [(0, 0)], layers=(4, 4))
    with pytest.raises(ValueError, match="possible skews are -3 to 3"):
        SkewPairFusion(8, layers=(4, 4), skew=9, density=0.5)
    with pytest.raises(TypeError, match="pairs must be an integer tensor"):
        SkewPairFusion(8, torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"pairs must have shape \(P, 2\).*got \(3,\)"):
        SkewPairFusion(8, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"pairs\[1\] = \(-1, 0\) has a negative layer index"):
        SkewPairFusion(8, [(0, 0), (-1, 0)])
    with pytest.raises(ValueError, match="pairs is empty"):
        SkewPairFusion(8, [])
    with pytest.raises(ValueError, match="heads must be an int >= 1 dividing dim = 8, got 3"):
        SkewPairFusion(8, [(0, 0)], heads=3)
    with pytest.raises(ValueError, match="window must be an int >= 0, got -1"):
        SkewPairFusion(8, [(0, 0)], heads=2, window=-1)
    with pytest.raises(ValueError, match="pool must be one of"):
        SkewPairFusion(8, [(0, 0)], heads=2, pool="max")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        SkewPairFusion(8, [(0, 0)], heads=2, dropout=1.0)
    with pytest.raises(ValueError, match="layers must be \\(La, Lb\\)"):
        SkewPairFusion(8, layers=(4,), heads=2)


def test_forward_errors_name_the_argument():
    layer = SkewPairFusion(8, [(1, 4), (3, 0)], heads=2)
    ha, hb = make_stacks(n=3, la=4, lb=5, d=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"ha must have shape \(N, L, 8\).*got \(3, 4, 6\)"):
        layer(ha[..., :6], hb)
    with pytest.raises(TypeError, match="hb must be a tensor"):
        layer(ha, hb.numpy())
    with pytest.raises(ValueError, match="hb has 2 rows but ha has 3"):
        layer(ha, hb[:2])
    with pytest.raises(ValueError, match=r"hb has 4 layers but the pairs use layer 4 of hb .* at least 5"):
        layer(ha, hb[:, :4])
    with pytest.raises(ValueError, match=r"ha has 3 layers but the pairs use layer 3 of ha"):
        layer(ha[:, :3], hb)
    built = SkewPairFusion(8, layers=(4, 5), skew=0, density=0.5, heads=2)
    with pytest.raises(
        ValueError, match=r"ha has 5 layers but the pairs were built for layers=\(4, 5\).*embedding"
    ):
        built(torch.randn(3, 5, 8), hb)


# --- layer_summaries and EncoderStacks on tiny random-weight transformers encoders -------------


def tiny_bert(hidden, layers, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def run_bert(model, n=4, t=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states, mask


def test_layer_summaries_cls_and_masked_mean():
    hidden, mask = run_bert(tiny_bert(32, 3, seed=0))
    assert len(hidden) == 4
    cls = layer_summaries(hidden)
    assert cls.shape == (4, 3, 32)
    assert torch.equal(cls, torch.stack([h[:, 0] for h in hidden[1:]], dim=1))
    with_embeddings = layer_summaries(hidden, drop_embeddings=False)
    assert with_embeddings.shape == (4, 4, 32) and torch.equal(with_embeddings[:, 1:], cls)
    mean = layer_summaries(hidden, pool="mean", attention_mask=mask)
    for n in range(4):
        keep = mask[n].bool()
        for layer in range(3):
            expected = hidden[layer + 1][n][keep].mean(0)
            assert_close_to(mean[n, layer], expected.double(), torch.float32, f"row {n} layer {layer}")
    unmasked = layer_summaries(hidden, pool="mean")
    assert_close_to(unmasked, torch.stack(hidden[1:], 1).mean(2).double(), torch.float32, "unmasked mean")
    assert torch.equal(layer_summaries(hidden, attention_mask=mask), cls)  # CLS ignores the mask


def test_layer_summaries_errors():
    gen = torch.Generator().manual_seed(0)
    hidden = tuple(torch.randn(2, 5, 4, generator=gen) for _ in range(3))
    with pytest.raises(ValueError, match="hidden_states is empty"):
        layer_summaries(())
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        layer_summaries(None)
    with pytest.raises(TypeError, match="must be a tuple of"):
        layer_summaries(hidden[0])
    with pytest.raises(
        ValueError, match=r"hidden_states\[2\] is \(2, 6, 4\).*hidden_states\[0\] is \(2, 5, 4\)"
    ):
        layer_summaries((*hidden[:2], torch.randn(2, 6, 4)))
    with pytest.raises(ValueError, match=r"hidden_states\[1\] must be a tensor of shape \(N, T, D\)"):
        layer_summaries((hidden[0], torch.randn(2, 4)))
    with pytest.raises(ValueError, match="pool must be one of .*got 'max'"):
        layer_summaries(hidden, pool="max")
    with pytest.raises(ValueError, match="only the embedding output"):
        layer_summaries(hidden[:1])
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(N, T\) = \(2, 5\).*got \(2, 4\)"):
        layer_summaries(hidden, pool="mean", attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask row 1 has no token"):
        layer_summaries(hidden, pool="mean", attention_mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))


def test_encoder_stacks_project_to_a_common_width_and_feed_the_layer():
    bert_a, bert_b = tiny_bert(32, 3, seed=0), tiny_bert(16, 2, seed=1)
    hidden_a, mask_a = run_bert(bert_a, seed=0)
    hidden_b, mask_b = run_bert(bert_b, seed=1)
    stacks = EncoderStacks(32, 16)
    assert (
        stacks.dim == 32 and isinstance(stacks.proj_a, nn.Identity) and isinstance(stacks.proj_b, nn.Linear)
    )
    ha, hb = stacks(hidden_a, hidden_b)
    assert ha.shape == (4, 3, 32) and hb.shape == (4, 2, 32)
    assert torch.equal(ha, layer_summaries(hidden_a))
    assert torch.equal(hb, stacks.proj_b(layer_summaries(hidden_b)))

    mean_stacks = EncoderStacks(32, 16, 24, pool="mean")
    assert isinstance(mean_stacks.proj_a, nn.Linear) and mean_stacks.proj_a.out_features == 24
    ma, mb = mean_stacks(hidden_a, hidden_b, mask_a, mask_b)
    assert ma.shape == (4, 3, 24) and mb.shape == (4, 2, 24)
    expected_a = mean_stacks.proj_a(layer_summaries(hidden_a, pool="mean", attention_mask=mask_a))
    assert torch.equal(ma, expected_a)
    expected_b = mean_stacks.proj_b(layer_summaries(hidden_b, pool="mean", attention_mask=mask_b))
    assert torch.equal(mb, expected_b)

    same = EncoderStacks(16, 16)
    assert isinstance(same.proj_a, nn.Identity) and isinstance(same.proj_b, nn.Identity)
    assert list(same.parameters()) == []

    fusion = SkewPairFusion(stacks.dim, layers=(3, 2), skew=1, density=1.0, heads=2, window=1)
    logits = nn.Linear(32, 2)(fusion(*stacks(hidden_a, hidden_b)))
    logits.sum().backward()
    assert stacks.proj_b.weight.grad is not None and stacks.proj_b.weight.grad.abs().sum() > 0
    with_embeddings = EncoderStacks(32, 16, drop_embeddings=False)
    with pytest.raises(ValueError, match="embedding output"):
        fusion(*with_embeddings(hidden_a, hidden_b))


def test_encoder_stacks_accepts_summaries_and_checks_widths():
    gen = torch.Generator().manual_seed(0)
    stacks = EncoderStacks(12, 8)
    ha, hb = torch.randn(2, 3, 12, generator=gen), torch.randn(2, 4, 8, generator=gen)
    a, b = stacks(ha, hb)
    assert torch.equal(a, ha) and b.shape == (2, 4, 12)
    with pytest.raises(ValueError, match=r"hidden_b must have width width_b = 8.*got \(2, 4, 12\)"):
        stacks(ha, torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match="mask_a applies to a hidden_states tuple"):
        stacks(ha, hb, mask_a=torch.ones(2, 3))
    with pytest.raises(ValueError, match="width_b must be an int >= 1, got 0"):
        EncoderStacks(12, 0)
    with pytest.raises(ValueError, match="pool must be one of"):
        EncoderStacks(12, 8, pool="max")
