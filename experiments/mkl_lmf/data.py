"""The study's data: scikit-learn's bundled digits split into three views, a simulated
three-modality classification set (visual 128-d, audio 64-d, text 300-d; one strong, one weak,
one noise-only modality) and a simulated three-modality regression set whose target is a
product across modalities. Everything is drawn from seeded ``torch.Generator`` s."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODALITIES = ("visual", "audio", "text")
DIMS = (128, 64, 300)
DIGIT_VIEWS = ("top half", "bottom half", "row/column profiles")


@dataclass
class MultiView:
    """``views[m]`` (N, d_m) float64, ``labels`` (N,) int64 (or float targets ``(N,)``),
    ``names[m]`` the view names."""

    views: list[Tensor]
    labels: Tensor
    names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: Tensor) -> MultiView:
        return MultiView([v[index] for v in self.views], self.labels[index], self.names)


def digit_views() -> MultiView:
    """The 1797 8×8 digits as three views: the top four rows (32 pixels), the bottom four rows
    (32 pixels), and the row and column ink profiles (8 row sums + 8 column sums = 16). Each
    view alone is informative but incomplete: the halves each miss half of the glyph, the
    profiles keep the whole glyph's outline but lose where along a row or column the ink is."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float64)  # (N, 8, 8), values 0…16
    top = images[:, :4].reshape(-1, 32)
    bottom = images[:, 4:].reshape(-1, 32)
    profiles = torch.cat([images.sum(2), images.sum(1)], 1)
    return MultiView([top, bottom, profiles], torch.as_tensor(digits.target, dtype=torch.int64), DIGIT_VIEWS)


def split(n: int, n_train: int, seed: int, n_test: int | None = None) -> tuple[Tensor, Tensor]:
    """A seeded random (train, test) split of ``range(n)``; test is the rest unless ``n_test``."""
    if not 0 < n_train < n:
        raise ValueError(f"n_train must be in 1…{n - 1}, got {n_train}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test = perm[n_train:] if n_test is None else perm[n_train : n_train + n_test]
    return perm[:n_train], test


def standardize(views: list[Tensor], train: Tensor) -> list[Tensor]:
    """Each feature to zero mean and unit variance with the training rows' statistics
    (constant features are left at zero), so RBF's default γ = 1/d suits every view."""
    out = []
    for v in views:
        mean, std = v[train].mean(0), v[train].std(0)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        out.append((v - mean) / std)
    return out


@dataclass(frozen=True)
class SimulatedMKL:
    """Class signal spread unequally over the three simulated modalities.

    ``C ≤ k`` classes with equidistant centroids ``μ_c = 2 (e_c − 1/C)`` in a ``k``-dim latent
    space (every pair of classes ``‖μ_c − μ_c'‖² = 8`` apart, the mean for ``N(0, I_k)``
    centroids, but without their seed-to-seed spread, so each modality's strength is set by its
    amplitude alone). Modality m sees
    ``x_m = a_m · μ_y P_m + ε``, ``P_m`` a fixed random ``(k, d_m)`` map with N(0, 1/k) entries
    (so a unit latent vector has squared norm ≈ d_m after the map) and ``ε ~ N(0, I)``.
    The default amplitudes make visual strong, audio weak and text pure noise (``a = 0``).
    """

    n_classes: int = 4
    latent: int = 4
    amplitudes: tuple[float, float, float] = (0.25, 0.1, 0.0)

    def make(self, n: int, seed: int) -> MultiView:
        if not 2 <= self.n_classes <= self.latent:
            raise ValueError(
                f"SimulatedMKL: need 2 <= n_classes <= latent, got {self.n_classes}, {self.latent}"
            )
        g = torch.Generator().manual_seed(seed)
        eye = torch.eye(self.n_classes, self.latent, dtype=torch.float64)
        centroids = 2 * (eye - eye.mean(0))
        labels = torch.arange(n) % self.n_classes
        labels = labels[torch.randperm(n, generator=g)]
        views = []
        for d, a in zip(DIMS, self.amplitudes, strict=True):
            proj = torch.randn(self.latent, d, generator=g, dtype=torch.float64) / self.latent**0.5
            noise = torch.randn(n, d, generator=g, dtype=torch.float64)
            views.append(a * centroids[labels] @ proj + noise)
        return MultiView(views, labels, MODALITIES)


@dataclass(frozen=True)
class SimulatedRegression:
    """A regression target made of products across modalities, so fusion matters.

    Each modality has a ``k``-dim latent ``s_m ~ N(0, I)`` seen through a fixed random map plus
    noise: ``x_m = s_m P_m / √k + σ ε`` (width 128, 64, 300). The clean target is
    ``t = Σ_r c_r Π_m (offset + s_m · u_rm)`` with unit directions ``u_rm`` and signs
    ``c = (+1, −1, +1, …)`` (true rank ``true_rank`` ≤ the model's 4, and the offset keeps
    lower-order terms), standardized; ``y = √(1 − noise) t + √noise ξ``, so the best possible
    R² is about ``1 − noise``. A linear model of the concatenated features explains almost none
    of it (checked in the study).
    """

    latent: int = 4
    true_rank: int = 2
    offset: float = 0.5
    feature_noise: float = 0.5
    noise: float = 0.1

    def make(self, n: int, seed: int) -> MultiView:
        g = torch.Generator().manual_seed(seed)
        k = self.latent
        lat = [torch.randn(n, k, generator=g) for _ in DIMS]
        views = [
            s @ torch.randn(k, d, generator=g) / k**0.5 + self.feature_noise * torch.randn(n, d, generator=g)
            for s, d in zip(lat, DIMS, strict=True)
        ]
        target = torch.zeros(n)
        for r in range(self.true_rank):
            prod = torch.ones(n)
            for s in lat:
                u = torch.randn(k, generator=g)
                prod = prod * (self.offset + s @ (u / u.norm()))
            target = target + (-1) ** r * prod
        target = (target - target.mean()) / target.std()
        y = (1 - self.noise) ** 0.5 * target + self.noise**0.5 * torch.randn(n, generator=g)
        return MultiView(views, y, MODALITIES)
