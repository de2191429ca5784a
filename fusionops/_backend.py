"""Which implementation serves a call, and why the others cannot.

Backends, by name:

``reference``  pure PyTorch (``fusionops.reference``); serves every device and dtype.
``cpu``        C++ kernels of the compiled extension, CPU tensors.
``triton``     Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``cuda``       CUDA C++ kernels of the compiled extension, CUDA tensors.

``fusionops.backend(name)`` (a context manager) or the environment variable
``FUSIONOPS_BACKEND`` (read once, when fusionops is imported, so that eager calls and
compiled graphs see the same value) forces one; a forced backend that cannot serve a call raises
:class:`BackendUnavailableError` with the reasons of every backend. Otherwise the first
backend of :data:`DEFAULT_ORDER` for the device that can serve the call is used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

from fusionops import _extension

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Fastest first. Triton on CPU runs in the (slow) interpreter, so it is only used on CPU
# when forced.
#
# On CUDA devices Triton comes first for now: the CUDA C++ kernels (csrc/cuda/) compile in CI
# and are checked on the CPU under an emulation (tests/test_cuda_kernels_emulated.py), but have
# not yet been run or timed on a GPU, and issue 7 makes the faster of the two the
# default only once it is measured. To flip it, run the GPU benchmarks
# (`python -m benchmarks.report --device cuda`, results under benchmarks/results/) and put
# "cuda" first where it wins (per op, via an op's shape-aware `order`, if it wins only in some
# regimes). Forcing still works meanwhile: fusionops.backend("cuda") or FUSIONOPS_BACKEND=cuda.
DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_forced: str | None = None
# Read at import: torch.compile guards on module globals, not on later environment changes.
_env_forced: str = os.environ.get("FUSIONOPS_BACKEND", "")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve a call; the message lists the reasons."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Force backend ``name`` for the fusionops calls made inside the block.

    ``None`` restores automatic choice inside the block (overriding ``FUSIONOPS_BACKEND``
    is not possible that way: the variable is read when no block forces a backend).
    """
    global _forced
    if name is not None:
        _check_name(name, "fusionops.backend")
    previous = _forced
    _forced = name
    try:
        yield
    finally:
        _forced = previous


def forced_backend() -> str | None:
    """The backend forced by a ``fusionops.backend`` block or ``FUSIONOPS_BACKEND``."""
    if _forced is not None:
        return _forced
    return _check_name(_env_forced, "FUSIONOPS_BACKEND") if _env_forced else None


def triton_unsupported_reason(device: torch.device) -> str | None:
    """Why Triton cannot run on ``device`` in this process (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
                "triton is first imported"
            )
        return None
    if device.type != "cuda":
        return f"Triton kernels run on CUDA tensors, got device {device}"
    return None


def common_reasons(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Reasons, shared by every op, why backend ``name`` cannot serve ``device``/``dtype``."""
    reasons: list[str] = []
    if name == "reference":
        return reasons
    if dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {dtype} is not one of {FLOAT_DTYPES}")
    if name == "cpu":
        if device.type != "cpu":
            reasons.append(f"the cpu backend serves CPU tensors, got device {device}")
        if not _extension.extension_loaded():
            reasons.append(f"the compiled extension is not built ({_extension.extension_error()})")
    elif name == "triton":
        why = triton_unsupported_reason(device)
        if why:
            reasons.append(why)
    elif name == "cuda":
        if device.type != "cuda":
            reasons.append(f"the cuda backend serves CUDA tensors, got device {device}")
        elif not _extension.extension_built_with_cuda():
            reasons.append(
                "the compiled extension was built without CUDA: install a CUDA build of "
                "torch and a CUDA toolkit, then rebuild with FUSIONOPS_WITH_CUDA=1 "
                "pip install --no-build-isolation -e ."
            )
    return reasons


ReasonFn = Callable[[str], list[str]]


def choose(op: str, device: torch.device, reasons: ReasonFn, order: tuple[str, ...] | None = None) -> str:
    """Pick the backend for one call of ``op``.

    ``reasons(name)`` lists why backend ``name`` cannot serve this call (empty: it can).
    ``order`` replaces :data:`DEFAULT_ORDER` for this call (an op's shape-aware preference).
    """
    forced = forced_backend()
    if forced is not None:
        why = reasons(forced)
        if not why:
            return forced
        raise BackendUnavailableError(
            f"{op}: the forced backend {forced!r} cannot serve this call:\n"
            + "\n".join(f"  - {r}" for r in why)
            + "\nBackends that could: "
            + (", ".join(n for n in BACKENDS if not reasons(n)) or "none")
        )
    for name in order or DEFAULT_ORDER.get(device.type, ("reference",)):
        if not reasons(name):
            return name
    return "reference"
