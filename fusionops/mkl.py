"""Multiple kernel learning estimators: kernel ridge regression whose kernel weights β are
learned on the simplex jointly with the predictor.

Objective (kernel ridge with a learned combination, as in Cortes, Mohri & Rostamizadeh 2009,
"L2 regularization for learning kernels", with β on the simplex as in SimpleMKL). For training
targets ``Y (N, C)`` (centred per column) and ``K_β = Σ_m β_m s_m K_m``::

    min_{β ∈ Δ}  J(β),   J(β) = min_F  ‖Y - F‖² + λ ‖F‖²_{K_β}  =  λ · tr(Yᵀ (K_β + λI)⁻¹ Y)

The inner minimum is the kernel ridge predictor, with dual coefficients
``A = (K_β + λI)⁻¹ Y``; J is convex in β and its gradient is
``∂J/∂β_m = -λ s_m tr(Aᵀ K_m A)``. Each step computes ``K_β`` with the fused op
(:func:`fusionops.multiple_kernel`, which never holds the M Gram matrices), solves for A by
Cholesky, and takes an Adam step on ``logits`` (``β = softmax(logits)``); the β gradient comes
from the fused op's backward. ``s_m = 1 / mean_i k_m(x_i, x_i)`` (``normalize=True``) puts
kernels of different sizes on one footing, so β compares like with like.

:class:`MultipleKernelRidge` regresses; :class:`MultipleKernelRidgeClassifier` fits ±1 codes
one-vs-rest and predicts the class of the largest score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusionops.base_kernels import BaseKernel, KernelSpec, as_base_kernels
from fusionops.nn.multiple_kernel import MultipleKernelFusion

ArrayLike = object  # a tensor or anything torch.as_tensor takes (numpy arrays)


def _diagonal_mean(kernel: BaseKernel, x: Tensor) -> float:
    """``mean_i k(x_i, x_i)``: 1 for RBF, ``‖x‖²`` for linear, ``(‖x‖² + c)^p`` for polynomial."""
    if kernel.kind == "rbf":
        return 1.0
    sq = (x.double() * x.double()).sum(-1)
    if kernel.kind == "polynomial":
        sq = (sq + float(kernel.offset)) ** kernel.degree
    return float(sq.mean())


class MultipleKernelRidge:
    """Kernel ridge regression on a learned combination of per-modality base kernels.

    Args:
        kernels: one base kernel per modality (see :mod:`fusionops.base_kernels`).
        alpha: the ridge penalty λ > 0.
        steps: Adam steps on the β logits (0 keeps β at its initial, uniform value).
        lr: Adam's learning rate.
        tol: stop when J changes by less than ``tol`` relative to it over one step.
        normalize: scale each kernel by ``1 / mean k_m(x, x)`` on the training data.
        learn_kernel_params: also learn RBF γ and polynomial offsets by the same gradient.
        dtype: the dtype the kernels run in (float64 by default: the Cholesky solve of a
            ridge system is sensitive to rounding).

    After :meth:`fit`: ``beta_`` (M,) on the simplex, ``dual_coef_`` A, ``history_`` (J per step),
    ``fusion_`` (the :class:`fusionops.MultipleKernelFusion` holding β and the kernels).
    """

    def __init__(
        self,
        kernels: Sequence[KernelSpec],
        *,
        alpha: float = 0.1,
        steps: int = 100,
        lr: float = 0.05,
        tol: float = 1e-6,
        normalize: bool = True,
        learn_kernel_params: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        name = type(self).__name__
        self.kernels = as_base_kernels(name, kernels)
        if not alpha > 0:
            raise ValueError(f"{name}: alpha (the ridge penalty) must be > 0, got {alpha}")
        if steps < 0:
            raise ValueError(f"{name}: steps must be >= 0, got {steps}")
        self.alpha, self.steps, self.lr, self.tol = float(alpha), int(steps), float(lr), float(tol)
        self.normalize, self.learn_kernel_params, self.dtype = normalize, learn_kernel_params, dtype

    # ---- data -----------------------------------------------------------------------------
    def _views(self, xs: Sequence[ArrayLike], where: str) -> list[Tensor]:
        name = type(self).__name__
        if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"{name}.{where}: xs must be a list with one (N, d_m) array per modality")
        if len(xs) != len(self.kernels):
            raise ValueError(
                f"{name}.{where}: xs has {len(xs)} modalities but the estimator has "
                f"{len(self.kernels)} kernels"
            )
        views = [torch.as_tensor(x).to(self.dtype) for x in xs]
        for m, v in enumerate(views):
            if v.dim() != 2:
                raise ValueError(f"{name}.{where}: xs[{m}] must be (N, d_{m}), got shape {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}.{where}: xs[{m}] holds non-finite values")
        if where == "predict":
            for m, (v, t) in enumerate(zip(views, self.train_xs_, strict=True)):
                if v.shape[1] != t.shape[1]:
                    raise ValueError(
                        f"{name}.{where}: xs[{m}] has width {v.shape[1]}, but the model was fit "
                        f"on width {t.shape[1]}"
                    )
        return views

    def _targets(self, y: ArrayLike, n: int) -> Tensor:
        t = torch.as_tensor(y).to(self.dtype)
        t = t[:, None] if t.dim() == 1 else t
        if t.dim() != 2 or t.shape[0] != n:
            raise ValueError(
                f"{type(self).__name__}.fit: y must have {n} rows (one per sample), got {tuple(t.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).any(1).nonzero()[:5, 0].tolist()
            raise ValueError(f"{type(self).__name__}.fit: y holds non-finite values (rows {bad}…)")
        return t

    # ---- fit / predict --------------------------------------------------------------------
    def _objective(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(J, A)`` at the current β."""
        k = self.fusion_(self.train_xs_)
        k = 0.5 * (k + k.T)  # rounding in the kernels may leave it a hair asymmetric
        eye = torch.eye(k.shape[0], dtype=k.dtype)
        chol = torch.linalg.cholesky(k + self.alpha * eye)
        a = torch.cholesky_solve(y, chol)
        return self.alpha * (y * a).sum(), a

    def _fit_targets(self, views: list[Tensor], y: Tensor) -> MultipleKernelRidge:
        """Fit on ``views`` (already checked by :meth:`_views`) and targets ``y`` (N, C)."""
        self.train_xs_ = views
        n = views[0].shape[0]
        if any(v.shape[0] != n for v in views):
            raise ValueError(f"{type(self).__name__}.fit: every modality needs the same number of rows")
        scales = [1.0 / max(_diagonal_mean(k, v), 1e-12) for k, v in zip(self.kernels, views, strict=True)]
        self.scales_ = scales if self.normalize else [1.0] * len(views)
        self.fusion_ = MultipleKernelFusion(
            self.kernels,
            input_dims=[v.shape[1] for v in views],
            learn_kernel_params=self.learn_kernel_params,
            scales=self.scales_,
        ).to(self.dtype)
        self.y_offset_ = y.mean(0)
        yc = y - self.y_offset_
        optimizer = torch.optim.Adam(self.fusion_.parameters(), lr=self.lr)
        self.history_: list[float] = []
        for _ in range(self.steps):
            optimizer.zero_grad()
            j, _ = self._objective(yc)
            j.backward()
            optimizer.step()
            self.history_.append(float(j.detach()))
            h = self.history_
            if len(h) > 1 and abs(h[-2] - h[-1]) <= self.tol * abs(h[-1]):
                break
        with torch.no_grad():
            j, self.dual_coef_ = self._objective(yc)
        self.objective_ = float(j)
        self.beta_ = self.fusion_.beta.detach().clone()
        return self

    def fit(self, xs: Sequence[ArrayLike], y: ArrayLike) -> MultipleKernelRidge:
        """Learn β and the ridge predictor from ``xs`` (one (N, d_m) array per modality) and
        targets ``y`` (N,) or (N, C)."""
        views = self._views(xs, "fit")
        return self._fit_targets(views, self._targets(y, views[0].shape[0]))

    def decision_function(self, xs: Sequence[ArrayLike]) -> Tensor:
        """``K(xs, train) A + mean(y)``, (N, C)."""
        if not hasattr(self, "dual_coef_"):
            raise RuntimeError(f"{type(self).__name__}: call fit before predict")
        views = self._views(xs, "predict")
        with torch.no_grad():
            return self.fusion_(views, self.train_xs_) @ self.dual_coef_ + self.y_offset_

    def predict(self, xs: Sequence[ArrayLike]) -> Tensor:
        out = self.decision_function(xs)
        return out[:, 0] if out.shape[1] == 1 else out

    def score(self, xs: Sequence[ArrayLike], y: ArrayLike) -> float:
        """R² of the predictions (averaged over target columns)."""
        pred = self.decision_function(xs)
        target = self._targets(y, pred.shape[0])
        residual = ((target - pred) ** 2).sum(0)
        total = ((target - target.mean(0)) ** 2).sum(0)
        return float((1 - residual / total).mean())


