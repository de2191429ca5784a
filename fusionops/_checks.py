"""Argument checks shared by every op: each error names the argument, what was expected
and what was given. Nothing is broadcast silently."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

# Tensor types the one-pass accept of common eager calls serves (plain_cpu_modalities): a
# Parameter adds no dispatch of its own; other subclasses (fake tensors, tensor subclasses with
# __torch_function__) take the full checks.
PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_PLAIN_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def plain_cpu_modalities(xs: object) -> torch.dtype | None:
    """The dtype of ``xs`` when it is a non-empty list or tuple of plain CPU tensors of one
    float dtype, else None. The first step of the ops' one-pass accept of the common eager call
    (issue 15: the full checks cost more than small kernels); it never raises: whatever it does
    not accept goes through the full checks, which name what is wrong."""
    if (type(xs) is not list and type(xs) is not tuple) or not xs:
        return None
    first = xs[0]
    if type(first) not in PLAIN_TENSORS or not first.is_cpu:
        return None
    dtype = first.dtype
    if dtype not in _PLAIN_FLOATS:
        return None
    for x in xs[1:]:
        if type(x) not in PLAIN_TENSORS or x.dtype != dtype or not x.is_cpu:
            return None
    return dtype


def plain_cpu_like(t: object, dtype: torch.dtype) -> bool:
    """``t`` is a plain CPU tensor of ``dtype`` (see :func:`plain_cpu_modalities`)."""
    return type(t) in PLAIN_TENSORS and t.dtype == dtype and t.is_cpu  # type: ignore[union-attr]


def check_modalities(op: str, xs: Sequence[Tensor], name: str = "xs") -> tuple[torch.Size, list[int]]:
    """Check the modality list ``xs``; return the shared leading shape and the widths."""
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(
            f"{op}: {name} must be a list or tuple of tensors (one per modality), got {type(xs).__name__}"
        )
    if len(xs) == 0:
        raise ValueError(f"{op}: {name} is empty; expected at least one modality tensor")
    for m, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name}[{m}] must be a tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"{op}: {name}[{m}] must have shape (*, d), got a 0-d tensor")
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name}[{m}] must be a floating-point tensor, got {x.dtype}")
        if x.shape[-1] == 0:
            raise ValueError(f"{op}: {name}[{m}] has feature width 0; expected d >= 1")
    first = xs[0]
    lead = first.shape[:-1]
    for m, x in enumerate(xs[1:], start=1):
        if x.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name}[{m}] has dtype {x.dtype} but {name}[0] has {first.dtype}; "
                "all modalities must share one dtype"
            )
        if x.device != first.device:
            raise ValueError(
                f"{op}: {name}[{m}] is on {x.device} but {name}[0] is on {first.device}; "
                "all modalities must be on one device"
            )
        if x.shape[:-1] != lead:
            raise ValueError(
                f"{op}: {name}[{m}] has leading shape {tuple(x.shape[:-1])} but {name}[0] has "
                f"{tuple(lead)}; modalities must share their leading (batch) shape exactly"
            )
    return lead, [int(x.shape[-1]) for x in xs]


def check_like(op: str, name: str, t: Tensor, ref: Tensor) -> None:
    """``t`` must be a tensor with the dtype and device of ``ref`` (the modalities)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {ref.dtype} (the dtype of xs)")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {ref.device} (the device of xs)")


def check_shape(op: str, name: str, t: Tensor, expected: tuple[int, ...], why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{why}, got {tuple(t.shape)}")


def check_mask(op: str, mask: Tensor | None, lead: torch.Size, m: int, device: torch.device) -> None:
    """``mask`` marks present modalities: bool, shape ``(*, M)``, on the device of xs."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: mask must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must have dtype torch.bool, got {mask.dtype}")
    check_shape(op, "mask", mask, (*lead, m), " (the leading shape of xs, then one flag per modality)")
    if mask.device != device:
        raise ValueError(f"{op}: mask is on {mask.device}, expected {device} (the device of xs)")


def feature_count(dims: Sequence[int]) -> int:
    """K = prod(d_m + 1): the width of the tensor-fusion features."""
    k = 1
    for d in dims:  # a plain loop: torch.compile cannot trace math.prod over a generator
        k *= d + 1
    return k


def check_layer_widths(layer: str, input_dims: Sequence[int], xs: object) -> None:
    """A layer built for ``input_dims`` gets modalities of exactly those widths. A malformed
    ``xs`` (not a list of tensors of at least one dim) is left to the op's own checks, which
    name what is wrong."""
    if not isinstance(xs, (list, tuple)) or not all(isinstance(x, Tensor) and x.dim() > 0 for x in xs):
        return
    dims = tuple(int(x.shape[-1]) for x in xs)
    if dims != tuple(input_dims):
        raise ValueError(
            f"{layer}: the layer was built for input_dims {tuple(input_dims)}, "
            f"got modalities of widths {dims}"
        )


def check_rows(op: str, lead: torch.Size) -> int:
    """The registered ops (``torch.ops.fusionops.*``) take rows: modalities of shape ``(N, d)``."""
    if len(lead) != 1:
        raise ValueError(
            f"{op}: the registered op takes rows, xs[m] of shape (N, d_m); got leading shape "
            f"{tuple(lead)} (the public function fusionops.{op} flattens any leading shape)"
        )
    return int(lead[0])


def check_grad(op: str, grad: object, shape: tuple[int, ...], ref: Tensor) -> None:
    """The upstream gradient of a backward op: the output's shape, dtype and device."""
    if not isinstance(grad, Tensor):
        raise TypeError(f"{op}: grad must be a tensor, got {type(grad).__name__}")
    check_like(op, "grad", grad, ref)
    check_shape(op, "grad", grad, shape, " (the shape of the op's output)")


def values_readable(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values on the host: not while torch.compile or export
    traces, not for meta or fake tensors (no values), not for a tensor batched by vmap (one
    value per batch entry; the check would see a wrapper)."""
    return not (
        torch.compiler.is_compiling()
        or t.device.type == "meta"
        or (type(t) is not Tensor and is_fake(t))  # a fake tensor is a subclass: test that first
        or torch._C._functorch.is_batchedtensor(t)
    )
