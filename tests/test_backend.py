"""Backend choice: forced by context or environment, automatic otherwise, explained."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch

import fusionops
from fusionops import _backend, _extension
from fusionops.info import report
from fusionops.registry import OPS


def _xs():
    return [torch.randn(3, 2), torch.randn(3, 4)]


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(
        ValueError, match=r"unknown backend 'fast'; expected one of \('reference', 'cpu', 'triton', 'cuda'\)"
    ):
        with fusionops.backend("fast"):
            pass
    monkeypatch.setattr(_backend, "_env_forced", "fast")
    with pytest.raises(ValueError, match="FUSIONOPS_BACKEND: unknown backend 'fast'"):
        fusionops.tensor_fusion(_xs())


def test_forced_backend_that_cannot_serve_lists_reasons():
    with fusionops.backend("cuda"), pytest.raises(fusionops.BackendUnavailableError) as info:
        fusionops.tensor_fusion(_xs())
    msg = str(info.value)
    assert "forced backend 'cuda' cannot serve" in msg
    assert "serves CUDA tensors, got device cpu" in msg
    assert "Backends that could: reference" in msg


def test_missing_extension_reasons(monkeypatch):
    monkeypatch.setattr(_extension, "_load_error", "ImportError: simulated")
    _backend.refresh()
    try:
        with (
            fusionops.backend("cpu"),
            pytest.raises(fusionops.BackendUnavailableError, match="extension is not built.*simulated"),
        ):
            fusionops.tensor_fusion(_xs())
        assert (
            _backend.choose(OPS["tensor_fusion"], torch.device("cpu"), torch.float32, 2, 1 << 30)
            == "reference"
        )
    finally:
        monkeypatch.undo()
        _backend.refresh()


def test_extension_without_an_ops_kernels(monkeypatch):
    """An extension built from older sources (no kernels for a newer op) is not offered for
    that op, and the reason says to rebuild; the automatic choice falls back to the reference."""
    op = OPS["product_fusion"]
    monkeypatch.setitem(OPS, "product_fusion", dataclasses.replace(op, kernels=("_no_such_kernel",)))
    monkeypatch.setattr(
        importlib.import_module("fusionops.ops.product_fusion"), "OPDEF", OPS["product_fusion"]
    )
    _backend.refresh()
    try:
        xs = [torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)]
        with fusionops.backend("cpu"), pytest.raises(fusionops.BackendUnavailableError, match="rebuild it"):
            fusionops.product_fusion(xs)
        assert torch.equal(fusionops.product_fusion(xs), xs[0] * xs[1] * xs[2])
    finally:
        monkeypatch.undo()
        _backend.refresh()


def test_env_and_context(monkeypatch):
    monkeypatch.setattr(_backend, "_env_forced", "reference")
    assert _backend.forced_backend() == "reference"
    with fusionops.backend("cpu"):
        assert _backend.forced_backend() == "cpu"
        with fusionops.backend("triton"):
            assert _backend.forced_backend() == "triton"
        assert _backend.forced_backend() == "cpu"
    assert _backend.forced_backend() == "reference"


def test_automatic_choice_prefers_compiled_cpu():
    expected = "cpu" if _extension.extension_loaded() else "reference"
    for op in OPS.values():
        assert _backend.choose(op, torch.device("cpu"), torch.float32, 3, 1 << 30) == expected, op.name


def test_non_float_dtype_reason():
    reasons = _backend.reasons(OPS["tensor_fusion"], "cpu", torch.device("cpu"), torch.int32)
    assert any("dtype torch.int32" in r for r in reasons)


def test_info_lists_every_backend():
    text = report()
    for name in _backend.BACKENDS:
        assert f"  {name} " in text
    assert "compiled extension fusionops._C:" in text
    out = subprocess.run([sys.executable, "-m", "fusionops.info"], capture_output=True, text=True, check=True)
    assert "tensor_fusion on cpu" in out.stdout


def test_import_without_extension_warns_once_and_works():
    """A missing build never breaks ``import fusionops``: one warning, reference serves."""
    code = (
        "import sys, warnings\n"
        "sys.modules['fusionops._C'] = None  # make the import fail as a missing build would\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import fusionops, torch\n"
        "    import fusionops.ops\n"
        "    y = fusionops.tensor_fusion([torch.randn(2, 3), torch.randn(2, 1)])\n"
        "print(len([x for x in w if 'fusionops._C' in str(x.message)]), tuple(y.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FUSIONOPS_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1 (2, 8)", out.stdout + out.stderr


def test_env_variable_is_read_at_import():
    code = (
        "import torch, fusionops\n"
        "from fusionops import _backend\n"
        "print(_backend.forced_backend())\n"
        "with fusionops.backend('cuda'):\n"
        "    try:\n"
        "        fusionops.tensor_fusion([torch.randn(2, 3)])\n"
        "    except fusionops.BackendUnavailableError:\n"
        "        print('cuda refused')\n"
    )
    env = dict(os.environ, FUSIONOPS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["reference", "cuda", "refused"], out.stdout + out.stderr


def test_extension_loads_when_fusionops_is_imported_first():
    """``import fusionops`` alone (torch not imported before it) finds the built extension."""
    code = "import fusionops._extension as e; print(e.extension_loaded())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(_extension.extension_loaded()), out.stderr


def test_automatic_choice_depends_on_size(monkeypatch):
    """On CPU, small problems go to the reference (measured faster there), large ones to the
    fused kernels; forcing a backend bypasses the rule."""
    from fusionops.ops.tensor_fusion import CPU_FUSED_MIN_ELEMENTS

    served = []
    real = fusionops.reference.tensor_fusion
    monkeypatch.setattr(
        fusionops.reference, "tensor_fusion", lambda *a: served.append("reference") or real(*a)
    )
    small = [torch.randn(4, 3), torch.randn(4, 2)]
    fusionops.tensor_fusion(small)
    assert served == ["reference"]
    d = 127  # N * K = 64 * 128**2 = CPU_FUSED_MIN_ELEMENTS
    big = [torch.randn(64, d), torch.randn(64, d)]
    assert 64 * (d + 1) ** 2 >= CPU_FUSED_MIN_ELEMENTS
    fusionops.tensor_fusion(big)
    assert served == ["reference"] + ([] if _extension.extension_loaded() else ["reference"])
    with fusionops.backend("reference"):
        fusionops.tensor_fusion(big)
    assert served[-1] == "reference" and len(served) >= 2


@pytest.mark.parametrize(
    "op, make, expected",
    [
        ("low_rank_fusion", lambda n: ([torch.randn(n, 3)], [torch.randn(8, 4, 64)], torch.randn(8)), None),
        ("product_fusion", lambda n: ([torch.randn(n, 1024)] * 3,), None),
        ("product_fusion", lambda n: ([torch.randn(n, 1024)] * 2,), "reference"),
    ],
    ids=["low_rank", "product_3", "product_2"],
)
def test_automatic_choice_of_the_new_ops(monkeypatch, op, make, expected):
    """Small calls go to the reference, large ones to the C++ kernels, except product fusion of
    two modalities, which ATen's one multiply serves as fast (measured)."""
    served = []
    real = getattr(fusionops.reference, op)
    monkeypatch.setattr(fusionops.reference, op, lambda *a: served.append("reference") or real(*a))
    fn = getattr(fusionops, op)
    fn(*make(2))
    assert served == ["reference"]
    fn(*make(1024))  # above both thresholds
    big_expected = expected or ("cpu" if _extension.extension_loaded() else "reference")
    assert (len(served) == 2) == (big_expected == "reference"), (served, big_expected)
