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

from fusionops.reference.tensor_fusion import dropout_keep

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


# Dropout sites of the fused kernels (csrc/cpu/bilinear.cpp): each has its own seed.
SITE_A, SITE_B, SITE_E, SITE_Z = range(4)  # act(x Uᵀ + b_u), act(t Vᵀ + b_v), the product e, z
SITE_MUL = 0x5BD1E995


def site_seed(seed: int, site: int) -> int:
    """The seed of one dropout site: ``(seed ^ (site · SITE_MUL mod 2^32)) mod 2^31``."""
    return (seed ^ ((site * SITE_MUL) & 0xFFFFFFFF)) & 0x7FFFFFFF


def hashed_dropout(x: Tensor, p: float, seed: int, site: int, col0: int = 0) -> Tensor:
    """Inverted dropout of ``x (*, W)`` with the fused kernels' masks: element ``(row, col0 + j)``
    (rows of the flattened leading dims) kept by ``dropout_keep(site_seed(seed, site), …)`` and
    scaled by ``1/(1 - p)``, dropped ones exactly 0 (selected, so a dropped inf or NaN is gone)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = torch.arange(flat.shape[0], dtype=torch.int64, device=x.device)[:, None]
    cols = torch.arange(col0, col0 + flat.shape[1], dtype=torch.int64, device=x.device)[None, :]
    keep = dropout_keep(site_seed(seed, site), rows, cols, p)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(keep, flat * (1.0 / (1.0 - p)), zero).reshape(x.shape)


def _dropout(
    x: Tensor, p: float, training: bool, seed: int | None = None, site: int = 0, col0: int = 0
) -> Tensor:
    """``F.dropout`` (block.bootstrap's, torch's random stream) when ``seed`` is None, else the
    fused kernels' hashed masks (:func:`hashed_dropout`)."""
    if p <= 0 or not training:
        return x
    return F.dropout(x, p=p, training=True) if seed is None else hashed_dropout(x, p, seed, site, col0)


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
    seed: int | None = None,
) -> Tensor:
    """MFB: ``e = act(x Uᵀ + b_u) ⊙ act(t Vᵀ + b_v)``, ``z_j = Σ_{i<k} e_{j·k+i}``,
    optional ``n(z)``, then ``y = z W_oᵀ + b_o``.

    ``U (k·o, d_x)``, ``V (k·o, d_t)``, ``W_o (O, o)``. The dropouts are block.bootstrap's
    ``dropout_input`` (on both activated projections), MFB's ``dropout_pre_norm`` (on ``e``)
    and MLB's ``dropout_pre_lin`` (on ``z``, before the output projection), active when
    ``training``: ``F.dropout`` when ``seed`` is None, else the fused kernels' hashed masks.
    """
    a = _dropout(activate(F.linear(x, u_weight, u_bias), activation), dropout_input, training, seed, SITE_A)
    b = _dropout(activate(F.linear(t, v_weight, v_bias), activation), dropout_input, training, seed, SITE_B)
    e = _dropout(a * b, dropout_pre_norm, training, seed, SITE_E)
    z = e.unflatten(-1, (-1, factor)).sum(-1)  # pooled index j·k + i
    if normalize:
        z = signed_sqrt_l2(z)
    return F.linear(_dropout(z, dropout_pre_lin, training, seed, SITE_Z), out_weight, out_bias)


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
    seed: int | None = None,
) -> Tensor:
    """BLOCK (MUTAN with one chunk) on the projected ``x̃ (*, m)``, ``t̃ (*, m)``.

    ``merge_weight0/1 (C, R·s, s)``: chunk c's ``nn.Linear(s, s·R)`` weights stacked (rank
    major: row ``r·s + j``), ``merge_bias0/1 (C, R·s)``; ``s = m / C``. Per chunk
    ``z_c = Σ_r (x̃_c A_{c,r}ᵀ + a_{c,r}) ⊙ (t̃_c B_{c,r}ᵀ + b_{c,r})``; ``n`` on each ``z_c``
    (``before_cat``), on ``cat_c z_c`` (``after_cat``) or not at all (``none``); then
    ``y = cat_c(z_c) W_oᵀ + b_o`` (``dropout_pre_lin`` before that projection, when ``training``:
    ``F.dropout`` when ``seed`` is None, else the fused kernels' hashed masks).
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
    z = _dropout(z, dropout_pre_lin, training, seed, SITE_Z)
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
    seed: int | None = None,
) -> Tensor:
    """MFH (Yu et al. 2018): ``p`` MFB blocks, block i's ``(U_i, b_u_i, V_i, b_v_i)`` =
    ``u_weight[i] (k·o, d_x)``, ``u_bias[i] (k·o)``, ``v_weight[i]``, ``v_bias[i]`` (stacked
    ``(p, k·o, d)`` / ``(p, k·o)`` tensors, as :func:`fusionops.mfh` takes them, or sequences of
    p tensors; biases None: none). ``e_i = act(x U_iᵀ + b_u_i) ⊙ act(t V_iᵀ + b_v_i) ⊙ e_{i−1}``
    (``e_{−1} = 1``), ``z_i = n(SumPool_k(e_i))``, ``y = cat(z_0 … z_{p−1}) W_oᵀ + b_o``
    (``W_o (O, p·o)``). As block.bootstrap's ``MFH`` (p = 2): ``dropout_pre_lin`` acts on each
    ``e_i`` before it is pooled and passed on; the dropouts act when ``training``: ``F.dropout``
    when ``seed`` is None, else the fused kernels' hashed masks (block i's columns at ``i·k·o``).
    """
    zs = []
    skip: Tensor | None = None
    for i in range(len(u_weight)):
        bu = None if u_bias is None else u_bias[i]
        bv = None if v_bias is None else v_bias[i]
        col0 = i * u_weight[i].shape[0]
        a = _dropout(
            activate(F.linear(x, u_weight[i], bu), activation), dropout_input, training, seed, SITE_A, col0
        )
        b = _dropout(
            activate(F.linear(t, v_weight[i], bv), activation), dropout_input, training, seed, SITE_B, col0
        )
        e = a * b if skip is None else a * b * skip
        skip = e = _dropout(e, dropout_pre_lin, training, seed, SITE_E, col0)
        z = e.unflatten(-1, (-1, factor)).sum(-1)
        zs.append(signed_sqrt_l2(z) if normalize else z)
    return F.linear(torch.cat(zs, -1), out_weight, out_bias)
