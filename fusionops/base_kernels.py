"""Base kernels of multiple kernel fusion (DESIGN.md section 5), and how they are given.

A modality's base kernel is given as any of:

* a :class:`BaseKernel`, e.g. ``BaseKernel("rbf", gamma=0.5)`` or
  ``BaseKernel("polynomial", degree=2, offset=1.0)``;
* its kind as a string: ``"linear"``, ``"rbf"`` or ``"polynomial"`` (``"poly"``), with the
  default parameters below;
* a dict of the same fields: ``{"kind": "rbf", "gamma": 0.5}``.

Kinds and parameters:

* ``linear``: ``k(a, b) = a·b``; no parameters.
* ``rbf``: ``k(a, b) = exp(-γ ‖a - b‖²)``, ``γ > 0``; ``gamma=None`` means ``1 / d_m``
  (scikit-learn's default, ``d_m`` the modality's width).
* ``polynomial``: ``k(a, b) = (a·b + c)^p``, integer degree ``p >= 1`` (default 3) and offset
  ``c`` (default 1.0; scikit-learn's ``coef0``).

``gamma`` and ``offset`` may be floats or 0-d tensors; tensors that require grad get gradients
(the op differentiates with respect to them). ``degree`` is an int and has no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fusionops._checks import values_readable

# The kind codes the kernels take (``kinds`` in fusionops/ops/_kernels.py).
LINEAR, RBF, POLYNOMIAL = 0, 1, 2
KIND_CODES = {"linear": LINEAR, "rbf": RBF, "polynomial": POLYNOMIAL}
_ALIASES = {"poly": "polynomial", "gaussian": "rbf"}

Scalar = float | Tensor


@dataclass(frozen=True, eq=False)
class BaseKernel:
    """One modality's base kernel: ``kind`` and its parameters (see the module docstring)."""

    kind: str
    gamma: Scalar | None = None
    degree: int = 3
    offset: Scalar = 1.0

    @property
    def code(self) -> int:
        return KIND_CODES[self.kind]

    def param(self, width: int) -> Scalar:
        """The kernel's one continuous parameter: γ for RBF (``1 / width`` when not given), c
        for polynomial, 0.0 for linear."""
        if self.kind == "rbf":
            return 1.0 / width if self.gamma is None else self.gamma
        if self.kind == "polynomial":
            return self.offset
        return 0.0

    def __repr__(self) -> str:
        if self.kind == "rbf":
            return f"BaseKernel('rbf', gamma={_show(self.gamma)})"
        if self.kind == "polynomial":
            return f"BaseKernel('polynomial', degree={self.degree}, offset={_show(self.offset)})"
        return "BaseKernel('linear')"


KernelSpec = BaseKernel | str | Mapping[str, object]


def _show(value: Scalar | None) -> str:
    if isinstance(value, Tensor):
        return f"tensor({value.detach().item():g})" if value.numel() == 1 else "tensor(...)"
    return "None (1/d)" if value is None else f"{value:g}"


def _kind(op: str, name: str, kind: object) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"{op}: {name} kind must be a string, got {type(kind).__name__}")
    canonical = _ALIASES.get(kind.lower(), kind.lower())
    if canonical not in KIND_CODES:
        raise ValueError(
            f"{op}: {name} has unknown kind {kind!r}; expected one of 'linear', 'rbf', "
            "'polynomial' (or 'poly')"
        )
    return canonical


def _check_scalar(op: str, name: str, value: object, *, positive: bool) -> None:
    """A float or a one-element tensor, finite (and > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{op}: {name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{op}: {name} must be a floating 0-d tensor, got shape {tuple(value.shape)} {value.dtype}"
            )
        if not values_readable(value):  # traced, meta or vmapped: no value to check here
            return
        number = float(value.detach().item())
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{op}: {name} must be finite, got {number}")
    if positive and number <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {number:g}")


# A kind string's kernel (default parameters, all immutable), made and checked once: the op
# takes its kernels at every call, and building them cost more than a tiny call's kernel.
_FROM_STRING: dict[str, BaseKernel] = {}


def as_base_kernel(op: str, name: str, spec: KernelSpec) -> BaseKernel:
    """``spec`` (a BaseKernel, a kind string or a dict) as a checked :class:`BaseKernel`."""
    if isinstance(spec, str):
        cached = _FROM_STRING.get(spec)
        if cached is not None:
            return cached
        kernel = _FROM_STRING[spec] = as_base_kernel(op, name, BaseKernel(_kind(op, name, spec)))
        return kernel
    elif isinstance(spec, BaseKernel):
        kernel = spec
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"kind", "gamma", "degree", "offset"}
        if "kind" not in spec or unknown:
            raise ValueError(
                f"{op}: {name} must be a dict with a 'kind' and any of 'gamma', 'degree', 'offset'; "
                f"got keys {sorted(spec)}"
            )
        kernel = BaseKernel(**spec)  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"{op}: {name} must be a BaseKernel, a kind string ('linear', 'rbf', 'polynomial') or a "
            f"dict, got {type(spec).__name__}"
        )
    kind = _kind(op, name, kernel.kind)
    if kind != kernel.kind:
        kernel = BaseKernel(kind, kernel.gamma, kernel.degree, kernel.offset)
    if kind == "rbf" and kernel.gamma is not None:
        _check_scalar(op, f"{name}.gamma", kernel.gamma, positive=True)
    if kind == "polynomial":
        degree = kernel.degree
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"{op}: {name}.degree must be an int >= 1, got {degree!r}")
        _check_scalar(op, f"{name}.offset", kernel.offset, positive=False)
    return kernel


def as_base_kernels(
    op: str, kernels: Sequence[KernelSpec], modalities: int | None = None
) -> list[BaseKernel]:
    """One checked :class:`BaseKernel` per modality (``modalities`` of them when given: layers
    and estimators take one per entry of ``kernels``)."""
    if isinstance(kernels, (str, Mapping, BaseKernel)) or not isinstance(kernels, (list, tuple)):
        raise TypeError(
            f"{op}: kernels must be a list or tuple with one base kernel per modality, "
            f"got {type(kernels).__name__}"
        )
    if modalities is not None and len(kernels) != modalities:
        raise ValueError(
            f"{op}: kernels has {len(kernels)} entries but there are {modalities} modalities; "
            "expected one base kernel per modality"
        )
    return [as_base_kernel(op, f"kernels[{m}]", spec) for m, spec in enumerate(kernels)]


def kernel_params(kernels: Sequence[BaseKernel], widths: Sequence[int], like: Tensor) -> Tensor:
    """The ``(M,)`` parameter vector the fused kernels take (γ or c per modality), float32
    (float64 for float64 ``like``) on ``like``'s device. Tensor parameters stay in the autograd
    graph, so their gradients flow back through it."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    values = [k.param(d) for k, d in zip(kernels, widths, strict=True)]
    if not any(isinstance(v, Tensor) for v in values):
        return torch.tensor(values, dtype=dtype, device=like.device)
    return torch.stack(
        [
            v.reshape(()).to(device=like.device, dtype=dtype)
            if isinstance(v, Tensor)
            else torch.tensor(v, dtype=dtype, device=like.device)
            for v in values
        ]
    )
