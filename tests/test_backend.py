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
    module = importlib.import_module("fusionops.ops.product_fusion")
    monkeypatch.setattr(module, "OPDEF", OPS["product_fusion"])
    # The compiled eager entry ships in the same library as the kernels, so it never meets an
    # extension without them: the Python path decides here.
    monkeypatch.setattr(module, "_COMPILED_ENTRY", None)
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


@pytest.mark.skipif(not _extension.extension_loaded(), reason="the C++ extension is not built")
def test_automatic_choice_depends_on_size_and_mode():
    """On CPU the size rule is per mode: a small tensor fusion call that records a gradient
    goes to the fused kernels (never lost there), the same call in inference to the reference
    (its one GEMM wins below the forward threshold; modalities wider than the narrow-width rule's),
    a large inference call to the kernels; forcing a backend bypasses the rule."""
    op = OPS["tensor_fusion"]
    wide = op.cpu_narrow_width_forward + 1
    small = [torch.randn(4, wide, requires_grad=True), torch.randn(4, 2)]
    side = int(op.cpu_min_size_forward**0.5) + 1
    big = [torch.randn(1, side - 1), torch.randn(1, side - 1)]
    fusionops.reset_dispatch_counts()
    fusionops.tensor_fusion(small)
    with torch.no_grad():
        fusionops.tensor_fusion(small)
        fusionops.tensor_fusion(big)
        with fusionops.backend("reference"):
            fusionops.tensor_fusion(big)
    assert fusionops.dispatch_counts() == {"tensor_fusion": {"cpu": 2, "reference": 2}}
