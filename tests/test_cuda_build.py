"""The CUDA build path that a GPU-less machine can check: the plain CUDA kernels compile with
nvcc (.ci/nvcc_check), the ops with CUDA kernels are routed to them, and a build without CUDA
says how to get them. The kernels' numerics are tested on a GPU by the kernel tests (device
"cuda", backends "cuda" and "triton"; see conftest.py)."""

from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import subprocess

import pytest
import torch

import fusionops
from fusionops import _backend, _extension
from fusionops.ops._dispatch import CUDA_KERNEL_OPS, CUDA_MAX_MODALITIES, fused_kernels

# The modules, not the functions of the same names.
pf = importlib.import_module("fusionops.ops.product_fusion")
tf = importlib.import_module("fusionops.ops.tensor_fusion")
lmf = importlib.import_module("fusionops.ops.low_rank_fusion")
CUDA_OPS = [pf, tf, lmf]  # the op modules with CUDA C++ kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_plain_cuda_kernels_compile_with_nvcc():
    done = subprocess.run(
        [os.path.join(ROOT, ".ci", "nvcc_check")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("product_fusion_kernels.cu", "tensor_fusion_kernels.cu", "low_rank_fusion_kernels.cu"):
        assert name in done.stdout, done.stdout
    assert "compiled" in done.stdout


def test_product_fusion_has_cuda_kernels():
    assert "product_fusion" in CUDA_KERNEL_OPS
    assert isinstance(pf._kernels("cuda"), pf._CompiledKernels) and pf._kernels("cuda").device == "cuda"
    assert isinstance(pf._kernels("cpu"), pf._CompiledKernels) and pf._kernels("cpu").device == "cpu"


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


# ---- tensor fusion and low-rank fusion (and product fusion, by the same rules) --------------


@pytest.mark.parametrize("module", CUDA_OPS, ids=lambda m: m.OP)
def test_ops_with_cuda_kernels_route_cuda_to_them(module):
    assert module.OP in CUDA_KERNEL_OPS
    assert (
        isinstance(module._kernels("cuda"), module._CompiledKernels)
        and module._kernels("cuda").device == "cuda"
    )
    assert (
        isinstance(module._kernels("cpu"), module._CompiledKernels) and module._kernels("cpu").device == "cpu"
    )
    assert module.CUDA_MAX_MODALITIES == CUDA_MAX_MODALITIES == 8


@pytest.mark.parametrize("module", CUDA_OPS, ids=lambda m: m.OP)
def test_cuda_kernels_take_at_most_eight_modalities(module):
    assert not any("at most" in r for r in module._reasons("cuda", CUDA, torch.float32, 8))
    reasons = module._reasons("cuda", CUDA, torch.float32, 9)
    assert any("at most 8 modalities, got 9" in r and "triton" in r for r in reasons), reasons
    # Only the cuda backend has the limit.
    assert not any("at most" in r for r in module._reasons("triton", CUDA, torch.float32, 9))


def test_kernel_limit_matches_the_cuda_sources():
    with open(os.path.join(ROOT, "csrc", "cuda", "kernels", "common.h")) as f:
        found = re.search(r"constexpr int kMaxModalities = (\d+);", f.read())
    assert found is not None and int(found.group(1)) == CUDA_MAX_MODALITIES


@pytest.mark.skipif(_extension.extension_built_with_cuda(), reason="the extension was built with CUDA")
@pytest.mark.parametrize("module", [tf, lmf], ids=lambda m: m.OP)
def test_new_cuda_ops_on_a_build_without_cuda_say_how_to_build(module):
    reasons = module._reasons("cuda", CUDA, torch.float32, 2)
    assert any("built without CUDA" in r and "FUSIONOPS_WITH_CUDA=1" in r for r in reasons), reasons
    assert not any("not implemented" in r for r in reasons), reasons
    with fusionops.backend("cuda"), pytest.raises(fusionops.BackendUnavailableError) as info:
        _backend.choose(module.OP, CUDA, lambda b: module._reasons(b, CUDA, torch.float32, 2))
    assert "built without CUDA" in str(info.value)


def test_gpu_default_prefers_triton_until_cuda_is_measured():
    """The CUDA C++ kernels have not been timed against Triton on a GPU yet (issue 7 asks for
    the measurement before making either the default), so the automatic order tries Triton
    first; cuda serves when Triton cannot, and whenever it is forced."""
    assert _backend.DEFAULT_ORDER["cuda"] == ("triton", "cuda", "reference")

    def usable(*names):
        return lambda b: [] if b in names else ["not here"]

    assert _backend.choose("op", CUDA, usable("triton", "cuda", "reference")) == "triton"
    assert _backend.choose("op", CUDA, usable("cuda", "reference")) == "cuda"
    with fusionops.backend("cuda"):
        assert _backend.choose("op", CUDA, usable("triton", "cuda", "reference")) == "cuda"


def _schemas(text: str) -> dict[str, str]:
    """Schema name -> its argument and return text, from the m.def(...) calls in C++ source."""
    out = {}
    for call in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call))
        name, rest = schema.split("(", 1)
        out[name.strip()] = rest
    return out


