"""float32 dots of the Triton kernels follow torch's float32 matmul setting (issue 17, item 2):
TF32 on CUDA when ``torch.backends.cuda.matmul.allow_tf32`` is set or the float32 matmul
precision is 'high' or 'medium', IEEE otherwise; always IEEE on CPU (the interpreter) and for
other dtypes. The launchers pass it to the kernels as the constexpr PRECISION. The TF32
numerics need a GPU (the interpreter has no TF32): test_tf32_numerics_on_cuda."""

from __future__ import annotations

import os
import re

import pytest
import torch
from inputs import make_factors, make_skew_pair_inputs, make_weight, make_xs

import fusionops
from fusionops import reference
from fusionops.triton import _common
from fusionops.triton import low_rank_fusion as t_lmf
from fusionops.triton import multiple_kernel as t_mkl
from fusionops.triton import skew_pair as t_skew
from fusionops.triton import tensor_fusion as t_tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
# The modules whose float32 dots follow torch's setting: every Triton kernel's.
MODULES = {"tensor_fusion": t_tf, "low_rank_fusion": t_lmf, "skew_pair": t_skew, "multiple_kernel": t_mkl}


@pytest.fixture
def matmul_setting():
    """Restores torch's float32 matmul settings after the test."""
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


def _allow(value: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = value


def _precision(value: str) -> None:
    torch.set_float32_matmul_precision(value)


def _new_api(value: str) -> None:
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision")
    torch.backends.cuda.matmul.fp32_precision = value


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ((_precision, "highest"), "ieee"),
        ((_allow, False), "ieee"),
        ((_allow, True), "tf32"),
        ((_precision, "high"), "tf32"),
        ((_precision, "medium"), "tf32"),
        ((_new_api, "tf32"), "tf32"),
        ((_new_api, "ieee"), "ieee"),
    ],
    ids=["highest", "allow_tf32-off", "allow_tf32-on", "high", "medium", "new-api-tf32", "new-api-ieee"],
)
def test_policy_follows_torch(matmul_setting, setting, expected):
    _precision("highest")
    setter, value = setting
    setter(value)
    assert _common._input_precision(torch.float32, CUDA) == expected
    # Never on CPU (the interpreter has no TF32) and never for other dtypes.
    assert _common._input_precision(torch.float32, CPU) == "ieee"
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert _common._input_precision(dtype, CUDA) == "ieee"


def test_policy_is_read_at_every_call(matmul_setting):
    _precision("highest")
    assert _common._input_precision(torch.float32, CUDA) == "ieee"
    torch.set_float32_matmul_precision("high")
    assert _common._input_precision(torch.float32, CUDA) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert _common._input_precision(torch.float32, CUDA) == "ieee"


def test_launchers_pass_the_policy_not_a_constant():
    """Every launch of a kernel with a PRECISION constexpr passes _input_precision(dtype, device)."""
    for name in MODULES:
        with open(os.path.join(ROOT, "fusionops", "triton", f"{name}.py")) as f:
            text = f.read()
        passed = re.findall(r"PRECISION=([^\n]+),\n", text)
        assert passed, name
        assert all(p.startswith("_input_precision(") for p in passed), (name, passed)


def test_launchers_ask_the_policy_for_the_dtype_and_device(monkeypatch):
    """Under the interpreter the launchers ask with the inputs' dtype and device (CPU: ieee)."""
    asked = []

    def spy(dtype, device):
        asked.append((dtype, device.type))
        return _common._input_precision(dtype, device)

    for module in MODULES.values():
        monkeypatch.setattr(module, "_input_precision", spy)
    xs = [x.detach() for x in make_xs((6,), (2, 3), torch.float32)]
    w, b = make_weight((2, 3), 5, torch.float32)
    t_tf.projected_forward(xs, w.detach(), b.detach(), None)
    assert asked and all(a == (torch.float32, "cpu") for a in asked)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 numerics need a CUDA GPU")
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_tf32_numerics_on_cuda(matmul_setting, tf32):
    """float32 on the GPU: ‖out − ref‖/‖ref‖ against float64 far under 1e-5 with IEEE dots, and
    within TF32's bound (5e-3; about 3e-4 expected) but not IEEE-exact with TF32 allowed."""
    _precision("high" if tf32 else "highest")
    dims, n = (7, 9, 5), 257
    xs = [x.detach().cuda() for x in make_xs((n,), dims, torch.float32)]
    w, b = (t.detach().cuda() for t in make_weight(dims, 33, torch.float32))
    fs, rw, lb = (
        [t.detach().cuda() for t in v] if isinstance(v, list) else v.detach().cuda()
        for v in make_factors(dims, 4, 33, torch.float32)
    )
    ha, hb, ws, bs = make_skew_pair_inputs(65, 6, 6, 64, torch.float32, "cpu")
    ha, hb = ha.detach().cuda(), hb.detach().cuda()
    ws, bs = [t.detach().cuda() for t in ws], [t.detach().cuda() for t in bs]
    pairs = [(3, 0), (4, 1), (5, 2)]
    with fusionops.backend("triton"):
        got = {
            "tensor_fusion": fusionops.tensor_fusion(xs, w, b),
            "low_rank_fusion": fusionops.low_rank_fusion(xs, fs, rw, lb),
            "skew_pair": fusionops.skew_pair_attention(ha, hb, pairs, *ws, *bs, heads=4, window=1),
        }
    d = [x.double() for x in xs]
    ref = {
        "tensor_fusion": reference.tensor_fusion(d, w.double(), b.double()),
        "low_rank_fusion": reference.low_rank_fusion(d, [f.double() for f in fs], rw.double(), lb.double()),
        "skew_pair": reference.skew_pair_attention(
            ha.double(),
            hb.double(),
            pairs,
            *(t.double() for t in ws),
            *(t.double() for t in bs),
            heads=4,
            window=1,
        ),  # fmt: skip
    }
    for name, out in got.items():
        err = _rel(out, ref[name])
        assert err < (5e-3 if tf32 else 1e-5), (name, err)
