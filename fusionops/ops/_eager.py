"""The eager path of the fused ops: a lean ``torch.autograd.Function`` per call.

Each fused op is a ``torch.library.custom_op`` (what ``torch.compile``, ``torch.export`` and
``torch.ops.fusionops`` see) with its backward as a second custom op. Called eagerly, that
path costs about 0.1 ms per forward and 0.5 ms per forward + backward before any kernel runs
(torch.library's Python autograd wrapper, pytree flattening, two custom-op dispatches), which
is more than the kernels themselves at research batch sizes. Eager calls therefore go through
:func:`apply` instead: the same kernels and the same gradient rule, called directly.

An op describes one call with an :class:`EagerCall`: the flat list of its tensor arguments
(``None`` for absent optional ones) and two methods, ``forward(flat)`` and
``backward(grad, flat, needs)`` (``needs``: one flag per flat argument; returns one gradient
or None per flat argument; ``flat`` there is what ``saved(flat)`` kept). Autograd saves
inputs only, never an intermediate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EagerCall:
    """One eager call of a fused op (subclassed per op)."""

    __slots__ = ("kernels",)

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels

    def forward(self, flat: tuple[Tensor | None, ...]) -> Tensor:
        raise NotImplementedError

    def saved(self, flat: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        """What autograd keeps for ``backward`` (default: every input; ops drop what their
        gradient rule never reads, e.g. the bias, by putting None in its place)."""
        return flat

    def backward(
        self, grad: Tensor, flat: tuple[Tensor | None, ...], needs: tuple[bool, ...]
    ) -> tuple[Tensor | None, ...]:
        raise NotImplementedError


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: EagerCall, *flat: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.call = call
        ctx.save_for_backward(*call.saved(flat))
        return call.forward(flat)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *ctx.call.backward(grad, ctx.saved_tensors, ctx.needs_input_grad[1:]))


# torch.autograd.Function.apply binds default arguments and unwraps functorch's dead wrappers
# (about 5 µs) before the C++ apply; neither applies here unless a functorch transform is
# active, so the C++ apply is called directly otherwise.
_c_apply = super(torch.autograd.Function, _Function).apply
_functorch_active = torch._C._are_functorch_transforms_active


def apply(call: EagerCall, flat: tuple[Tensor | None, ...]) -> Tensor:
    """Run ``call`` eagerly: through autograd when a gradient can flow, else straight."""
    if torch.is_grad_enabled():
        for t in flat:
            if t is not None and t.requires_grad:
                if _functorch_active():
                    return _Function.apply(call, *flat)
                return _c_apply(call, *flat)
    return call.forward(flat)
