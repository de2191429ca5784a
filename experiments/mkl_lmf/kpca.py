"""Kernel PCA and the separability score of the scatter plots."""

from __future__ import annotations

import torch
from torch import Tensor


def kernel_pca(gram: Tensor, components: int = 2) -> Tensor:
    """Embed the points of a Gram matrix ``(N, N)`` in its top ``components`` kernel principal
    components: centre it (``H K H``, ``H = I − 11ᵀ/N``), take the leading eigenvectors ``v_i``
    and return ``v_i √λ_i`` as columns ``(N, components)`` (negative eigenvalues from rounding
    count as 0). Each column's sign is fixed so that its largest-magnitude entry is positive."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"kernel_pca: gram must be square, got shape {tuple(gram.shape)}")
    k = gram.double()
    k = 0.5 * (k + k.T)
    centred = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    values, vectors = torch.linalg.eigh(centred)  # ascending
    values, vectors = values.flip(0)[:components], vectors.flip(1)[:, :components]
    coords = vectors * values.clamp_min(0).sqrt()
    sign = torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True)))
    return coords * torch.where(sign == 0, torch.ones_like(sign), sign)


def fisher_ratio(points: Tensor, labels: Tensor) -> float:
    """``trace(S_b) / trace(S_w)``: between-class scatter ``Σ_c n_c ‖μ_c − μ‖²`` over
    within-class scatter ``Σ_i ‖x_i − μ_{y_i}‖²``. Invariant to scaling and rotating the
    embedding; larger means the classes sit further apart relative to their spread."""
    x = points.double()
    mean = x.mean(0)
    between = within = 0.0
    for c in torch.unique(labels):
        pts = x[labels == c]
        centre = pts.mean(0)
        between += pts.shape[0] * float(((centre - mean) ** 2).sum())
        within += float(((pts - centre) ** 2).sum())
    return between / within if within > 0 else float("inf")
