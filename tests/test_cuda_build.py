"""The CUDA build path that a GPU-less machine can check: the plain CUDA kernels compile with
nvcc (.ci/nvcc_check), the ops with CUDA kernels are routed to them, and a build without CUDA
says how to get them. The kernels' numerics are tested on a GPU by the kernel tests (device
"cuda", backends "cuda" and "triton"; see conftest.py)."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess

import pytest
import torch

import fusionops
from fusionops import _backend, _extension
from fusionops.ops._dispatch import CUDA_KERNEL_OPS, fused_kernels

pf = importlib.import_module("fusionops.ops.product_fusion")  # the module, not the function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_plain_cuda_kernels_compile_with_nvcc():
    done = subprocess.run(
        [os.path.join(ROOT, ".ci", "nvcc_check")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "product_fusion_kernels.cu" in done.stdout
    assert "compiled" in done.stdout


def test_product_fusion_has_cuda_kernels():
    assert "product_fusion" in CUDA_KERNEL_OPS
    assert isinstance(pf._kernels("cuda"), pf._CudaKernels)
    assert isinstance(pf._kernels("cpu"), pf._CppKernels)


def test_fused_kernels_without_cuda_kernels_names_the_choices():
    with pytest.raises(ValueError, match=r"backend 'cuda' has no fused kernels.*expected 'cpu' or 'triton'"):
        fused_kernels("op", "cuda", object(), "product_fusion")


@pytest.mark.skipif(_extension.extension_built_with_cuda(), reason="the extension was built with CUDA")
def test_cuda_backend_on_a_build_without_cuda_says_how_to_build():
    reasons = pf._reasons("cuda", CUDA, torch.float32, 2)
    assert any("built without CUDA" in r and "FUSIONOPS_WITH_CUDA=1" in r for r in reasons), reasons
    assert not any("not implemented" in r for r in reasons), reasons
    # What product_fusion does for a CUDA tensor with the cuda backend forced.
    with fusionops.backend("cuda"), pytest.raises(fusionops.BackendUnavailableError) as info:
        _backend.choose(pf.OP, CUDA, lambda b: pf._reasons(b, CUDA, torch.float32, 2))
    msg = str(info.value)
    assert "forced backend 'cuda' cannot serve" in msg
    assert "built without CUDA" in msg


def test_cuda_backend_takes_at_most_eight_modalities():
    assert not any("at most" in r for r in pf._reasons("cuda", CUDA, torch.float32, pf.CUDA_MAX_MODALITIES))
    reasons = pf._reasons("cuda", CUDA, torch.float32, pf.CUDA_MAX_MODALITIES + 1)
    assert any("at most 8 modalities, got 9" in r for r in reasons), reasons
