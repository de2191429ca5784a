"""A synthetic two-modality task whose label is a multiplicative interaction of the modalities.

Generator (all draws from one ``torch.Generator`` seeded with ``seed``, so a seed fixes the data):

1. Latents ``z_img, z_text ~ N(0, I_rank)`` per sample, independent.
2. Score ``s = Σ_k z_img,k · z_text,k`` (a bilinear interaction: neither modality alone says
   anything about the label, since ``s`` is symmetric in the sign of either latent).
3. Label ``y = 1[s + label_noise · ε > 0]`` with ``ε ~ N(0, 1)``. Labels are made exactly
   balanced (``n // 2`` ones per split) by drawing the target labels as a random permutation and
   negating ``z_text`` (and ``ε``) where the sign disagrees; this negation leaves the joint
   distribution unchanged because it is symmetric.
4. Observations ``x_img = z_img A_img + noise · N(0, I_dim)`` and
   ``x_text = z_text A_text + noise · N(0, I_dim)``, with fixed random maps
   ``A_img, A_text (rank, dim)`` of i.i.d. ``N(0, 1/rank)`` entries (so a coordinate has about
   unit variance), shared by the three splits.

Why product fusion fits: ``x_img ⊙ x_text`` has coordinates ``Σ_kl z_img,k z_text,l A_img[k,j]
A_text[l,j]``; a linear read-out ``w`` of them equals ``s`` when ``Σ_j w_j A_img[k,j] A_text[l,j]
= δ_kl``, which is solvable when ``dim >= rank²`` (generic maps). A linear model on the
concatenation ``[x_img, x_text]`` is at chance.

Parameters (the config's ``synthetic`` dict sets any of them):
    n_train, n_val, n_test: samples per split (default 2000 / 500 / 1000).
    dim: width of each observed modality (default 64; the real embeddings are 768).
    rank: latent dimensionality r (default 4; keep ``dim >= rank**2``).
    noise: std of the Gaussian observation noise added to each modality (default 0.1).
    label_noise: std of the noise on the score before thresholding (default 0.0, a clean rule).
    seed: generator seed (default: the config's ``seed``).
"""

from __future__ import annotations

import torch

from experiments.tweet.data import Split, TweetData

SYNTHETIC_KEYS = ("n_train", "n_val", "n_test", "dim", "rank", "noise", "label_noise", "seed")
SYNTHETIC_DEFAULTS: dict[str, float | int] = {
    "n_train": 2000,
    "n_val": 500,
    "n_test": 1000,
    "dim": 64,
    "rank": 4,
    "noise": 0.1,
    "label_noise": 0.0,
}


def _split(
    n: int, maps: tuple[torch.Tensor, torch.Tensor], noise: float, label_noise: float, g: torch.Generator
) -> Split:
    a_img, a_text = maps
    rank, dim = a_img.shape
    z_img = torch.randn(n, rank, generator=g, dtype=torch.float64)
    z_text = torch.randn(n, rank, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64) * label_noise
    target = torch.zeros(n, dtype=torch.int64)
    target[torch.randperm(n, generator=g)[: n // 2]] = 1
    score = (z_img * z_text).sum(1) + eps
    flip = (score > 0).long() != target
    z_text[flip] = -z_text[flip]
    eps[flip] = -eps[flip]
    label = ((z_img * z_text).sum(1) + eps > 0).long()
    x_img = z_img @ a_img + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    x_text = z_text @ a_text + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return Split(img=x_img.float(), text=x_text.float(), label=label)


def make_synthetic(
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 1000,
    *,
    dim: int = 64,
    rank: int = 4,
    noise: float = 0.1,
    seed: int = 0,
    label_noise: float = 0.0,
) -> TweetData:
    """The synthetic task described in the module docstring (train/val/test, balanced, seeded)."""
    for name, value in (
        ("n_train", n_train),
        ("n_val", n_val),
        ("n_test", n_test),
        ("dim", dim),
        ("rank", rank),
    ):
        if int(value) < 1:
            raise ValueError(f"make_synthetic: {name} must be >= 1, got {value}")
    if noise < 0 or label_noise < 0:
        raise ValueError(f"make_synthetic: noise and label_noise must be >= 0, got {noise}, {label_noise}")
    g = torch.Generator().manual_seed(int(seed))
    scale = 1.0 / rank**0.5
    maps = (
        torch.randn(rank, dim, generator=g, dtype=torch.float64) * scale,
        torch.randn(rank, dim, generator=g, dtype=torch.float64) * scale,
    )
    return TweetData(
        train=_split(int(n_train), maps, noise, label_noise, g),
        val=_split(int(n_val), maps, noise, label_noise, g),
        test=_split(int(n_test), maps, noise, label_noise, g),
    )
