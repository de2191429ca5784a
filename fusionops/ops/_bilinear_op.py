"""One bilinear pooling op (MFB, MFH, BLOCK; DESIGN.md section 6) as the registered custom ops,
their fake kernels and autograd, and the call that picks a backend.

The three ops share their kernels (``_bilinear.BilinearKernels``) and differ in their parameters'
names and layouts, their configuration arguments (MFB/MFH: ``factor``, ``activation``,
``normalize``; BLOCK: ``rank``, ``normalize``), their checks and how the configuration maps onto
the kernels' arguments. A :class:`BilinearOp` holds those differences; :meth:`BilinearOp.define`
registers ``fusionops::<op>(x, t, <six parameters>, <configuration>, str backend) -> Tensor`` and
``fusionops::<op>_backward(grad, x, t, <five parameters>, <configuration>, bool[] needs, str
backend) -> Tensor[]`` from it, and :meth:`BilinearOp.call` is the eager/traced dispatch every
public function ends with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusionops import _backend
from fusionops._backend import entry_kernels
from fusionops._checks import check_grad, check_rows
from fusionops.ops import _autocast, _bilinear, _eager
from fusionops.ops._bilinear import BilinearCall, BilinearKernels
from fusionops.ops._dropout import check_dropout, check_seed, draw_seed
from fusionops.registry import OpDef, needs_grad


def _same(config: tuple) -> tuple:
    return config


def check_dropouts(op: str, probs: dict[str, object], seed: object) -> tuple[float, ...]:
    """Each dropout probability in [0, 1), and the seed None or in [0, 2**31); returns the
    probabilities as floats."""
    ps = tuple(check_dropout(op, name, p) for name, p in probs.items())
    check_seed(op, seed)
    return ps


def seed_for(ps: tuple[float, ...], seed: int | None) -> int:
    """The seed of a call: the given one, else drawn from torch's generator when a dropout is
    active (torch.manual_seed makes it reproducible), else 0 (unused)."""
    if seed is not None:
        return seed
    return draw_seed() if any(p > 0 for p in ps) else 0


@dataclass(frozen=True)
class BilinearOp:
    """What makes one op of the family.

    ``params``: the names of its six parameters ``(wx, bx, wt, bt, wo, bo)`` as the op calls
    them. ``config``: its configuration arguments after them, ``(name, schema type)``.
    ``check(x, t, *params, *config) -> (lead, size, out)``: every argument checked (errors name
    the argument, the expected and the given), the leading shape, the size metric of the
    registry's rule and the output width. ``kernel_args(*config) -> (rank, rank_major,
    activation code, normalize code)``. ``reference(x, t, *params, *config)``. ``chunked``: its
    weights are already ``(C, R·S, d)`` (else MFB's 2-d ones get a chunk dim); ``chain``: MFH's
    chained products. ``dropouts``: the names of its dropout probabilities: a configuration ends
    with them and the seed (in the custom ops' schemas they follow ``backend``, with defaults: no
    dropout), and ``drops(*config) -> (drop_in, drop_prod, drop_out, seed)`` maps them onto the
    kernels' sites. ``to_op(config)`` / ``from_op(config)``: the configuration as the custom op's
    schema holds it (MFB's activation None is ``"none"`` there) and back."""

    opdef: OpDef
    params: tuple[str, str, str, str, str, str]
    config: tuple[tuple[str, str], ...]
    dropouts: tuple[str, ...]
    check: Callable[..., tuple[torch.Size, int, int]]
    kernel_args: Callable[..., tuple[int, bool, int, int]]
    drops: Callable[..., tuple[float, float, float, int]]
    reference: Callable[..., Tensor]
    chunked: bool
    chain: bool = False
    to_op: Callable[[tuple], tuple] = _same
    from_op: Callable[[tuple], tuple] = _same
    _ops: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.opdef.name

    def _reference_of(self, config: tuple) -> Callable[..., Tensor]:
        return lambda x, t, *params: self.reference(x, t, *params, *config)

    def _entry(self, flat: tuple, config: tuple, backend: str, grad: Tensor | None = None) -> BilinearKernels:
        """A registered op's checks (its arguments are rows; ``grad``: the backward op's upstream
        gradient), then the kernels of ``backend``."""
        x = flat[0]
        lead, _, out = self.check(*flat, *config)
        n = check_rows(self.name, lead)
        if grad is not None:
            check_grad(self.name, grad, (n, out), x)
        return entry_kernels(self.opdef, backend, x.device, x.dtype, 2)

    def _dropout_args(self, given: tuple, kwargs: dict) -> tuple:
        """The dropouts and the seed of a custom-op call: those given (positionally after
        ``backend``, or by name), their defaults (no dropout) for the rest."""
        names = (*self.dropouts, "seed")
        values = [*given, *((0.0,) * len(self.dropouts) + (0,))[len(given) :]]
        for name, v in kwargs.items():
            values[names.index(name)] = v
        return tuple(values)

    def _eager_call(self, kernels: BilinearKernels, config: tuple) -> BilinearCall:
        return BilinearCall(
            kernels, self.name, *self.kernel_args(*config), self.chunked, self._reference_of(config),
            chain=self.chain, drops=self.drops(*config),
        )  # fmt: skip

    def define(self) -> None:
        """Register the forward and backward custom ops, their fake kernels and autograd."""
        wx, bx, wt, bt, wo, bo = self.params
        tensors = f"Tensor x, Tensor t, Tensor {wx}, Tensor? {bx}, Tensor {wt}, Tensor? {bt}, Tensor {wo}"
        config = ", ".join(f"{ty} {name}" for name, ty in self.config)
        drops = ", ".join([*(f"float {name}=0." for name in self.dropouts), "int seed=0"])
        n = len(self.config)
        n_rest = n + 1 + len(self.dropouts) + 1  # every argument after the tensors' gradients

        def forward(*args, **kwargs):
            # args: the 8 tensors, the configuration, backend, the dropouts and the seed
            flat, backend = args[:8], args[8 + n]
            config = self.from_op((*args[8 : 8 + n], *self._dropout_args(args[9 + n :], kwargs)))
            kernels = self._entry(flat, config, backend)
            return self._eager_call(kernels, config).forward(flat)

        def forward_fake(*args, **kwargs):
            return args[0].new_empty(args[0].shape[0], args[6].shape[0])

        def backward(grad, *args, **kwargs):
            # args: the 7 tensors, the configuration, needs, backend, the dropouts and the seed
            flat, needs, backend = (*args[:7], None), args[7 + n], args[8 + n]
            config = self.from_op((*args[7 : 7 + n], *self._dropout_args(args[9 + n :], kwargs)))
            kernels = self._entry(flat, config, backend, grad)
            grads = self._eager_call(kernels, config).backward(grad, flat, needs)
            return [_bilinear.empty_grad(flat[6]) if g is None else g for g in grads]  # no aliased returns

        def backward_fake(grad, *args, **kwargs):
            flat, needs = (*args[:7], None), list(args[7 + n])
            needs[3] = needs[3] and flat[3] is not None
            needs[5] = needs[5] and flat[5] is not None
            return _bilinear.fake_grads(flat, needs)

        def setup(ctx, inputs, output) -> None:
            ctx.op_config = (*inputs[8 : 8 + n], *self._dropout_args(inputs[9 + n :], {}))
            ctx.backend = inputs[8 + n]
            ctx.has = [p is not None for p in inputs[:8]]
            # The inputs only: the kernels recompute the projections in backward.
            ctx.save_for_backward(*inputs[:7])

        def grad_of(ctx, grad: Tensor):
            flat = (*ctx.saved_tensors, None)
            needs = [bool(n) and h for n, h in zip(ctx.needs_input_grad[:8], ctx.has, strict=True)]
            rest = (None,) * n_rest
            if torch.is_grad_enabled():  # create_graph=True: through the reference
                ref = self._reference_of(self.from_op(ctx.op_config))
                grads = _eager.grads_through(lambda: ref(*flat[:7], None), grad, list(flat[:7]), needs[:7])
                return (*grads, grad.sum(0) if needs[7] else None, *rest)
            core, dropouts = ctx.op_config[:n], ctx.op_config[n:]
            grads = self._ops["backward"](grad, *flat[:7], *core, needs, ctx.backend, *dropouts)
            return (*(g if n else None for g, n in zip(grads, needs, strict=True)), *rest)

        fwd = torch.library.custom_op(
            f"fusionops::{self.name}", forward, mutates_args=(),
            schema=f"({tensors}, Tensor? {bo}, {config}, str backend, {drops}) -> Tensor",
        )  # fmt: skip
        fwd.register_fake(forward_fake)
        bwd = torch.library.custom_op(
            f"fusionops::{self.name}_backward", backward, mutates_args=(),
            schema=f"(Tensor grad, {tensors}, {config}, bool[] needs, str backend, {drops}) -> Tensor[]",
        )  # fmt: skip
        bwd.register_fake(backward_fake)
        fwd.register_autograd(grad_of, setup_context=setup)
        self._ops["forward"], self._ops["backward"] = fwd, bwd
        for name in (self.name, f"{self.name}_backward"):
            _autocast.register(name, self.opdef.autocast)

    def call(
        self, x: Tensor, t: Tensor, params: tuple, config: tuple, lead: torch.Size, size: int, out: int
    ) -> Tensor:
        """A checked call (``config`` as the public function takes it): the backend the
        registry's rule picks, then the reference, the custom op (traced: what compiled graphs,
        exports and fake tensors take) or the lean eager call."""
        backend = _backend.choose(self.opdef, x.device, x.dtype, 2, size, needs_grad(x, t, *params))
        if backend == "reference":
            return self.reference(x, t, *params, *config)
        n = math.prod(lead)
        x2, t2 = x.reshape(n, x.shape[-1]), t.reshape(n, t.shape[-1])
        if _eager.traced(x2):
            op_config, n = self.to_op(config), len(self.config)
            y = getattr(torch.ops.fusionops, self.name)(
                x2, t2, *params, *op_config[:n], backend, *op_config[n:]
            )
        else:
            y = _eager.apply(self._eager_call(self.opdef.kernels_for(backend), config), (x2, t2, *params))
        return y.reshape(*lead, out)
