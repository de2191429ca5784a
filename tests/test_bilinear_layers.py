"""The bilinear layers (MLB, MFB, MFH, Mutan, Block) as drop-ins for block.bootstrap.pytorch's
``fusions.py``: their state_dict layout loads strictly, the output matches their forward
(written out here in our own words from the layout they document), dropout and activation
paths, errors, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to, assert_compiled_matches_reference

import fusionops
from fusionops import reference
from fusionops.ops._dropout import draw_seed

DX, DT, OUT, MM = 7, 5, 4, 6


def _sd(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict laid out as block.bootstrap's: random tensors under their keys."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) / 2 for k, s in shapes.items()}


def _lin(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _ssqrt_l2(z):
    return F.normalize(z.sign() * z.abs().sqrt(), dim=-1)


def _inputs(n=9, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, DX, generator=gen, dtype=torch.float64),
        torch.randn(n, DT, generator=gen, dtype=torch.float64),
    ]


def _theirs_mfb(sd, xs, k, act, normalize, act_out, prefix=("linear0", "linear1")):
    e = getattr(torch, act)(_lin(sd, prefix[0], xs[0])) * getattr(torch, act)(_lin(sd, prefix[1], xs[1]))
    z = e.view(e.shape[0], -1, k).sum(2)  # mm_dim slow, factor fast
    z = _ssqrt_l2(z) if normalize else z
    y = _lin(sd, "linear_out", z)
    return getattr(torch, act_out)(y) if act_out else y


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(("layer", "k", "act"), [("MFB", 3, "relu"), ("MLB", 1, "tanh")])
def test_mfb_mlb_load_their_state_dict(layer, k, act, normalize):
    sd = _sd(
        {
            "linear0.weight": (MM * k, DX),
            "linear0.bias": (MM * k,),
            "linear1.weight": (MM * k, DT),
            "linear1.bias": (MM * k,),
            "linear_out.weight": (OUT, MM),
            "linear_out.bias": (OUT,),
        }
    )
    kwargs = {"factor": k} if layer == "MFB" else {}
    m = getattr(fusionops, layer)([DX, DT], OUT, mm_dim=MM, activ_input=act, normalize=normalize, **kwargs)
    m.double().eval().load_state_dict(sd)  # strict
    xs = _inputs()
    counts = fusionops.dispatch_counts().get("mfb", {}).get("cpu", 0)
    y = m(xs)
    assert fusionops.dispatch_counts()["mfb"]["cpu"] == counts + 1, "the fused op did not serve the call"
    assert_close_to(y, _theirs_mfb(sd, xs, k, act, normalize, "relu"), torch.float64, layer)


def test_mfh_loads_their_state_dict():
    k = 2
    shapes = {}
    for i in range(2):
        shapes |= {
            f"linear0_{i}.weight": (MM * k, DX),
            f"linear0_{i}.bias": (MM * k,),
            f"linear1_{i}.weight": (MM * k, DT),
            f"linear1_{i}.bias": (MM * k,),
        }
    sd = _sd(shapes | {"linear_out.weight": (OUT, 2 * MM), "linear_out.bias": (OUT,)})
    m = fusionops.MFH([DX, DT], OUT, mm_dim=MM, factor=k, normalize=True).double().eval()
    m.load_state_dict(sd)
    xs = _inputs()
    counts = fusionops.dispatch_counts().get("mfh", {}).get("cpu", 0)
    y = m(xs)
    assert fusionops.dispatch_counts()["mfh"]["cpu"] == counts + 1, "the fused op did not serve the call"
    e0 = F.relu(_lin(sd, "linear0_0", xs[0])) * F.relu(_lin(sd, "linear1_0", xs[1]))
    e1 = F.relu(_lin(sd, "linear0_1", xs[0])) * F.relu(_lin(sd, "linear1_1", xs[1])) * e0
    zs = [_ssqrt_l2(e.view(e.shape[0], MM, k).sum(2)) for e in (e0, e1)]
    expected = F.relu(_lin(sd, "linear_out", torch.cat(zs, 1)))
    assert_close_to(y, expected, torch.float64, "MFH")


def _theirs_block(sd, xs, chunks, rank, pos_norm, merge):
    x0, x1 = _lin(sd, "linear0", xs[0]), _lin(sd, "linear1", xs[1])
    zs = []
    s = x0.shape[1] // chunks
    for c in range(chunks):
        names = (
            (f"{merge}0.{c}", f"{merge}1.{c}")
            if chunks > 1 or merge == "merge_linears"
            else (f"{merge}0", f"{merge}1")
        )
        m = _lin(sd, names[0], x0[:, c * s : (c + 1) * s]) * _lin(sd, names[1], x1[:, c * s : (c + 1) * s])
        z = m.view(m.shape[0], rank, -1).sum(1)  # rank slow
        zs.append(_ssqrt_l2(z) if pos_norm == "before_cat" else z)
    z = torch.cat(zs, 1)
    z = _ssqrt_l2(z) if pos_norm == "after_cat" else z
    return _lin(sd, "linear_out", z)


@pytest.mark.parametrize("pos_norm", ["before_cat", "after_cat"])
def test_block_loads_their_state_dict(pos_norm):
    chunks, rank, s = 3, 2, 2
    mm = chunks * s
    shapes = {
        "linear0.weight": (mm, DX),
        "linear0.bias": (mm,),
        "linear1.weight": (mm, DT),
        "linear1.bias": (mm,),
        "linear_out.weight": (OUT, mm),
        "linear_out.bias": (OUT,),
    }
    for i in range(2):
        for c in range(chunks):
            shapes |= {
                f"merge_linears{i}.{c}.weight": (s * rank, s),
                f"merge_linears{i}.{c}.bias": (s * rank,),
            }
    sd = _sd(shapes)
    m = fusionops.Block([DX, DT], OUT, mm_dim=mm, chunks=chunks, rank=rank, pos_norm=pos_norm).double().eval()
    m.load_state_dict(sd)
    xs = _inputs()
    expected = _theirs_block(sd, xs, chunks, rank, pos_norm, "merge_linears")
    assert_close_to(m(xs), expected, torch.float64, "Block")


@pytest.mark.parametrize("normalize", [False, True])
def test_mutan_loads_their_state_dict(normalize):
    rank = 3
    shapes = {
        "linear0.weight": (MM, DX),
        "linear0.bias": (MM,),
        "linear1.weight": (MM, DT),
        "linear1.bias": (MM,),
        "merge_linear0.weight": (MM * rank, MM),
        "merge_linear0.bias": (MM * rank,),
        "merge_linear1.weight": (MM * rank, MM),
        "merge_linear1.bias": (MM * rank,),
        "linear_out.weight": (OUT, MM),
        "linear_out.bias": (OUT,),
    }
    sd = _sd(shapes)
    m = fusionops.Mutan([DX, DT], OUT, mm_dim=MM, rank=rank, normalize=normalize).double().eval()
    m.load_state_dict(sd)
    xs = _inputs()
    expected = _theirs_block(sd, xs, 1, rank, "after_cat" if normalize else "none", "merge_linear")
    assert_close_to(m(xs), expected, torch.float64, "Mutan")


@pytest.mark.parametrize("layer", ["Mutan", "Block"])
def test_shared_keeps_both_names(layer):
    """shared=True: x1 uses x0's modules, and the state_dict holds both names (as theirs)."""
    kwargs = {"chunks": 2} if layer == "Block" else {}
    m = getattr(fusionops, layer)([DX, DX], OUT, mm_dim=MM, rank=2, shared=True, **kwargs)
    sd = m.state_dict()
    assert "linear1.weight" in sd and torch.equal(sd["linear1.weight"], sd["linear0.weight"])
    fresh = getattr(fusionops, layer)([DX, DX], OUT, mm_dim=MM, rank=2, shared=True, **kwargs)
    fresh.load_state_dict(sd)
    x = torch.randn(4, DX)
    torch.testing.assert_close(fresh([x, x]), m([x, x]))


