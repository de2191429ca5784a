"""MFH op (Yu et al. 2018, multimodal factorized high-order pooling; DESIGN.md section 6):
checks, backend choice, autograd, fake kernels.

``fusionops::mfh(x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor,
activation, normalize, backend) -> y`` and its backward op carry the fused implementations: the
bilinear family's kernels (``fusionops/ops/_bilinear.py``) in their ``chain`` mode, each of the
p blocks one chunk reading the whole of ``x`` and ``t``. The ``reference`` backend is served by
``fusionops.reference`` directly, with PyTorch's own autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusionops import _backend, reference
from fusionops._backend import entry_kernels
from fusionops._checks import check_grad, check_rows
from fusionops.ops import _autocast, _bilinear, _eager
from fusionops.ops._bilinear import BilinearCall, BilinearKernels
from fusionops.ops.mfb import _activation
from fusionops.registry import OpDef, needs_grad, register

OP = "mfh"

# Automatic choice on CPU, on N·p·k·o: the fused kernels everywhere, for their memory, as MFB
# (whose blocks these are; see fusionops/ops/mfb.py: the backward recomputes the projections,
# so fwd+bwd is not faster than the reference). Measured for MFH in benchmarks/results/
# mfh_cpu_*.csv.
CPU_FUSED_MIN_ELEMENTS = 0
CPU_FUSED_MIN_ELEMENTS_FORWARD = 0

OPDEF = register(
    OpDef(
        name=OP,
        reference=reference.mfh,
        compiled=_bilinear.CompiledKernels(),
        kernels=("_bilinear_fwd", "_bilinear_bwd"),
        triton_module="bilinear",
        size_metric="N*p*k*o",
        cpu_min_size=CPU_FUSED_MIN_ELEMENTS,
        cpu_min_size_forward=CPU_FUSED_MIN_ELEMENTS_FORWARD,
        autocast="lower",
        rule_basis="fused for its memory, as MFB (not from a crossover sweep of its own)",
    )
)


def _reference_of(factor: int, activation: str | None, normalize: bool):
    def ref(x, t, uw, ub, vw, vb, ow, ob):
        return reference.mfh(x, t, uw, ub, vw, vb, ow, ob, factor, activation, normalize)

    return ref


def _call_args(factor: int, activation: str | None, normalize: bool) -> tuple[int, bool, int, int]:
    """(rank, rank_major, activation code, normalize code) of the shared kernels: each block
    is normalised on its own (block.bootstrap normalises z_0 and z_1 before the cat)."""
    norm = _bilinear.NORM_PER_CHUNK if normalize else _bilinear.NORM_NONE
    return factor, False, _bilinear.ACTIVATION_CODES[activation], norm


@torch.library.custom_op("fusionops::mfh", mutates_args=())
def _fused(
    x: Tensor,
    t: Tensor,
    u_weight: Tensor,
    u_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    factor: int,
    activation: str,
    normalize: bool,
    backend: str,
) -> Tensor:
    flat = (x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias)
    kernels = _entry(*flat, factor, activation, normalize, backend)
    args = _call_args(factor, _activation(activation), normalize)
    return _bilinear.run_forward(kernels, flat, *args, chunked=True, chain=True)


@_fused.register_fake
def _fused_fake(x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor, activation,
                normalize, backend) -> Tensor:  # fmt: skip
    return x.new_empty(x.shape[0], out_weight.shape[0])


@torch.library.custom_op("fusionops::mfh_backward", mutates_args=())
def _fused_backward(
    grad: Tensor,
    x: Tensor,
    t: Tensor,
    u_weight: Tensor,
    u_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    out_weight: Tensor,
    factor: int,
    activation: str,
    normalize: bool,
    needs: list[bool],
    backend: str,
) -> list[Tensor]:
    flat = (x, t, u_weight, u_bias, v_weight, v_bias, out_weight, None)
    kernels = _entry(*flat, factor, activation, normalize, backend, grad)
    args = _call_args(factor, _activation(activation), normalize)
    grads = _bilinear.run_backward(kernels, grad, flat, needs, *args, chunked=True, chain=True)
    return [_bilinear.empty_grad(out_weight) if g is None else g for g in grads]  # no aliased returns


@_fused_backward.register_fake
def _fused_backward_fake(grad, x, t, u_weight, u_bias, v_weight, v_bias, out_weight, factor, activation,
                         normalize, needs, backend) -> list[Tensor]:  # fmt: skip
    needs = list(needs)
    needs[3] = needs[3] and u_bias is not None
    needs[5] = needs[5] and v_bias is not None
    return _bilinear.fake_grads((x, t, u_weight, u_bias, v_weight, v_bias, out_weight, None), needs)


def _setup(ctx, inputs, output) -> None:
    *flat, factor, activation, normalize, backend = inputs
    ctx.args = (factor, activation, normalize, backend)
    ctx.has = [p is not None for p in flat]
    # The inputs only: the kernels recompute the projections in backward.
    ctx.save_for_backward(*flat[:7])


def _grad(ctx, grad: Tensor):
    flat = (*ctx.saved_tensors, None)
    factor, activation, normalize, backend = ctx.args
    needs = [bool(n) and h for n, h in zip(ctx.needs_input_grad[:8], ctx.has, strict=True)]
    if torch.is_grad_enabled():  # create_graph=True: through the reference
        ref = _reference_of(factor, _activation(activation), normalize)
        grads = _eager.grads_through(lambda: ref(*flat[:7], None), grad, list(flat[:7]), needs[:7])
        return (*grads, grad.sum(0) if needs[7] else None, None, None, None, None)
    grads = torch.ops.fusionops.mfh_backward(grad, *flat[:7], factor, activation, normalize, needs, backend)
    return (*(g if n else None for g, n in zip(grads, needs, strict=True)), None, None, None, None)


_fused.register_autograd(_grad, setup_context=_setup)
for _name in ("mfh", "mfh_backward"):
    _autocast.register(_name, OPDEF.autocast)


def _check_args(
    x: Tensor,
    t: Tensor,
    u_weight: Tensor,
    u_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    factor: int,
    activation: str | None,
    normalize: bool,
) -> tuple[torch.Size, int, int, int]:
    """Every argument of a call; returns the leading shape, p (blocks), o (pooled width) and O."""
    lead = _bilinear.check_pair(OP, x, t)
    _bilinear.check_positive_int(OP, "factor", factor, "k, the number of factors pooled per output")
    _bilinear.check_activation(OP, activation)
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(u_weight, Tensor) or u_weight.dim() != 3:
        given = tuple(u_weight.shape) if isinstance(u_weight, Tensor) else type(u_weight).__name__
        raise ValueError(
            f"{OP}: u_weight must be a 3-d tensor (p, k·o, d_x): the p blocks' nn.Linear(d_x, k·o) "
            f"weights stacked, got {given}"
        )
    blocks, ko = int(u_weight.shape[0]), int(u_weight.shape[1])
    if blocks < 1:
        raise ValueError(f"{OP}: u_weight holds no block (p = u_weight.shape[0] = 0); expected p >= 1")
    if ko % factor != 0:
        raise ValueError(
            f"{OP}: factor {factor} must divide u_weight.shape[1] = {ko} (k·o, k = factor); "
            f"got a remainder of {ko % factor}"
        )
    o = ko // factor
    why = f" (p, k·o, d) with p = {blocks} blocks, k·o = {ko}"
    _bilinear.check_param(OP, "u_weight", u_weight, (blocks, ko, x.shape[-1]), x, why + ", d = d_x")
    _bilinear.check_param(OP, "v_weight", v_weight, (blocks, ko, t.shape[-1]), x, why + ", d = d_t")
    if u_bias is not None:
        _bilinear.check_param(OP, "u_bias", u_bias, (blocks, ko), x, " (p, k·o)")
    if v_bias is not None:
        _bilinear.check_param(OP, "v_bias", v_bias, (blocks, ko), x, " (p, k·o)")
    if not isinstance(out_weight, Tensor) or out_weight.dim() != 2:
        raise ValueError(f"{OP}: out_weight must be a 2-d tensor (O, p·o) as nn.Linear stores it")
    out = int(out_weight.shape[0])
    _bilinear.check_param(
        OP,
        "out_weight",
        out_weight,
        (out, blocks * o),
        x,
        f" (O, p·o = {blocks}·{o}: the blocks' pooled outputs)",
    )
    if out_bias is not None:
        _bilinear.check_param(OP, "out_bias", out_bias, (out,), x, " (O, the rows of out_weight)")
    return lead, blocks, o, out


def _entry(x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor, activation, normalize,
           backend, grad: Tensor | None = None) -> BilinearKernels:  # fmt: skip
    """A registered op's checks (its arguments are rows; ``grad``: the backward op's upstream
    gradient), then the kernels of ``backend``."""
    lead, _, _, out = _check_args(
        x,
        t,
        u_weight,
        u_bias,
        v_weight,
        v_bias,
        out_weight,
        out_bias,
        factor,
        _activation(activation),
        normalize,
    )
    n = check_rows(OP, lead)
    if grad is not None:
        check_grad(OP, grad, (n, out), x)
    return entry_kernels(OPDEF, backend, x.device, x.dtype, 2)


def mfh(
    x: Tensor,
    t: Tensor,
    u_weight: Tensor,
    u_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None = None,
    *,
    factor: int,
    activation: str | None = "relu",
    normalize: bool = False,
) -> Tensor:
    """Multimodal factorized high-order pooling (Yu et al. 2018; DESIGN.md section 6).

    ``p`` MFB blocks, chained: ``e_i = act(x U_iᵀ + b_u_i) ⊙ act(t V_iᵀ + b_v_i) ⊙ e_{i−1}``
    (``e_{−1} = 1``), ``z_i = SumPool_k(e_i)`` (``z_j = Σ_{l<k} e_{j·k+l}``), optional ``n(z_i)``
    per block (signed square root, then L2), ``y = cat(z_0 … z_{p−1}) W_oᵀ + b_o``.

    Args:
        x, t: ``(*, d_x)`` and ``(*, d_t)``, one leading shape, dtype and device.
        u_weight, v_weight: ``(p, k·o, d_x)``, ``(p, k·o, d_t)``: block i's ``nn.Linear``
            weights (block.bootstrap's ``linear0_i``, ``linear1_i``) at index i.
        u_bias, v_bias: ``(p, k·o)`` or None.
        out_weight: ``(O, p·o)``; out_bias: ``(O,)`` or None (``linear_out``).
        factor: k >= 1, dividing ``k·o``.
        activation: ``"relu"`` (block.bootstrap's default), ``"tanh"`` or None.
        normalize: apply ``n`` to each block's pooled ``z_i``.

    Returns:
        ``(*, O)``. The fused kernels never hold the blocks' ``(*, k·o)`` projections or their
        chained products for all rows: they work on tiles of rows and recompute them in backward.
    """
    lead, blocks, o, out = _check_args(
        x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor, activation, normalize
    )
    activation = _activation(activation)  # type: ignore[arg-type]
    if _autocast.enabled(x.device):
        return _autocast.call_without_autocast(
            OPDEF.autocast, x.device, mfh, x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias,
            factor=factor, activation=activation, normalize=normalize,
        )  # fmt: skip
    n = math.prod(lead)
    params = (u_weight, u_bias, v_weight, v_bias, out_weight, out_bias)
    size = n * blocks * factor * o
    backend = _backend.choose(OPDEF, x.device, x.dtype, 2, size, needs_grad(x, t, *params))
    if backend == "reference":
        return reference.mfh(x, t, *params, factor, activation, normalize)
    x2, t2 = x.reshape(n, x.shape[-1]), t.reshape(n, t.shape[-1])
    if _eager.traced(x2):  # the custom op: what compiled graphs, exports and fake tensors take
        y = torch.ops.fusionops.mfh(x2, t2, *params, factor, activation or "none", normalize, backend)
    else:
        call = BilinearCall(
            OPDEF.kernels_for(backend), OP, *_call_args(factor, activation, normalize), True,
            _reference_of(factor, activation, normalize), chain=True,
        )  # fmt: skip
        y = _eager.apply(call, (x2, t2, *params))
    return y.reshape(*lead, out)
