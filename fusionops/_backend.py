"""Which implementation serves a call, and why the others cannot.

Backends, by name:

``reference``  pure PyTorch (``fusionops.reference``); serves every device and dtype.
``cpu``        C++ kernels of the compiled extension, CPU tensors.
``triton``     Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``cuda``       CUDA C++ kernels of the compiled extension, CUDA tensors.

``fusionops.backend(name)`` (a context manager) or the environment variable
``FUSIONOPS_BACKEND`` (read once, when fusionops is imported, so that eager calls and
compiled graphs see the same value) forces one; a block forces it for its own thread only. A
forced backend that cannot serve a call raises :class:`BackendUnavailableError` with the
reasons of every backend. Otherwise the first backend of :data:`DEFAULT_ORDER` for the device
that can serve the call is used, after the op's size rule (``OpDef.prefers_fused``).

What each op is (its kernels, size rule) comes from the registry, ``fusionops.registry``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from fusionops import _extension
from fusionops.registry import (
    COUNTS,
    CUDA_MAX_MODALITIES,
    NATIVE_COUNTS,
    OpDef,
    forget_compiled_kernels,
    has_compiled_kernels,
)

BACKENDS = ("reference", "cpu", "triton", "cuda")
FUSED_BACKENDS = BACKENDS[1:]

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

# The fused backends that can serve each device type (built here or not), for tests and tools.
DEVICE_BACKENDS = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _ThreadState(threading.local):
    """The backend forced by fusionops.backend blocks, per thread (torch.compile guards on it).
    A class default, so that reading it where no block ever ran is a plain lookup, not a
    failed one (an AttributeError caught inside getattr cost 0.3 µs a call)."""

    forced: str | None = None


_local = _ThreadState()
# fusionops.backend blocks that force a backend (not None), open now in any thread. While there
# are none and the environment forces nothing, no call anywhere is forced: the compiled eager
# entries (csrc/cpu/eager_entry.h) are taken only then (they cannot see this thread's block).
_open_blocks = 0
_open_blocks_lock = threading.Lock()
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
    """Force backend ``name`` for the fusionops calls made inside the block, in this thread.

    ``None`` restores automatic choice inside the block (overriding ``FUSIONOPS_BACKEND``
    is not possible that way: the variable is read when no block forces a backend).
    Other threads keep their own choice.
    """
    if name is not None:
        _check_name(name, "fusionops.backend")
    global _open_blocks
    previous = _local.forced
    _local.forced = name
    if name is not None:
        with _open_blocks_lock:
            _open_blocks += 1
    try:
        yield
    finally:
        _local.forced = previous
        if name is not None:
            with _open_blocks_lock:
                _open_blocks -= 1


def forced_backend() -> str | None:
    """The backend forced in this thread by a ``fusionops.backend`` block, else by
    ``FUSIONOPS_BACKEND``."""
    forced = _local.forced
    if forced is not None:
        return forced
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


def reasons(op: OpDef, name: str, device: torch.device, dtype: torch.dtype, modalities: int = 1) -> list[str]:
    """Why backend ``name`` cannot serve ``op`` on ``device``/``dtype`` with ``modalities``
    modalities (empty: it can)."""
    why: list[str] = []
    if name == "reference":
        return why
    if dtype not in FLOAT_DTYPES:
        why.append(f"dtype {dtype} is not one of {FLOAT_DTYPES}")
    if name == "cpu":
        if device.type != "cpu":
            why.append(f"the cpu backend serves CPU tensors, got device {device}")
        elif not _extension.extension_loaded():
            why.append(f"the compiled extension is not built ({_extension.extension_error()})")
        elif not has_compiled_kernels(op.kernels, "CPU"):
            why.append(
                f"the compiled extension fusionops._C has no {op.name} kernels (built from older "
                "sources): rebuild it with pip install --no-build-isolation -e ."
            )
    elif name == "triton":
        if (reason := triton_unsupported_reason(device)) is not None:
            why.append(reason)
    elif name == "cuda":
        if device.type != "cuda":
            why.append(f"the cuda backend serves CUDA tensors, got device {device}")
        elif not op.cuda_kernels:
            why.append(f"CUDA C++ kernels for {op.name} are not implemented yet")
        elif not _extension.extension_built_with_cuda():
            why.append(
                "the compiled extension was built without CUDA: install a CUDA build of "
                "torch and a CUDA toolkit, then rebuild with FUSIONOPS_WITH_CUDA=1 "
                "pip install --no-build-isolation -e ."
            )
        elif not has_compiled_kernels(op.kernels, "CUDA"):
            why.append(
                f"the compiled extension fusionops._C has no CUDA {op.name} kernels (built from older "
                "sources): rebuild it with FUSIONOPS_WITH_CUDA=1 pip install --no-build-isolation -e ."
            )
        if op.cuda_kernels and modalities > CUDA_MAX_MODALITIES:
            why.append(
                f"the CUDA kernels take at most {CUDA_MAX_MODALITIES} modalities, got {modalities} "
                "(the triton and reference backends take any number)"
            )
    return why


def entry_kernels(op: OpDef, backend: object, device: torch.device, dtype: torch.dtype, modalities: int):
    """The kernels of ``backend`` for a call of a registered op (``torch.ops.fusionops.*``,
    whose last argument names the backend): an error unless that backend can serve it."""
    if backend not in FUSED_BACKENDS:
        raise ValueError(
            f"{op.name}: backend must be one of {', '.join(map(repr, FUSED_BACKENDS))} (the "
            f"registered ops run fused kernels; the reference is fusionops.reference), got {backend!r}"
        )
    why = reasons(op, backend, device, dtype, modalities)
    if why:
        raise BackendUnavailableError(
            f"{op.name}: backend {backend!r} cannot serve this call:\n" + "\n".join(f"  - {r}" for r in why)
        )
    return op.kernels_for(backend)


@functools.cache
def _automatic(op: OpDef, device: torch.device, dtype: torch.dtype, many: bool, fused: bool) -> str:
    """The automatic choice, cached: it depends on the call only through these arguments
    (``many``: more modalities than the CUDA kernels take; ``fused``: the size rule's verdict).
    :func:`refresh` forgets it (after the extension or the environment changed)."""
    modalities = CUDA_MAX_MODALITIES + 1 if many else 1
    for name in DEFAULT_ORDER.get(device.type, ("reference",)):
        if name != "reference" and not fused:
            continue
        if not reasons(op, name, device, dtype, modalities):
            return name
    return "reference"


def refresh() -> None:
    """Forget cached choices and kernel lookups (tests that fake a missing build call this)."""
    _automatic.cache_clear()
    _cpu_serves.clear()
    forget_compiled_kernels()


_functorch_active = torch._C._are_functorch_transforms_active
# Inside vmap, grad, jacrev…: tensors are wrapped (no storage to read), and the fused kernels have
# no batching rules.
functorch_active = _functorch_active


def choose(
    op: OpDef,
    device: torch.device,
    dtype: torch.dtype,
    modalities: int,
    size: object,
    training: bool = True,
    widest: object = None,
) -> str:
    """The backend serving one call of ``op``: the forced one (or an error listing why it
    cannot serve, and which could), else the automatic choice. ``size`` is the op's size
    metric for its CPU rule (an int, or a SymInt when traced with dynamic shapes); ``training``:
    the call records a gradient (``registry.needs_grad``); ``widest``: the widest modality, for
    an op's narrow-width rule (``OpDef.prefers_fused``)."""
    forced = forced_backend()
    if _functorch_active():  # vmap, grad, jacrev…: the kernels have no batching/functorch rules
        if forced not in (None, "reference"):
            raise BackendUnavailableError(
                f"{op.name}: the forced backend {forced!r} cannot serve a call inside a torch.func "
                "transform (vmap, grad, jacrev, ...): the fused kernels have no batching or functorch "
                "rules. Backends that could: reference (the automatic choice there)"
            )
        name = "reference"
    elif forced is not None:
        why = reasons(op, forced, device, dtype, modalities)
        if why:
            could = [n for n in BACKENDS if not reasons(op, n, device, dtype, modalities)]
            raise BackendUnavailableError(
                f"{op.name}: the forced backend {forced!r} cannot serve this call:\n"
                + "\n".join(f"  - {r}" for r in why)
                + "\nBackends that could: "
                + (", ".join(could) or "none")
            )
        name = forced
    else:
        fused = op.prefers_fused(device, size, modalities, training, widest)
        choice = _automatic.__wrapped__ if torch.compiler.is_compiling() else _automatic
        name = choice(op, device, dtype, modalities > CUDA_MAX_MODALITIES, fused)
    if not torch.compiler.is_compiling():
        COUNTS[(op.name, name)] += 1
    return name


_CPU = torch.device("cpu")
# Op name -> whether the cpu backend can serve it (a float dtype given): the part of
# :func:`reasons` that a call cannot change, for :func:`choose_cpu_eager`; :func:`refresh`
# forgets it.
_cpu_serves: dict[str, bool] = {}


def choose_cpu_eager(op: OpDef, modalities: int, size: int, training: bool, widest: int = 0) -> str | None:
    """:func:`choose` for an eager call on CPU tensors of a float dtype, in the common case
    only: not traced, no autocast, no torch.func transform, no forced backend other than
    ``cpu`` (which must then be able to serve). ``size``: the op's size metric, an int. Returns ``cpu`` or
    ``reference``, counted as :func:`choose` counts; None where the common case does not hold
    (the caller then takes :func:`choose`, which decides and explains). The same decision as
    :func:`choose` (the same size rule, ``OpDef.prefers_fused``) at a fraction of its cost (no
    reasons are built, no cache is hashed)."""
    forced = _local.forced or _env_forced or None
    if (forced is not None and forced != "cpu") or _functorch_active():
        return None
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return None
    if forced is None and not op.prefers_fused(_CPU, size, modalities, training, widest or None):
        name = "reference"
    else:
        serves = _cpu_serves.get(op.name)
        if serves is None:
            serves = _cpu_serves[op.name] = not reasons(op, "cpu", _CPU, torch.float32)
        if not serves:
            return None
        name = "cpu"
    COUNTS[(op.name, name)] += 1
    return name


def entries_allowed() -> bool:
    """Whether a compiled eager entry (csrc/cpu/eager_entry.h) may take a call: nothing is
    traced (under torch.compile this is the constant False, so a graph never calls one) and no
    backend is forced, in any thread or by ``FUSIONOPS_BACKEND`` (an entry cannot see this
    thread's block; forced calls take the Python path)."""
    return not (torch.compiler.is_compiling() or _open_blocks or _env_forced)


def compiled_entry(op: OpDef, attr: str, backends: tuple[str, ...]) -> Callable[..., Tensor | None] | None:
    """``fusionops._C.<attr>``, ``op``'s compiled eager entry, with ``op``'s CPU size rule handed
    over and its counters of ``backends`` read by ``fusionops.dispatch_counts()``; None without
    the extension or with one built before the entry. The rule is handed over here, once (an
    OpDef is frozen); whoever replaces an op's OpDef with another rule hands that one over too
    (:func:`hand_rule_to_entry`)."""
    if not _extension.extension_loaded():
        return None
    module = importlib.import_module("fusionops._C")
    entry = getattr(module, attr, None)
    if entry is None:
        return None
    hand_rule_to_entry(op)
    for backend in backends:
        NATIVE_COUNTS[(op.name, backend)] = functools.partial(module._eager_calls, op.name, backend)
    return entry


def hand_rule_to_entry(op: OpDef) -> None:
    """Give ``op``'s CPU size rule (``OpDef.prefers_fused``'s fields) to its compiled eager
    entry, which applies its own copy (csrc/cpu/eager_entry.h); nothing without the extension."""
    if not _extension.extension_loaded():
        return
    module = importlib.import_module("fusionops._C")
    if hasattr(module, "_eager_rule"):
        module._eager_rule(
            op.name,
            op.cpu_min_modalities,
            op.cpu_min_size,
            op.cpu_min_size_forward,
            op.cpu_narrow_width,
            op.cpu_narrow_width_forward,
        )