def _mfh_params(m):
    l0s = [getattr(m, f"linear0_{i}") for i in range(m.order)]
    l1s = [getattr(m, f"linear1_{i}") for i in range(m.order)]
    return (torch.stack([l.weight for l in l0s]), torch.stack([l.bias for l in l0s]),
            torch.stack([l.weight for l in l1s]), torch.stack([l.bias for l in l1s]),
            m.linear_out.weight, m.linear_out.bias)  # fmt: skip


# Each layer with every dropout inside its op active, the op that serves it, and its reference
# with the fused kernels' masks for a seed (the layer's params, its inputs).
DROPOUT_LAYERS = {
    "MFB": (
        lambda: fusionops.MFB([DX, DT], OUT, mm_dim=MM, factor=2, dropout_input=0.3, dropout_pre_norm=0.2,
                              normalize=True),
        "mfb",
        lambda m, xs, seed: reference.mfb(
            *xs, m.linear0.weight, m.linear0.bias, m.linear1.weight, m.linear1.bias, m.linear_out.weight,
            m.linear_out.bias, 2, "relu", True, dropout_input=0.3, dropout_pre_norm=0.2, training=True,
            seed=seed,
        ),
    ),
    "MLB": (
        lambda: fusionops.MLB([DX, DT], OUT, mm_dim=MM, activ_input="tanh", dropout_input=0.2,
                              dropout_pre_lin=0.4),
        "mfb",
        lambda m, xs, seed: reference.mfb(
            *xs, m.linear0.weight, m.linear0.bias, m.linear1.weight, m.linear1.bias, m.linear_out.weight,
            m.linear_out.bias, 1, "tanh", False, dropout_input=0.2, dropout_pre_lin=0.4, training=True,
            seed=seed,
        ),
    ),
    "MFH": (
        lambda: fusionops.MFH([DX, DT], OUT, mm_dim=MM, dropout_input=0.3, dropout_pre_lin=0.2, order=3),
        "mfh",
        lambda m, xs, seed: reference.mfh(
            *xs, *_mfh_params(m), 2, "relu", False, dropout_input=0.3, dropout_pre_lin=0.2, training=True,
            seed=seed,
        ),
    ),
    "Block": (
        lambda: fusionops.Block([DX, DT], OUT, mm_dim=MM, chunks=2, rank=2, dropout_pre_lin=0.3),
        "block_fusion",
        lambda m, xs, seed: reference.block_fusion(
            m.linear0(xs[0]), m.linear1(xs[1]), *m._merge(), m.linear_out.weight, m.linear_out.bias, 2,
            "before_cat", dropout_pre_lin=0.3, training=True, seed=seed,
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("layer", list(DROPOUT_LAYERS))
def test_dropout_in_training_runs_the_fused_op(layer):
    """In training the op's dropouts run inside the fused kernels, with the masks of the
    reference's hashed dropout for the seed the layer drew from torch's generator (so
    torch.manual_seed reproduces a step); in eval there is no dropout."""
    make, op, expected_of = DROPOUT_LAYERS[layer]
    torch.manual_seed(3)
    m = make().double()
    xs = _inputs()
    fusionops.reset_dispatch_counts()
    m.train()
    torch.manual_seed(0)
    y_train = m(xs)
    assert fusionops.dispatch_counts()[op]["cpu"] == 1, "dropout in training must take the fused op"
    torch.manual_seed(0)
    seed = draw_seed()  # the seed the layer drew
    expected = expected_of(m, xs, seed)
    if layer != "Block":
        expected = F.relu(expected)  # activ_output
    assert_close_to(y_train, expected, torch.float64, f"{layer} in training")
    torch.manual_seed(0)
    torch.testing.assert_close(m(xs), y_train, rtol=0, atol=0)  # the same seed, the same masks
    assert not torch.allclose(m(xs), y_train), "a new step drew the same masks"
    m.eval()
    assert not torch.allclose(m(xs), y_train), "training dropout had no effect"


def test_other_activation_runs_the_reference():
    m = fusionops.MFB([DX, DT], OUT, mm_dim=MM, activ_input="sigmoid").double()
    sd = m.state_dict()
    xs = _inputs()
    assert_close_to(m(xs), _theirs_mfb(sd, xs, 2, "sigmoid", False, "relu"), torch.float64, "sigmoid")


@pytest.mark.parametrize(
    ("build", "xs", "match"),
    [
        (
            lambda: fusionops.MFB([DX, DT], OUT, mm_dim=MM),
            [torch.randn(3, DX + 1), torch.randn(3, DT)],
            "input_dims",
        ),
        (
            lambda: fusionops.Block([DX, DT], OUT, mm_dim=MM, chunks=2, rank=2),
            [torch.randn(3, DX), torch.randn(4, DT)],
            r"x\[1\] has leading \(batch\) shape \(4,\), expected \(3,\)",
        ),
        (
            lambda: fusionops.Mutan([DX, DT], OUT, mm_dim=MM, rank=2),
            [torch.randn(3, DX), torch.randn(3, DT).double()],
            r"x\[1\] has dtype torch.float64, expected torch.float32",
        ),
        (lambda: fusionops.MLB([DX, DT], OUT, mm_dim=MM), [torch.randn(3, DX)], r"\[x0, x1\]"),
    ],
)
def test_layer_input_errors(build, xs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()(xs)


def test_layer_device_error():
    m = fusionops.MFB([DX, DT], OUT, mm_dim=MM)
    with pytest.raises(ValueError, match=r"x\[1\] is on meta, expected cpu"):
        m([torch.randn(3, DX), torch.empty(3, DT, device="meta")])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: fusionops.Block([DX, DT], OUT, mm_dim=10, chunks=3),
            r"chunks must divide mm_dim.*"
            r"chunks=3, mm_dim=10",
        ),
        (lambda: fusionops.Mutan([DX, DT], OUT, rank=0), "rank must be an int >= 1, got 0"),
        (lambda: fusionops.MFB([DX, DT], OUT, factor=0), "factor must be an int >= 1, got 0"),
        (lambda: fusionops.Block([DX, DT], OUT, pos_norm="middle"), "pos_norm"),
    ],
)
def test_constructor_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def _mfb_args(k=2, o=3, rows=4):
    x, t = torch.randn(rows, DX), torch.randn(rows, DT)
    return (
        x,
        t,
        torch.randn(k * o, DX),
        torch.randn(k * o),
        torch.randn(k * o, DT),
        None,
        torch.randn(OUT, o),
        None,
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (_mfb_args(), {"factor": 4}, r"factor 4 must divide u_weight.shape\[0\] = 6"),
        (_mfb_args(), {"factor": 0}, "factor must be >= 1"),
        (
            _mfb_args()[:1] + (torch.randn(5, DT),) + _mfb_args()[2:],
            {"factor": 2},
            r"t has leading \(batch\) shape \(5,\), expected \(4,\)",
        ),
        (
            _mfb_args()[:1] + (torch.randn(4, DT).double(),) + _mfb_args()[2:],
            {"factor": 2},
            "t has dtype torch.float64, expected torch.float32",
        ),
        (
            _mfb_args()[:2] + (torch.randn(6, DX + 1),) + _mfb_args()[3:],
            {"factor": 2},
            r"u_weight must have shape \(6, 7\)",
        ),
        (_mfb_args(), {"factor": 2, "activation": "gelu"}, "activation must be one of"),
    ],
)
def test_mfb_op_errors(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fusionops.mfb(*args, **kwargs)


def _block_args(chunks=2, rank=2, s=3, m=None):
    m = m or chunks * s
    x, t = torch.randn(4, m), torch.randn(4, m)
    return (
        x,
        t,
        torch.randn(chunks, rank * s, s),
        None,
        torch.randn(chunks, rank * s, s),
        None,
        torch.randn(OUT, m),
        None,
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (
            _block_args(chunks=4, s=1, m=6),
            {"rank": 2},
            r"chunk count C = merge_weight0.shape\[0\] = 4 "
            "must be >= 1 and divide",
        ),
        (_block_args(), {"rank": 0}, "rank must be >= 1"),
        (_block_args(), {"rank": 3}, r"merge_weight0 must have shape \(2, 9, 3\)"),
        (
            _block_args()[:1] + (torch.randn(4, 7),) + _block_args()[2:],
            {"rank": 2},
            "t has width 7, expected 6",
        ),
        (_block_args(), {"rank": 2, "normalize": True}, "normalize must be one of"),
    ],
)
def test_block_op_errors(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fusionops.block_fusion(*args, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("layer", ["MFB", "MFH", "Block"])
def test_compile(layer, backend):
    """Compiled (fullgraph) on the fused op, against the eager reference. Seeded, and MFH with
    tanh inputs: with relu, few rows and normalisation, a block's pooled row can hold a single
    non-zero, whose normalised gradient is 0 analytically and float32 rounding noise in the
    reference, which no relative tolerance can compare (it failed so, depending on the draw)."""
    torch.manual_seed(11)
    kwargs = {"Block": {"chunks": 2, "rank": 2}, "MFB": {"normalize": True},
              "MFH": {"normalize": True, "activ_input": "tanh"}}[layer]  # fmt: skip
    m = getattr(fusionops, layer)([DX, DT], OUT, mm_dim=MM, **kwargs).eval()
    xs = [torch.randn(5, DX), torch.randn(5, DT)]
    assert_compiled_matches_reference(m, xs, backend)


def _op_calls(rounded: bool = False):
    """Each op's fused call and its reference on the same random parameters; ``rounded``: the
    reference's parameters rounded to bfloat16 and held in float64 (what autocast hands the
    fused kernels, computed without further rounding)."""
    gen = torch.Generator().manual_seed(7)  # the same parameters whichever tests ran before

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    mfb_params = [randn(6, 2), randn(6), randn(6, 3), randn(6), randn(2, 3), None]
    blk_params = [randn(2, 2, 1), None, randn(2, 2, 1), randn(2, 2), randn(3, 2), None]
    mfh_params = [randn(2, 6, 2), randn(2, 6), randn(2, 6, 3), None, randn(2, 6), None]

    def r(ps):
        return [p.bfloat16().double() if rounded and p is not None else p for p in ps]

    return {
        "mfh": (
            lambda a, b: fusionops.mfh(a, b, *mfh_params, factor=2, normalize=True),
            lambda a, b: fusionops.reference.mfh(a, b, *r(mfh_params), 2, "relu", True),
        ),
        "mfb": (
            lambda a, b: fusionops.mfb(a, b, *mfb_params, factor=2, normalize=True),
            lambda a, b: fusionops.reference.mfb(a, b, *r(mfb_params), 2, "relu", True),
        ),
        "block_fusion": (
            lambda a, b: fusionops.block_fusion(a, b[..., :2], *blk_params, rank=2),
            lambda a, b: fusionops.reference.block_fusion(a, b[..., :2], *r(blk_params), 2),
        ),
    }


@pytest.mark.parametrize("op", ["mfb", "mfh", "block_fusion"])
def test_vmap_and_meta(op):
    """Inside vmap the reference serves each sample (the kernels have no batching rule); meta
    tensors get the output shape from the fake kernels' twin, the reference."""
    fused, ref = _op_calls()[op]
    a, b = torch.randn(3, 5, 2), torch.randn(3, 5, 3)
    expected = torch.stack([ref(a[i], b[i]) for i in range(3)])
    assert_close_to(torch.vmap(fused)(a, b), expected.double(), torch.float32, f"vmap of {op}")
    with (
        fusionops.backend("cpu"),
        pytest.raises(fusionops.BackendUnavailableError, match="torch.func transform"),
    ):
        torch.vmap(fused)(a, b)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):  # real parameters
        out = fused(torch.randn(4, 2), torch.randn(4, 3))
    assert out.shape == (4, expected.shape[-1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("op", ["mfb", "mfh", "block_fusion"])
def test_autocast_lowers_like_linear(op, backend):
    """Under autocast the ops run in the autocast dtype on every backend, as nn.Linear does.
    The reference backend is the reference under autocast itself (each ATen op rounds to
    bfloat16, so near a pooled 0 the signed square root magnifies its roundings); the fused
    kernels take the bfloat16-rounded inputs and parameters, compute in float32 and round once:
    the float64 reference on those rounded values, within bfloat16's tolerance."""
    fused, ref = _op_calls()[op]
    a, b = torch.randn(4, 2), torch.randn(4, 3)
    with fusionops.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(a, b)
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(a, b)
    assert expected.dtype == torch.bfloat16
    if backend == "reference":
        assert torch.equal(out, expected)
    else:
        _, ref64 = _op_calls(rounded=True)[op]
        assert_close_to(out, ref64(a.bfloat16().double(), b.bfloat16().double()), torch.bfloat16, op)
