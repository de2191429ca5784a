"""Build of fusionops and its optional compiled extension ``fusionops._C``.

* The C++ kernels (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) are compiled whenever torch is
  importable at build time: install torch first and build without isolation
  (``pip install --no-build-isolation -e .``).
* The CUDA kernels (``csrc/cuda/*.cu``, ``csrc/cuda/*.cpp`` bindings and the plain kernels in
  ``csrc/cuda/kernels/*.cu``) are added when a CUDA toolkit and a CUDA build of
  torch are present. ``FUSIONOPS_WITH_CUDA=1`` forces them (failing loudly if impossible),
  ``FUSIONOPS_WITH_CUDA=0`` skips them. ``FUSIONOPS_BUILD_EXT=0`` skips the extension.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str:
    return os.environ.get(name, "auto").strip().lower()


def _extensions() -> tuple[list, dict]:
    if _flag("FUSIONOPS_BUILD_EXT") in ("0", "false", "no"):
        print("fusionops: FUSIONOPS_BUILD_EXT=0, building without fusionops._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "fusionops: WARNING: torch is not importable at build time, so the C++ extension "
            "is not built. Install torch first, then `pip install --no-build-isolation .`",
            file=sys.stderr,
        )
        return [], {}

    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    sources = rel(
        [os.path.join(HERE, "csrc", "ops.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))
    )
    cuda_sources = rel(
        glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
        + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp"))
        # The plain CUDA kernels (no torch headers) the bindings above launch.
        + glob.glob(os.path.join(HERE, "csrc", "cuda", "kernels", "*.cu"))
    )

    want_cuda = _flag("FUSIONOPS_WITH_CUDA")
    can_cuda = torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda_sources)
    if want_cuda in ("1", "true", "yes") and not can_cuda:
        raise RuntimeError(
            "FUSIONOPS_WITH_CUDA=1 but CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}, "
            f"CUDA sources found: {len(cuda_sources)}"
        )
    with_cuda = can_cuda and want_cuda not in ("0", "false", "no")

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = CUDAExtension(
            "fusionops._C",
            sources + cuda_sources,
            # No --use_fast_math: it flushes subnormals to zero and uses approximate division
            # and exp; the kernels are tested against float64 references (correctness first).
            extra_compile_args={"cxx": cxx + ["-DFUSIONOPS_WITH_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fusionops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
