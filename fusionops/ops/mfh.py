"""MFH op (Yu et al. 2018, multimodal factorized high-order pooling; DESIGN.md section 6):
checks, backend choice, autograd, fake kernels.

``fusionops::mfh(x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor,
activation, normalize, backend) -> y`` and its backward op carry the fused implementations: the
bilinear family's kernels (``fusionops/ops/_bilinear.py``) in their ``chain`` mode, each of the
p blocks one chunk reading the whole of ``x`` and ``t``. The ``reference`` backend is served by
``fusionops.reference`` directly, with PyTorch's own autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusionops import reference
from fusionops.ops import _autocast, _bilinear
from fusionops.ops._bilinear_op import BilinearOp, check_dropouts, seed_for
from fusionops.ops.mfb import _activation, activation_from_op, activation_to_op, check_factorized
from fusionops.registry import OpDef, register

OP = "mfh"

# Automatic choice on CPU, on N·p·k·o: the fused kernels everywhere, for their memory, as MFB
# (whose blocks these are; see fusionops/ops/mfb.py: the backward recomputes the projections,
# so fwd+bwd is not faster than the reference). Measured for MFH in benchmarks/results/
# mfh_cpu_*.csv. Crossover sweeps (quiet, crossover_mfh_cpu_2026-12-05_run{1,2}.csv): fwd+bwd
# 1.02-1.84x up to N·p·k·o = 327680, 0.74-0.96x above (512-wide inputs, N = 256 and 1024);
# forward 1.13-3.45x everywhere.
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


def _call_args(
    factor: int, activation: str | None, normalize: bool, *_dropouts
) -> tuple[int, bool, int, int]:
    """(rank, rank_major, activation code, normalize code) of the shared kernels: each block
    is normalised on its own (block.bootstrap normalises z_0 and z_1 before the cat)."""
    norm = _bilinear.NORM_PER_CHUNK if normalize else _bilinear.NORM_NONE
    return factor, False, _bilinear.ACTIVATION_CODES[activation], norm


def _drops(factor, activation, normalize, dropout_input, dropout_pre_lin, seed):
    """The kernels' (drop_in, drop_prod, drop_out, seed): MFH's dropout_pre_lin acts on each
    block's product e_i, before it is pooled and carried to the next block."""
    return dropout_input, dropout_pre_lin, 0.0, seed


def _reference(x, t, uw, ub, vw, vb, ow, ob, factor, activation, normalize, d_in, d_pre_lin, seed):
    """The reference with the fused kernels' dropout masks."""
    return reference.mfh(
        x, t, uw, ub, vw, vb, ow, ob, factor, activation, normalize, dropout_input=d_in,
        dropout_pre_lin=d_pre_lin, training=True, seed=seed,
    )  # fmt: skip


def _check_args(
    x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor, activation, normalize,
    dropout_input=0.0, dropout_pre_lin=0.0, seed=None,
) -> tuple[torch.Size, int, int]:  # fmt: skip
    """Every argument of a call; returns the leading shape, the size metric N·p·k·o and O."""
    check_dropouts(OP, {"dropout_input": dropout_input, "dropout_pre_lin": dropout_pre_lin}, seed)
    return check_factorized(
        OP,
        x,
        t,
        u_weight,
        u_bias,
        v_weight,
        v_bias,
        out_weight,
        out_bias,
        factor,
        activation,
        normalize,
        True,
    )


BILINEAR_OP = BilinearOp(
    OPDEF,
    ("u_weight", "u_bias", "v_weight", "v_bias", "out_weight", "out_bias"),
    (("factor", "int"), ("activation", "str"), ("normalize", "bool")),
    ("dropout_input", "dropout_pre_lin"),
    _check_args,
    _call_args,
    _drops,
    _reference,
    chunked=True,
    chain=True,
    to_op=activation_to_op,
    from_op=activation_from_op,
)
BILINEAR_OP.define()


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
    dropout_input: float = 0.0,
    dropout_pre_lin: float = 0.0,
    seed: int | None = None,
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
        dropout_input, dropout_pre_lin: block.bootstrap's dropouts, inverted, always applied (a
            layer passes them in training only): on both activated projections of every block,
            and on every block's product ``e_i`` before it is pooled and carried on. Their masks
            are hashed from ``seed`` (None: drawn from torch's generator when a probability is
            > 0), regenerated in backward, never stored.

    Returns:
        ``(*, O)``. The fused kernels never hold the blocks' ``(*, k·o)`` projections or their
        chained products for all rows: they work on tiles of rows and recompute them in backward.
    """
    lead, size, out = _check_args(
        x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor, activation, normalize,
        dropout_input, dropout_pre_lin, seed,
    )  # fmt: skip
    activation = _activation(activation)  # type: ignore[arg-type]
    probs = (float(dropout_input), float(dropout_pre_lin))
    seed = seed_for(probs, seed)
    if _autocast.enabled(x.device):
        return _autocast.call_without_autocast(
            OPDEF.autocast, x.device, mfh, x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias,
            factor=factor, activation=activation, normalize=normalize, dropout_input=probs[0],
            dropout_pre_lin=probs[1], seed=seed,
        )  # fmt: skip
    params = (u_weight, u_bias, v_weight, v_bias, out_weight, out_bias)
    return BILINEAR_OP.call(x, t, params, (factor, activation, normalize, *probs, seed), lead, size, out)
