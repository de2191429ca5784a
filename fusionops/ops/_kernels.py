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
        self,
        xs: list[Tensor],
        weight: Tensor,
        bias: Tensor | None,
        mask: Tensor | None,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> Tensor:
        """``y = Z Wᵀ + b`` of shape (N, O), without holding Z; ``dropout`` > 0: Z under the
        inverted dropout mask of ``fusionops.reference.tensor_fusion.dropout_keep(seed, …)``."""

    def projected_backward(
        self,
        grad: Tensor,
        xs: list[Tensor],
        weight: Tensor,
        mask: Tensor | None,
        need_dx: bool,
        need_dw: bool,
        need_db: bool,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
        """``(dxs, dW (O, K), db (O,))`` given ``grad = dL/dy`` (N, O); parts not needed
        may be returned as None (dxs as an empty list); the mask regenerated, never stored."""


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


class SkewPairKernels(Protocol):
    """Sparse skew-pair attention (DESIGN.md section 4), per row n and pair p = (i, j):

    ``q = ha[n,i] Wqᵀ + bq``; for the band ``J = {j' : |j' - j| <= window, 0 <= j' < Lb}``:
    ``k_j' = hb[n,j'] Wkᵀ + bk``, ``v_j' = hb[n,j'] Wvᵀ + bv``; per head h (columns
    ``h·dh … (h+1)·dh - 1``, ``dh = D / heads``): ``α = softmax_j'(q_h · k_j'h / sqrt(dh))``,
    ``c_h = Σ_j' α_j' v_j'h``; ``out[n,p] = ha[n,i] + c Woᵀ + bo``.

    The op layer guarantees: ``ha (N, La, D)`` and ``hb (N, Lb, D)`` of one dtype (float16,
    bfloat16, float32, float64) and device, any strides (stride 0 included), N >= 0, D >= 1;
    ``pairs`` an int64 ``(P, 2)`` tensor on the same device, P >= 1, contiguous, with
    ``0 <= i < La`` and ``0 <= j < Lb`` (duplicates allowed); ``w* (D, D)`` as ``nn.Linear``
    stores them and ``b* (D,)`` or None, any strides; ``heads >= 1`` divides D; ``window >= 0``;
    ``grad`` (N, P, D) any strides. Kernels accumulate in float32 (float64 for float64) and
    return tensors of the input dtype.

    ``bk`` adds ``q_h · bk_h`` to every score of a band, which softmax ignores: its gradient
    is the sum of dk, rounding noise around 0 for finite inputs (exactly 0 with one key), NaN
    where the reference's is. With ``window = 0`` every α is 1 when its score is finite, so
    ``wq, wk, bq`` get zero gradients there; a non-finite score gives NaN, as the reference's
    softmax of one score does.
    """

    def forward(
        self,
        ha: Tensor,
        hb: Tensor,
        pairs: Tensor,
        wq: Tensor,
        wk: Tensor,
        wv: Tensor,
        wo: Tensor,
        bq: Tensor | None,
        bk: Tensor | None,
        bv: Tensor | None,
        bo: Tensor | None,
        heads: int,
        window: int,
    ) -> Tensor:
        """``out`` of shape (N, P, D), contiguous."""

    def backward(
        self,
        grad: Tensor,
        ha: Tensor,
        hb: Tensor,
        pairs: Tensor,
        wq: Tensor,
        wk: Tensor,
        wv: Tensor,
        wo: Tensor,
        bq: Tensor | None,
        bk: Tensor | None,
        bv: Tensor | None,
        heads: int,
        window: int,
        needs: list[bool],
    ) -> list[Tensor]:
        """Ten gradients in the order ``ha, hb, wq, wk, wv, wo, bq, bk, bv, bo`` (shapes of
        those inputs), given ``grad = dL/dout`` (N, P, D). ``needs`` has ten flags in the same
        order; an entry whose flag is False may be any tensor (it is ignored), e.g. an empty one.
        The bias flags are False for biases that are None."""


class MultipleKernelKernels(Protocol):
    """Multiple kernel fusion (DESIGN.md section 5): ``K = Σ_m β_m k_m(A_m, B_m)``, ``(N_a, N_b)``.

    With ``G = A_m B_mᵀ`` (accumulated in float32, float64 for float64 inputs):

    * ``kinds[m] == 0`` linear: ``k = G``;
    * ``kinds[m] == 1`` RBF: ``k = exp(-γ D)``, ``D = max(‖a‖² + ‖b‖² - 2G, 0)``, ``γ = params[m] > 0``;
    * ``kinds[m] == 2`` polynomial: ``k = (G + c)^p``, ``c = params[m]``, ``p = degrees[m] >= 1``.

    The op layer guarantees: ``xs_a[m] (N_a, d_m)`` and ``xs_b[m] (N_b, d_m)``, M >= 1, N_a, N_b >= 0,
    d_m >= 1, one dtype (float16, bfloat16, float32, float64) and device, any strides (stride 0
    included); ``xs_b`` may hold the very tensors of ``xs_a`` (the symmetric case: a kernel may
    then build half of K and mirror it). ``beta (M,)`` of
    the dtype of xs, finite and >= 0, any strides. ``params (M,)`` float32 (float64 for float64
    inputs), any strides: γ for RBF, c for polynomial, ignored for linear. ``kinds`` and
    ``degrees`` are Python lists of M ints (``degrees[m]`` is ignored unless polynomial).
    Kernels build each output tile for all modalities at once and never hold the M Gram
    matrices; they return tensors of the input dtype (``dparams``: the dtype of params).

    Gradients, with ``g = dL/dK`` and, per modality, ``S = β_m g ⊙ dk/dG``:
    ``dβ_m = Σ g ⊙ k_m``; linear ``S = β g``; polynomial ``S = β g p (G + c)^(p-1)``, ``dc = Σ S``;
    RBF ``E = β g ⊙ k`` where ``D`` was not clamped (0 where ``‖a‖² + ‖b‖² - 2G < 0``),
    ``S = 2γE``, ``dγ = -Σ E ⊙ D``, and
    ``dA_m = S B_m - 2γ rowsum(E) ⊙ A_m``, ``dB_m = Sᵀ A_m - 2γ colsum(E) ⊙ B_m`` (for linear and
    polynomial the second terms are absent: ``dA_m = S B_m``, ``dB_m = Sᵀ A_m``).
    ``dparams[m]`` is 0 for linear modalities.
    """

    def forward(
        self,
        xs_a: list[Tensor],
        xs_b: list[Tensor],
        beta: Tensor,
        kinds: list[int],
        params: Tensor,
        degrees: list[int],
    ) -> Tensor:
        """``K`` of shape (N_a, N_b), contiguous."""

    def backward(
        self,
        grad: Tensor,
        xs_a: list[Tensor],
        xs_b: list[Tensor],
        beta: Tensor,
        kinds: list[int],
        params: Tensor,
        degrees: list[int],
        needs: list[bool],
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """``(dxs_a, dxs_b, dbeta (M,), dparams (M,))`` given ``grad = dL/dK`` (N_a, N_b), any
        strides (stride 0 included). ``needs`` has four flags in that order; a part whose flag is
        False is returned as an empty list or an empty tensor."""


def empty_grad(like: Tensor) -> Tensor:
    """Stand-in for a gradient that was not asked for (custom ops cannot return None)."""
    return like.new_empty(0)
