"""Build of fusionops and its optional compiled extension ``fusionops._C``.

* The C++ kernels (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) are compiled against the torch of
  the environment being installed into: install torch first, then
  ``pip install --no-build-isolation -e .`` (README). Under build isolation that torch is
  found in the target environment's site-packages, never downloaded again; with no torch
  there the build stops with an error saying so, unless ``FUSIONOPS_BUILD_EXT=0``.
* The CUDA kernels (``csrc/cuda/*.cu``, ``csrc/cuda/*.cpp`` bindings and the plain kernels in
  ``csrc/cuda/kernels/*.cu``) are added when a CUDA toolkit and a CUDA build of
  torch are present. ``FUSIONOPS_WITH_CUDA=1`` forces them (failing loudly if impossible),
  ``FUSIONOPS_WITH_CUDA=0`` skips them. ``FUSIONOPS_BUILD_EXT=0`` skips the extension.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cxx_standard() -> str:
    """The C++ standard the installed torch's headers need (c++20 from torch 2.14 on, c++17
    before; ``FUSIONOPS_CXX_STD`` overrides): tools/torch_cxx_std.py, loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "_fusionops_torch_cxx_std", os.path.join(HERE, "tools", "torch_cxx_std.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.torch_cxx_standard()


def _flag(name: str) -> str:
    return os.environ.get(name, "auto").strip().lower()


# Commands that compile. Metadata and sdist runs (egg_info, dist_info, sdist) need no torch.
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _find_torch() -> bool:
    """Whether torch is importable, looking also in the target environment: pip's build
    isolation hides its site-packages from sys.path (sysconfig still names it), and building
    against the torch installed there beats downloading a second one just to compile."""
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        pass
    for site in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")):
        if os.path.isfile(os.path.join(site, "torch", "__init__.py")):
            sys.path.append(site)  # last: the isolated build's own setuptools stays first
            print(f"fusionops: build isolation: compiling against the torch in {site}", file=sys.stderr)
            return True
    return False


def _extensions() -> tuple[list, dict]:
    if _flag("FUSIONOPS_BUILD_EXT") in ("0", "false", "no"):
        print("fusionops: FUSIONOPS_BUILD_EXT=0, building without fusionops._C", file=sys.stderr)
        return [], {}
    if not _BUILD_COMMANDS & set(sys.argv[1:]):
        return [], {}
    if not _find_torch():
        # pip shows a build's output only when it fails: failing is the only way to be heard.
        raise SystemExit(
            "fusionops: ERROR: torch is not installed in the environment being installed into, so "
            "the C++ extension fusionops._C cannot be built. Install torch first (pip install torch), "
            "then `pip install --no-build-isolation .`; or set FUSIONOPS_BUILD_EXT=0 to install "
            "without the compiled kernels (reference and Triton backends only)."
        )
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

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

    std = f"-std={_cxx_standard()}"
    print(f"fusionops: compiling with {std} (torch {torch.__version__})", file=sys.stderr)
    cxx = ["-O3", std, "-fopenmp"]
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = CUDAExtension(
            "fusionops._C",
            sources + cuda_sources,
            # No --use_fast_math: it flushes subnormals to zero and uses approximate division
            # and exp; the kernels are tested against float64 references (correctness first).
            extra_compile_args={"cxx": cxx + ["-DFUSIONOPS_WITH_CUDA"], "nvcc": ["-O3", std]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fusionops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    class BuildExt(BuildExtension.with_options(use_ninja=True)):  # type: ignore[misc]
        """Objects in the checkout's build/, whatever build_temp the front end picked (pip's
        editable install picks a new temporary one each time): a second install in the same
        checkout, such as README's second command, recompiles only what changed (ninja checks
        each object's command line too, so another torch or Python rebuilds)."""

        def finalize_options(self) -> None:
            super().finalize_options()
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(HERE, "build", f"temp-{tag}")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
