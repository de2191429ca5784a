"""Loading of the optional compiled extension ``fusionops._C``.

The extension registers the C++ (and, when built with CUDA, the CUDA) kernels as
``torch.ops.fusionops._*`` ops. It is optional: when it is missing, ``import fusionops``
warns once and the other backends serve every call.
"""

from __future__ import annotations

import importlib
import warnings

import torch  # first: loads libc10/libtorch, which fusionops._C links against

_load_error: str | None = None
_warned = False

try:
    importlib.import_module("fusionops._C")  # importing registers the kernels
except ImportError as exc:  # the build is optional; say why once
    _load_error = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    """True when ``fusionops._C`` was imported and its kernels are registered."""
    return _load_error is None


def extension_error() -> str | None:
    """Why ``fusionops._C`` could not be imported (None when it was)."""
    return _load_error


def extension_built_with_cuda() -> bool:
    """True when the loaded extension carries CUDA kernels."""
    return _load_error is None and bool(torch.ops.fusionops._built_with_cuda())


def warn_if_missing() -> None:
    """Warn once per process that the compiled extension is unavailable."""
    global _warned
    if _load_error is None or _warned:
        return
    _warned = True
    warnings.warn(
        "fusionops: the compiled extension fusionops._C is not available "
        f"({_load_error}); the 'cpu' backend is disabled and the reference or Triton "
        "kernels serve instead. Rebuild with "
        "`pip install --no-build-isolation -e .` after installing torch.",
        RuntimeWarning,
        stacklevel=3,
    )