class MultipleKernelRidgeClassifier(MultipleKernelRidge):
    """One-vs-rest kernel ridge on ±1 class codes (a least-squares SVM), with β learned as in
    :class:`MultipleKernelRidge`; predicts the class of the largest score. ``classes_`` holds
    the labels seen in fit."""

    def fit(self, xs: Sequence[ArrayLike], y: ArrayLike) -> MultipleKernelRidgeClassifier:
        labels = torch.as_tensor(y)
        if labels.dim() != 1:
            raise ValueError(
                f"{type(self).__name__}.fit: y must be (N,) class labels, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            bad = (~torch.isfinite(labels)).nonzero()[:5, 0].tolist()
            raise ValueError(f"{type(self).__name__}.fit: y holds non-finite labels (rows {bad}…)")
        self.classes_, index = torch.unique(labels, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__}.fit: y needs at least two classes, got {self.classes_.tolist()}"
            )
        codes = -torch.ones(labels.shape[0], len(self.classes_), dtype=self.dtype)
        codes[torch.arange(labels.shape[0]), index] = 1.0
        views = self._views(xs, "fit")
        if views[0].shape[0] != labels.shape[0]:
            raise ValueError(
                f"{type(self).__name__}.fit: y has {labels.shape[0]} labels for {views[0].shape[0]} rows"
            )
        self._fit_targets(views, codes)
        return self

    def predict(self, xs: Sequence[ArrayLike]) -> Tensor:
        return self.classes_[self.decision_function(xs).argmax(1)]

    def score(self, xs: Sequence[ArrayLike], y: ArrayLike) -> float:
        """Accuracy."""
        return float((self.predict(xs) == torch.as_tensor(y)).double().mean())
