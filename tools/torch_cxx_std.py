"""The C++ standard the installed torch's headers need: ``c++20`` for torch >= 2.14, whose ATen
headers ``#error`` below C++20, ``c++17`` before that.

Read from the headers themselves (``ATen/ATen.h`` guards with ``__cplusplus < 2xxxxxL``), so a
torch that moves the floor again is followed without an edit here; the version number is the
fallback when the header cannot be read. ``FUSIONOPS_CXX_STD`` (e.g. ``c++20``) overrides both.

Used by ``setup.py``, ``tests/test_cuda_build.py`` and ``.ci/nvcc_check``; as a script it prints
the standard (``python tools/torch_cxx_std.py`` → ``c++20``), or ``c++17`` when torch is absent.
"""

from __future__ import annotations

import os
import re
import sys

# __cplusplus values -> the -std= name
_STANDARDS = {201703: "c++17", 202002: "c++20", 202302: "c++23"}
_GUARD = re.compile(r"__cplusplus\s*<\s*(\d{6})L")


def from_headers(include_dirs: list[str]) -> str | None:
    """The standard ATen/ATen.h demands (its ``#if ... __cplusplus < N`` guard), or None."""
    for inc in include_dirs:
        path = os.path.join(inc, "ATen", "ATen.h")
        try:
            with open(path) as f:
                text = f.read(4096)
        except OSError:
            continue
        found = [int(v) for v in _GUARD.findall(text)]
        if found:
            need = max(found)
            # the smallest standard at or above the guard
            for value in sorted(_STANDARDS):
                if value >= need:
                    return _STANDARDS[value]
    return None


def from_version(version: str) -> str:
    """``c++20`` for torch >= 2.14 (its headers need it), else ``c++17``."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return "c++20" if (int(m.group(1)), int(m.group(2))) >= (2, 14) else "c++17"


def torch_cxx_standard() -> str:
    """The -std= value (without '-std=') to compile against the installed torch."""
    override = os.environ.get("FUSIONOPS_CXX_STD", "").strip()
    if override:
        if override not in _STANDARDS.values():
            raise ValueError(f"FUSIONOPS_CXX_STD={override!r}: expected one of {sorted(_STANDARDS.values())}")
        return override
    import torch
    from torch.utils.cpp_extension import include_paths

    return from_headers(include_paths()) or from_version(torch.__version__)


if __name__ == "__main__":
    try:
        print(torch_cxx_standard())
    except ImportError:
        print("c++17")
        sys.exit(0)
