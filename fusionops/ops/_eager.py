"""The eager path of the fused ops: a lean ``torch.autograd.Function`` per call.

Each fused op is a ``torch.library.custom_op`` (what ``torch.compile``, ``torch.export`` and
``torch.ops.fusionops`` see) with its backward as a second custom op. Called eagerly, that
path costs about 0.1 ms per forward and 0.5 ms per forward + backward before any kernel runs
(torch.library's Python autograd wrapper, pytree flattening, two custom-op dispatches), which
is more than the kernels themselves at research batch sizes. Eager calls therefore go through
:func:`apply` instead: the same kernels and the same gradient rule, called directly. (Tensor
fusion's projection and product fusion on the cpu and cuda backends go one step further: their
eager ops ``fusionops::_tf_projected_eager`` and ``fusionops::_product_eager`` have their
autograd in C++, both in csrc/cpu/eager_autograd.cpp, with the same
second-order rule; the triton backend and the other ops use this module. Their most common
calls do not even reach Python past the public function: csrc/cpu/eager_entry.h.)

An op describes one call with an :class:`EagerCall`: the flat list of its tensor arguments
(``None`` for absent optional ones) and two methods, ``forward(flat)`` and
``backward(grad, flat, needs)`` (``needs``: one flag per flat argument; returns one gradient
or None per flat argument; ``flat`` there is what ``saved(flat)`` kept). Autograd saves
inputs only, never an intermediate.

Second order (``create_graph=True``): the kernels' backward is not itself differentiable. An
op whose call defines ``reference_grads`` gets its first-order gradients from the reference
recomputed on the saved inputs, by PyTorch's autograd with ``create_graph``, so they can be
differentiated again (this recomputation materialises what the reference materialises, e.g.
tensor fusion's Z). The other ops raise :class:`DoubleBackwardError` at that first backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


class DoubleBackwardError(RuntimeError):
    """A backward with ``create_graph=True`` through an op whose fused kernels have no
    differentiable backward."""


def no_double_backward(op: str) -> DoubleBackwardError:
    return DoubleBackwardError(
        f"fusionops.{op}: double backward (a backward with create_graph=True) is not supported "
        f"by its fused kernels; run it on the reference for second-order gradients "
        f"(with fusionops.backend('reference'): ...)"
    )


def grads_through(
    reference: Callable[[], Tensor],
    grad: Tensor,
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The gradients of ``reference()`` (the op's reference, recomputed on the saved inputs)
    for the ``inputs`` that need one, as a graph that can be differentiated again."""
    wanted = [t for t, n in zip(inputs, needs, strict=True) if n and t is not None]
    with torch.enable_grad():
        out = reference()
    found = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return [next(found) if n and t is not None else None for t, n in zip(inputs, needs, strict=True)]


class EagerCall:
    """One eager call of a fused op (subclassed per op)."""

    __slots__ = ("kernels",)
    op: str = ""  # the public op's name, for messages

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

    def reference_grads(
        self, grad: Tensor, flat: tuple[Tensor | None, ...], needs: tuple[bool, ...]
    ) -> tuple[Tensor | None, ...]:
        """``backward`` as a differentiable graph (through the reference), for second order;
        ops whose reference is not wired here refuse."""
        raise no_double_backward(self.op)


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: EagerCall, *flat: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.call = call
        ctx.save_for_backward(*call.saved(flat))
        return call.forward(flat)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            return (None, *ctx.call.reference_grads(grad, ctx.saved_tensors, ctx.needs_input_grad[1:]))
        return (None, *ctx.call.backward(grad, ctx.saved_tensors, ctx.needs_input_grad[1:]))


# torch.autograd.Function.apply binds default arguments and unwraps functorch's dead wrappers
# (about 5 µs) before the C++ apply; neither applies here (a call inside a torch.func transform
# never reaches the fused kernels: fusionops._backend.choose), so the C++ apply is called
# directly.
_c_apply = super(torch.autograd.Function, _Function).apply


def traced(first: Tensor) -> bool:
    """Whether a call goes through the custom ops rather than :func:`apply`: while
    torch.compile or torch.export traces, and for fake tensors (FakeTensorMode, e.g. shape
    propagation on fake CUDA tensors without a GPU), where only the ops' fake kernels can run.
    (The type test first: a plain tensor is never fake, and it costs nothing.)"""
    return torch.compiler.is_compiling() or (type(first) is not Tensor and is_fake(first))


def apply(call: EagerCall, flat: tuple[Tensor | None, ...]) -> Tensor:
    """Run ``call`` eagerly: through autograd when a gradient can flow, else straight."""
    if torch.is_grad_enabled():
        for t in flat:
            if t is not None and t.requires_grad:
                return _c_apply(call, *flat)
    return call.forward(flat)
