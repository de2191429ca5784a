"""The op registry: what each fused op is, declared once.

Every op module (``fusionops/ops/<op>.py``) registers one :class:`OpDef`: its name, its
reference, the compiled kernels (schemas in ``csrc/ops.cpp``) and the Triton module that serve
it, its automatic CPU size rule and how it behaves under autocast. Backend choice
(``fusionops._backend``), ``python -m fusionops.info``, the test suite's backend
parametrisation and skip reasons (``tests/conftest.py``) and the benchmarks' specs all read
:data:`OPS`; nothing else lists the ops.

Adding an op: write its reference (``fusionops/reference/``), its kernels (``csrc/cpu/``,
``csrc/cuda/``, ``fusionops/triton/``, schemas in ``csrc/ops.cpp``), its module in
``fusionops/ops/`` with checks, the custom op and one ``register(OpDef(...))``, then its tests
and its benchmark spec (README, "Contributing").
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

# The most modalities one launch of the CUDA C++ kernels takes (kMaxModalities in
# csrc/cuda/kernels/common.h).
CUDA_MAX_MODALITIES = 8


@dataclass(frozen=True)
class OpDef:
    """One fused op.

    ``compiled`` is the op's wrapper over the kernels of ``fusionops._C`` (one schema per
    kernel, implemented under the CPU key and, in CUDA builds, the CUDA key: the dispatcher
    picks by device, so the ``cpu`` and ``cuda`` backends share it); ``kernels`` are those
    schemas' names (checked for presence: an extension built from older sources lacks them).

    The automatic choice on CPU sends a call to the reference when its size (``size_metric``,
    computed by the op) is below the op's threshold or it has fewer than ``cpu_min_modalities``
    modalities: measured faster there by ``python -m benchmarks.crossover``. The threshold is
    ``cpu_min_size`` for calls that record a gradient (forward + backward) and
    ``cpu_min_size_forward`` for the others (inference: only the forward kernels compete).
    ``cpu_narrow_width`` / ``cpu_narrow_width_forward`` (0: none) exempt calls whose modalities
    are all at most that wide from the threshold: where narrow modalities won at every measured
    size while wider ones lost below it, so that one size threshold cannot say both.

    ``autocast``: under ``torch.autocast`` a ``"lower"`` op runs in the autocast dtype, as
    ``nn.Linear`` does (GEMM-like ops); a ``"keep"`` op runs in its inputs' dtype, as ATen's
    elementwise and distance ops do. Either way the output dtype does not depend on the
    backend or the size.
    """

    name: str
    reference: Callable[..., Any]
    compiled: object
    kernels: tuple[str, ...]
    triton_module: str
    size_metric: str
    cpu_min_size: int = 0
    cpu_min_size_forward: int = 0
    cpu_min_modalities: int = 1
    cpu_narrow_width: int = 0
    cpu_narrow_width_forward: int = 0
    cuda_kernels: bool = False
    autocast: Literal["lower", "keep"] = "keep"
    # Why the CPU size rule is what it is, for fusionops.info (an op whose thresholds were not
    # set from a crossover sweep says so here).
    rule_basis: str = "measured faster there"

    def kernels_for(self, backend: str) -> Any:
        """The kernels serving ``backend`` (``cpu``, ``cuda`` or ``triton``)."""
        if backend in ("cpu", "cuda"):
            return self.compiled
        if backend == "triton":
            return importlib.import_module(f"fusionops.triton.{self.triton_module}")
        raise ValueError(
            f"{self.name}: backend {backend!r} has no fused kernels (the reference is served by "
            "fusionops.reference; expected 'cpu', 'cuda' or 'triton')"
        )

    def prefers_fused(
        self, device: torch.device, size: object, modalities: int, training: bool, widest: object = None
    ) -> bool:
        """The size rule: whether the automatic choice offers the fused kernels this call
        (``widest``: the widest modality's width, for the narrow-width rule; None: not used).

        A symbolic size (torch.export with a dynamic dim, ``torch.compile(dynamic=True)``)
        takes the fused kernels: comparing it would add a guard that a dynamic dim cannot
        satisfy, and in a compiled graph the eager fixed cost that the rule avoids is gone.
        """
        if device.type != "cpu":
            return True
        if modalities < self.cpu_min_modalities:
            return False
        narrow = self.cpu_narrow_width if training else self.cpu_narrow_width_forward
        if narrow and isinstance(widest, int) and widest <= narrow:
            return True
        threshold = self.cpu_min_size if training else self.cpu_min_size_forward
        return not isinstance(size, int) or size >= threshold

    def size_rule(self) -> str:
        """The CPU size rule in words, for ``fusionops.info``."""
        lines = []
        for mode, threshold, narrow in (
            ("with gradients", self.cpu_min_size, self.cpu_narrow_width),
            ("inference", self.cpu_min_size_forward, self.cpu_narrow_width_forward),
        ):
            parts = [f"{self.size_metric} < {threshold}"] if threshold > 0 else []
            if parts and narrow:
                parts[0] += f" (unless every modality is at most {narrow} wide)"
            if self.cpu_min_modalities > 1:
                parts.append(f"fewer than {self.cpu_min_modalities} modalities")
            if parts:
                lines.append(f"{mode}: calls with " + " or ".join(parts) + " go to the reference")
            else:
                lines.append(f"{mode}: every call goes to the fused kernels")
        return "; ".join(lines) + f" ({self.rule_basis})"


def needs_grad(*tensors: object) -> bool:
    """Whether a call records a gradient: grad mode on and some tensor (or list of tensors)
    requiring one. Selects the training or inference size rule."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if t.requires_grad:
                return True
        elif isinstance(t, (list, tuple)):
            for u in t:
                if isinstance(u, torch.Tensor) and u.requires_grad:
                    return True
    return False


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is registered twice")
    OPS[op.name] = op
    for key in DISPATCH_KEYS:
        has_compiled_kernels(op.kernels, key)
    return op


def get(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; registered ops: {', '.join(OPS)}") from None


# (kernels, dispatch key) -> whether fusionops._C implements them all. Filled when an op
# registers (and again by fusionops._backend.refresh), so that code traced by torch.compile
# only reads a dict: the dispatcher lookup itself cannot be traced.
_PRESENT: dict[tuple[tuple[str, ...], str], bool] = {}
DISPATCH_KEYS = ("CPU", "CUDA")


def has_compiled_kernels(kernels: tuple[str, ...], dispatch_key: str) -> bool:
    """Whether ``fusionops._C`` implements every schema of ``kernels`` for ``dispatch_key``."""
    found = _PRESENT.get((kernels, dispatch_key))
    if found is None:
        found = _PRESENT[(kernels, dispatch_key)] = _lookup(kernels, dispatch_key)
    return found


def _lookup(kernels: tuple[str, ...], dispatch_key: str) -> bool:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    try:
        return all(has(f"fusionops::{k}", dispatch_key) for k in kernels)
    except RuntimeError:  # a schema the loaded extension does not declare
        return False


def forget_compiled_kernels() -> None:
    """Look the kernels of every registered op up again (after the extension changed)."""
    _PRESENT.clear()
    for op in OPS.values():
        for key in DISPATCH_KEYS:
            has_compiled_kernels(op.kernels, key)


# Which backend served each eager call: (op, backend) -> calls. Read by
# fusionops.dispatch_counts(); compiled graphs are counted once, when traced.
COUNTS: Counter[tuple[str, str]] = Counter()
# Counters kept in compiled code, added to COUNTS when read: (op, backend) -> read(reset), which
# returns the calls counted so far and zeroes them when reset is true (the compiled eager
# entries, csrc/cpu/eager_entry.h, count the calls they serve: a Python counter would cost a
# 2 µs product 5%).
NATIVE_COUNTS: dict[tuple[str, str], Callable[[bool], int]] = {}


def dispatch_counts() -> dict[str, dict[str, int]]:
    """Calls per op and backend since the process started (or :func:`reset_dispatch_counts`).

    Eager calls are counted each time; a ``torch.compile``d region is counted when it is
    traced, not per run.
    """
    counts = COUNTS.copy()
    for key, read in NATIVE_COUNTS.items():
        counts[key] += read(False)
    out: dict[str, dict[str, int]] = {}
    for (name, backend), n in sorted(counts.items()):
        if n:
            out.setdefault(name, {})[backend] = n
    return out


def reset_dispatch_counts() -> None:
    COUNTS.clear()
    for read in NATIVE_COUNTS.values():
        read(True)
