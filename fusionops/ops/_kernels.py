"""The contract between an op and the kernel backends that serve it.

Every non-reference backend of tensor fusion provides these four functions (the Triton
ones in ``fusionops.triton.tensor_fusion``, the C++ ones as ``torch.ops.fusionops._tf_*``).
The op layer guarantees, before any of them is called:

* ``xs``: list of M >= 1 tensors of shape ``(N, d_m)``, N >= 0, d_m >= 1, one dtype (float16,
  bfloat16, float32 or float64) and one device, **any strides** (stride 0 included);
* ``mask``: None or a bool ``(N, M)`` tensor, any strides. ``mask[n, m] == False`` means
  modality m of row n is missing: it contributes ``z_m = [1, 0…0]`` whatever ``xs[m][n]``
  holds (NaN included: select, never multiply), and its gradient is 0;
* ``weight``: ``(O, K)`` with ``K = prod(d_m + 1)``, any strides; ``bias``: None or ``(O,)``;
* ``grad``: the upstream gradient, any strides (a ``y.sum()`` gives a stride-0 one).

Kernels accumulate in float32 (float64 for float64 inputs) and return tensors of the input
dtype. They never hold an ``(N, K)`` tensor in the projected functions.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class TensorFusionKernels(Protocol):
    def features_forward(self, xs: list[Tensor], mask: Tensor | None) -> Tensor:
        """``Z`` of shape (N, K), contiguous."""

    def features_backward(self, grad: Tensor, xs: list[Tensor], mask: Tensor | None) -> list[Tensor]:
        """``dL/dx_m`` (N, d_m) for every m, given ``grad = dL/dZ`` (N, K)."""

    def projected_forward(
        self, xs: list[Tensor], weight: Tensor, bias: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        """``y = Z Wᵀ + b`` of shape (N, O), without holding Z."""

    def projected_backward(
        self,
        grad: Tensor,
        xs: list[Tensor],
        weight: Tensor,
        mask: Tensor | None,
        need_dx: bool,
        need_dw: bool,
        need_db: bool,
    ) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
        """``(dxs, dW (O, K), db (O,))`` given ``grad = dL/dy`` (N, O); parts not needed
        may be returned as None (dxs as an empty list)."""


class LowRankFusionKernels(Protocol):
    """Low-rank fusion (DESIGN.md section 2): ``y = Σ_r w_r Π_m (z_m F_m[r]) + b``.

    Beyond the guarantees above: ``factors[m]`` is ``(R, d_m + 1, O)`` with one R >= 1 and one
    O >= 1 for every m, ``rank_weight`` is ``(R,)``, ``bias`` None or ``(O,)``; all any strides.
    Missing modalities (mask False) contribute ``z_m = [1, 0…0]``, so ``z_m F_m[r] = F_m[r, 0]``;
    their ``dx`` rows are 0 and they add only to ``dF_m[:, 0, :]``.
    """

    def forward(
        self,
        xs: list[Tensor],
        factors: list[Tensor],
        rank_weight: Tensor,
        bias: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        """``y`` of shape (N, O), contiguous, never holding the (N, R, O) projections of
        all rows at once."""

    def backward(
        self,
        grad: Tensor,
        xs: list[Tensor],
        factors: list[Tensor],
        rank_weight: Tensor,
        mask: Tensor | None,
        need_dx: bool,
        need_dfactors: bool,
        need_dw: bool,
        need_db: bool,
    ) -> tuple[list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
        """``(dxs (N, d_m), dfactors (R, d_m + 1, O), d rank_weight (R,), db (O,))`` given
        ``grad = dL/dy`` (N, O); lists not needed are empty, tensors not needed None."""


class ProductFusionKernels(Protocol):
    """Product fusion (DESIGN.md section 3): ``p = x_1 ⊙ … ⊙ x_M``, every ``x_m`` ``(N, d)``
    with one width d (any strides, stride 0 included); no mask."""

    def forward(self, xs: list[Tensor]) -> Tensor:
        """``p`` of shape (N, d), contiguous."""

    def backward(self, grad: Tensor, xs: list[Tensor]) -> list[Tensor]:
        """``dx_m = grad ⊙ Π_{k≠m} x_k`` (N, d) for every m, computed without division
        (zeros in the inputs are fine)."""