def test_cuda_schemas_mirror_the_cpu_ones_and_are_all_implemented():
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        cpu = _schemas(f.read())
    names = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))):
        with open(path) as f:
            text = f.read()
        defined = _schemas(text)
        assert defined, path
        names |= set(defined)
        for name, rest in defined.items():
            assert name.endswith("_cuda"), (path, name)
            twin = name.removesuffix("_cuda") + "_cpu"
            assert cpu.get(twin) == rest, f"{path}: {name} differs from {twin}: {rest!r} vs {cpu.get(twin)!r}"
        implemented = set(re.findall(r'm\.impl\("(\w+)"', text))
        assert implemented == set(defined), path
        assert "TORCH_LIBRARY_IMPL(fusionops, CUDA, m)" in text, path
        assert "CUDAGuard" in text and "getCurrentCUDAStream" in text, path
    for op, kernel in (("tensor_fusion", "_tf_projected_fwd_cuda"), ("low_rank_fusion", "_lmf_fwd_cuda")):
        assert kernel in names, (op, kernel)


# Stand-ins for the three torch CUDA headers the bindings include, with the signatures the
# bindings use (a CUDA build of torch has the real ones). With them, g++ checks the bindings
# against torch's real ATen and torch/library.h headers on a machine without CUDA torch.
_STUBS = {
    "ATen/cuda/CUDAContext.h": """#pragma once
#include <cuda_runtime.h>
#include <c10/core/Device.h>
namespace at::cuda {
struct CUDAStream { operator cudaStream_t() const { return nullptr; } };
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}
""",
    "c10/cuda/CUDAGuard.h": """#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};
}
""",
    "c10/cuda/CUDAException.h": """#pragma once
#include <cuda_runtime.h>
#include <c10/util/Exception.h>
#define C10_CUDA_CHECK(EXPR) \\
  do { const cudaError_t e_ = (EXPR); TORCH_CHECK(e_ == cudaSuccess, cudaGetErrorString(e_)); } while (0)
""",
}


def _cuda_include_dir() -> str | None:
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "include", "cuda_runtime.h")):
            return os.path.join(base, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
        if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
            return inc
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None or _cuda_include_dir() is None, reason="needs g++ and CUDA headers"
)
def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    """The torch bindings (csrc/cuda/*.cpp) need a CUDA build of torch to be built; here they are
    syntax- and type-checked against the installed torch's headers, with the three CUDA-only
    torch headers stubbed (_STUBS), so a typo in a binding fails before a GPU machine sees it."""
    from torch.utils.cpp_extension import include_paths

    for rel, text in _STUBS.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    flags = ["-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-isystem{tmp_path}"]
    flags += [f"-isystem{_cuda_include_dir()}"] + [f"-isystem{p}" for p in include_paths()]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    assert {os.path.basename(s) for s in sources} >= {"tensor_fusion.cpp", "low_rank_fusion.cpp"}
    jobs = [
        (s, subprocess.Popen(["g++", *flags, s], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for s in sources
    ]
    for source, job in jobs:
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"{source}:\n{out[-4000:]}"


def test_gpu_script_parses_and_names_its_stages():
    """.ci/gpu_run is what a session with a GPU runs (build, test, sanitize, bench)."""
    script = os.path.join(ROOT, ".ci", "gpu_run")
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    done = subprocess.run(
        [script], capture_output=True, text=True, env={**os.environ, "OUT": "/tmp/gpu_run_test"}
    )
    assert done.returncode == 2 and "build | test | sanitize | bench" in done.stderr
