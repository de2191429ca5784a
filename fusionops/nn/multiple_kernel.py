"""Multiple kernel fusion layer (DESIGN.md section 5): base kernels combined with weights
learned on the simplex."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusionops._checks import check_layer_widths
from fusionops.base_kernels import BaseKernel, KernelSpec, as_base_kernels
from fusionops.ops.multiple_kernel import multiple_kernel


class MultipleKernelFusion(nn.Module):
    """``K(xs_a, xs_b) = Σ_m β_m s_m k_m(xs_a[m], xs_b[m])`` with ``β = softmax(logits)`` on the
    simplex (fused: the M Gram matrices are never held).

    Args:
        kernels: one base kernel per modality (see :mod:`fusionops.base_kernels`).
        input_dims: the modalities' widths; needed only to learn an RBF γ left at its default
            ``1/d_m``. Inputs of other widths are refused when given.
        beta: initial weights (M,) on the simplex (default uniform). They are stored as
            ``logits = log β``, so a weight of exactly 0 stays 0.
        learn_kernel_params: also learn every RBF γ (as ``log γ``, so it stays > 0) and every
            polynomial offset c.
        scales: fixed per-modality factors ``s_m`` (default 1), e.g. ``1 / mean k_m(x, x)`` to
            put kernels of different sizes on one footing (what
            :class:`fusionops.MultipleKernelRidge` does with ``normalize=True``).

    ``forward(xs_a, xs_b=None)``: ``(N_a, N_b)``; ``xs_b=None`` gives the Gram matrix of ``xs_a``.
    The kernels run in the dtype of the inputs; β (float32 parameters) is cast to it.
    """

    def __init__(
        self,
        kernels: Sequence[KernelSpec],
        *,
        input_dims: Sequence[int] | None = None,
        beta: Sequence[float] | Tensor | None = None,
        learn_kernel_params: bool = False,
        scales: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        specs = as_base_kernels(name, kernels)
        m = len(specs)
        self.input_dims = None if input_dims is None else tuple(int(d) for d in input_dims)
        if self.input_dims is not None and len(self.input_dims) != m:
            raise ValueError(f"{name}: input_dims has {len(self.input_dims)} widths for {m} kernels")
        init = torch.full((m,), 1.0 / m) if beta is None else torch.as_tensor(beta, dtype=torch.float32)
        if init.shape != (m,) or (init < 0).any() or not torch.isfinite(init).all() or init.sum() <= 0:
            raise ValueError(
                f"{name}: beta must be {m} finite weights >= 0 with a positive sum, got {init.tolist()}"
            )
        self.logits = nn.Parameter((init / init.sum()).log())
        scale = torch.ones(m) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
        if scale.shape != (m,) or (scale <= 0).any() or not torch.isfinite(scale).all():
            raise ValueError(f"{name}: scales must be {m} finite values > 0, got {scale.tolist()}")
        self.register_buffer("scales", scale.clone())
        self.learn_kernel_params = bool(learn_kernel_params)
        self.kinds = tuple(k.kind for k in specs)
        self._fixed = specs
        self.log_gamma = nn.ParameterDict()
        self.offset = nn.ParameterDict()
        if self.learn_kernel_params:
            for i, k in enumerate(specs):
                if k.kind == "rbf":
                    if k.gamma is None and self.input_dims is None:
                        raise ValueError(
                            f"{name}: kernels[{i}] is an RBF with the default γ = 1/d; pass "
                            "input_dims (or a gamma) to learn it"
                        )
                    gamma = 1.0 / self.input_dims[i] if k.gamma is None else float(k.gamma)  # type: ignore[index]
                    self.log_gamma[str(i)] = nn.Parameter(torch.tensor(gamma).log())
                elif k.kind == "polynomial":
                    self.offset[str(i)] = nn.Parameter(torch.tensor(float(k.offset)))

    @property
    def beta(self) -> Tensor:
        """The weights on the simplex, ``softmax(logits)``."""
        return torch.softmax(self.logits, dim=0)

    def base_kernels(self) -> list[BaseKernel]:
        """The base kernels as this call sees them (learned parameters included)."""
        out = []
        for i, k in enumerate(self._fixed):
            if str(i) in self.log_gamma:
                out.append(BaseKernel("rbf", gamma=self.log_gamma[str(i)].exp()))
            elif str(i) in self.offset:
                out.append(BaseKernel("polynomial", degree=k.degree, offset=self.offset[str(i)]))
            else:
                out.append(k)
        return out

    def forward(self, xs_a: Sequence[Tensor], xs_b: Sequence[Tensor] | None = None) -> Tensor:
        if self.input_dims is not None:
            check_layer_widths(type(self).__name__, self.input_dims, xs_a)
        like = xs_a[0] if isinstance(xs_a, (list, tuple)) and xs_a else None
        weights = self.beta * self.scales
        if isinstance(like, Tensor):
            weights = weights.to(dtype=like.dtype, device=like.device)
        return multiple_kernel(xs_a, xs_b, weights, self.base_kernels())

    def extra_repr(self) -> str:
        return f"kernels={list(self.base_kernels())}, learn_kernel_params={self.learn_kernel_params}"
