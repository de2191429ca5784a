"""The bilinear pooling family (DESIGN.md section 6) as plain torch ops: MFB (MLB as k = 1),
MFH (chained MFB blocks), MUTAN and BLOCK (MUTAN is BLOCK with one chunk).

These materialise what block.bootstrap.pytorch's ``fusions.py`` materialises: the ``(*, k·o)``
projections and their product (MFB, each block of MFH), every chunk's ``(*, R·s)`` projections (BLOCK).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# The activations the fused kernels implement (block.bootstrap takes any name of
# torch.nn.functional; the layers send others to this reference).
ACTIVATIONS = (None, "relu", "tanh")
NORMALIZE = ("none", "before_cat", "after_cat")


def activate(x: Tensor, activation: str | None) -> Tensor:
    """``getattr(F, activation)(x)``, as block.bootstrap applies ``activ_input``; None: identity."""
    return x if not activation else getattr(F, activation)(x)


def signed_sqrt_l2(z: Tensor) -> Tensor:
    """``n(z)``: signed square root then L2 normalisation of the last dim, exactly as
    block.bootstrap writes it (its gradient at ``z = 0`` is 0, and a zero row stays zero)."""
    z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))
    return F.normalize(z, p=2, dim=-1)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p=p, training=training) if p > 0 else x


def mfb(
    x: Tensor,
    t: Tensor,
    u_weight: Tensor,
    u_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    factor: int,
    activation: str | None = "relu",
    normalize: bool = False,
    *,
    dropout_input: float = 0.0,
    dropout_pre_norm: float = 0.0,
    dropout_pre_lin: float = 0.0,
    training: bool = False,
) -> Tensor:
    """MFB: ``e = act(x Uᵀ + b_u) ⊙ act(t Vᵀ + b_v)``, ``z_j = Σ_{i<k} e_{j·k+i}``,
    optional ``n(z)``, then ``y = z W_oᵀ + b_o``.

    ``U (k·o, d_x)``, ``V (k·o, d_t)``, ``W_o (O, o)``. The dropouts are block.bootstrap's
    ``dropout_input`` (on both activated projections), MFB's ``dropout_pre_norm`` (on ``e``)
    and MLB's ``dropout_pre_lin`` (on ``z``, before the output projection).
    """
    a = _dropout(activate(F.linear(x, u_weight, u_bias), activation), dropout_input, training)
    b = _dropout(activate(F.linear(t, v_weight, v_bias), activation), dropout_input, training)
    e = _dropout(a * b, dropout_pre_norm, training)
    z = e.unflatten(-1, (-1, factor)).sum(-1)  # pooled index j·k + i
    if normalize:
        z = signed_sqrt_l2(z)
    return F.linear(_dropout(z, dropout_pre_lin, training), out_weight, out_bias)


def block_fusion(
    x: Tensor,
    t: Tensor,
    merge_weight0: Tensor,
    merge_bias0: Tensor | None,
    merge_weight1: Tensor,
    merge_bias1: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    rank: int,
    normalize: str = "before_cat",
    *,
    dropout_pre_lin: float = 0.0,
    training: bool = False,
) -> Tensor:
    """BLOCK (MUTAN with one chunk) on the projected ``x̃ (*, m)``, ``t̃ (*, m)``.

    ``merge_weight0/1 (C, R·s, s)``: chunk c's ``nn.Linear(s, s·R)`` weights stacked (rank
    major: row ``r·s + j``), ``merge_bias0/1 (C, R·s)``; ``s = m / C``. Per chunk
    ``z_c = Σ_r (x̃_c A_{c,r}ᵀ + a_{c,r}) ⊙ (t̃_c B_{c,r}ᵀ + b_{c,r})``; ``n`` on each ``z_c``
    (``before_cat``), on ``cat_c z_c`` (``after_cat``) or not at all (``none``); then
    ``y = cat_c(z_c) W_oᵀ + b_o`` (``dropout_pre_lin`` before that projection).
    """
    chunks = merge_weight0.shape[0]
    zs = []
    for c, (x_c, t_c) in enumerate(zip(x.chunk(chunks, -1), t.chunk(chunks, -1), strict=True)):
        b0 = None if merge_bias0 is None else merge_bias0[c]
        b1 = None if merge_bias1 is None else merge_bias1[c]
        m = F.linear(x_c, merge_weight0[c], b0) * F.linear(t_c, merge_weight1[c], b1)
        z = m.unflatten(-1, (rank, -1)).sum(-2)  # rank-major: row r·s + j
        zs.append(signed_sqrt_l2(z) if normalize == "before_cat" else z)
    z = torch.cat(zs, -1)
    if normalize == "after_cat":
        z = signed_sqrt_l2(z)
    z = _dropout(z, dropout_pre_lin, training)
    return F.linear(z, out_weight, out_bias)


def mfh(
    x: Tensor,
    t: Tensor,
    u_weight: Tensor | Sequence[Tensor],
    u_bias: Tensor | Sequence[Tensor] | None,
    v_weight: Tensor | Sequence[Tensor],
    v_bias: Tensor | Sequence[Tensor] | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    factor: int,
    activation: str | None = "relu",
    normalize: bool = False,
    *,
    dropout_input: float = 0.0,
    dropout_pre_lin: float = 0.0,
    training: bool = False,
) -> Tensor:
    """MFH (Yu et al. 2018): ``p`` MFB blocks, block i's ``(U_i, b_u_i, V_i, b_v_i)`` =
    ``u_weight[i] (k·o, d_x)``, ``u_bias[i] (k·o)``, ``v_weight[i]``, ``v_bias[i]`` (stacked
    ``(p, k·o, d)`` / ``(p, k·o)`` tensors, as :func:`fusionops.mfh` takes them, or sequences of
    p tensors; biases None: none). ``e_i = act(x U_iᵀ + b_u_i) ⊙ act(t V_iᵀ + b_v_i) ⊙ e_{i−1}``
    (``e_{−1} = 1``), ``z_i = n(SumPool_k(e_i))``, ``y = cat(z_0 … z_{p−1}) W_oᵀ + b_o``
    (``W_o (O, p·o)``). As block.bootstrap's ``MFH`` (p = 2): ``dropout_pre_lin`` acts on each
    ``e_i`` before it is pooled and passed on.
    """
    zs = []
    skip: Tensor | None = None
    for i in range(len(u_weight)):
        bu = None if u_bias is None else u_bias[i]
        bv = None if v_bias is None else v_bias[i]
        a = _dropout(activate(F.linear(x, u_weight[i], bu), activation), dropout_input, training)
        b = _dropout(activate(F.linear(t, v_weight[i], bv), activation), dropout_input, training)
        e = a * b if skip is None else a * b * skip
        skip = e = _dropout(e, dropout_pre_lin, training)
        z = e.unflatten(-1, (-1, factor)).sum(-1)
        zs.append(signed_sqrt_l2(z) if normalize else z)
    return F.linear(torch.cat(zs, -1), out_weight, out_bias)
