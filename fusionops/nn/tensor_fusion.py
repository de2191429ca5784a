"""The tensor fusion layer (Zadeh et al. 2017), drop-in for MultiBench / Michaels et al."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusionops._checks import check_layer_widths, feature_count
from fusionops.ops.tensor_fusion import tensor_fusion


class TensorFusion(nn.Module):
    """Tensor fusion of M modalities.

    ``TensorFusion()`` (no arguments) is a drop-in for MultiBench's and Michaels et al.'s
    ``TensorFusion()``: ``forward(xs)`` returns the features
    ``flatten([1, x_1] ⊗ … ⊗ [1, x_M])`` of shape ``(*, prod(d_m + 1))``, in their layout
    (modality 1 slowest). Like theirs, with a single modality it returns ``xs[0]`` itself
    (no 1 prepended; the functional op, which follows DESIGN.md, returns ``[1, x_1]``).
    Modalities may have any shared leading shape.

    ``TensorFusion(input_dims, output_dim)`` owns ``weight (O, K)`` and ``bias (O,)``,
    initialised as ``nn.Linear(K, O)`` would be, and returns ``Z Wᵀ + b`` of shape
    ``(*, O)`` without ever holding ``Z`` (the fused op). That equals the features layer
    followed by ``nn.Linear(K, O)``; :meth:`from_linear` adopts such a trained Linear.

    ``forward(xs, mask=None)``: ``mask (*, M)`` bool marks present modalities; a missing one
    contributes ``[1, 0…0]``.

    ``dropout=p`` (projected layer only): in training mode, inverted dropout of probability
    ``p`` on the features Z, inside the fused kernels (the mask is regenerated from a seed in
    backward; Z is still never held). ``TensorFusion(dims, O, dropout=p)`` trains as
    ``nn.Sequential(TensorFusion(), nn.Dropout(p), nn.Linear(K, O))`` does (MMSA's TFN
    post-fusion dropout), with its own random mask: each forward draws the mask's seed from
    torch's default CPU generator, so ``torch.manual_seed`` makes training reproducible. In eval
    mode, or with ``p = 0``, the call is exactly the layer without dropout.
    """

    def __init__(
        self,
        input_dims: Sequence[int] | None = None,
        output_dim: int | None = None,
        bias: bool = True,
        *,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if (input_dims is None) != (output_dim is None):
            raise ValueError(
                "TensorFusion: give both input_dims and output_dim (projected layer) or "
                f"neither (features layer), got input_dims={input_dims}, output_dim={output_dim}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"TensorFusion: dropout must be a float in [0, 1), got {dropout!r}")
        if dropout > 0 and input_dims is None:
            raise ValueError(
                "TensorFusion: dropout is fused into the projected layer (input_dims, output_dim); "
                "the features layer returns Z itself: apply nn.Dropout to it"
            )
        self.dropout = float(dropout)
        self.input_dims: tuple[int, ...] | None = None
        self.output_dim = output_dim
        if input_dims is None:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            return
        dims = tuple(int(d) for d in input_dims)
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"TensorFusion: input_dims must be one or more widths >= 1, got {input_dims}")
        if int(output_dim) < 1:
            raise ValueError(f"TensorFusion: output_dim must be >= 1, got {output_dim}")
        self.input_dims = dims
        k = feature_count(dims)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(int(output_dim), k, **factory))
        self.bias = nn.Parameter(torch.empty(int(output_dim), **factory)) if bias else None
        self.reset_parameters()

    @property
    def in_features(self) -> int | None:
        """K = prod(d_m + 1) for a projected layer, None for the features layer."""
        return None if self.input_dims is None else feature_count(self.input_dims)

    def reset_parameters(self) -> None:
        """Initialise exactly as ``nn.Linear(K, O).reset_parameters`` does."""
        if self.weight is None:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, input_dims: Sequence[int], linear: nn.Linear, *, dropout: float = 0.0
    ) -> TensorFusion:
        """A projected layer computing ``linear(TensorFusion()(xs))`` with ``linear``'s weights.

        ``linear`` must be ``nn.Linear(K, O)`` with ``K = prod(d_m + 1)`` for ``input_dims``.
        The parameters are copied (the new layer does not share storage with ``linear``).
        ``dropout``: the layer's dropout on Z in training mode (e.g. the ``nn.Dropout`` that
        preceded ``linear``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"TensorFusion.from_linear: linear must be nn.Linear, got {type(linear).__name__}"
            )
        k = feature_count(input_dims)
        if linear.in_features != k:
            raise ValueError(
                f"TensorFusion.from_linear: linear.in_features must be K = prod(d_m + 1) = {k} "
                f"for input_dims {tuple(input_dims)}, got {linear.in_features}"
            )
        w = linear.weight
        layer = cls(
            input_dims,
            linear.out_features,
            bias=linear.bias is not None,
            dropout=dropout,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, xs: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        if self.input_dims is not None:
            check_layer_widths("TensorFusion", self.input_dims, xs)
        elif isinstance(xs, (list, tuple)) and len(xs) == 1:
            # MultiBench / Michaels et al. return a lone modality unchanged: drop the 1 column
            # (the op still checks the arguments and applies the mask)
            return tensor_fusion(xs, mask=mask)[..., 1:]
        p = self.dropout if self.training else 0.0  # eval: exactly the call without dropout
        return tensor_fusion(xs, self.weight, self.bias, mask=mask, dropout=p)

    def extra_repr(self) -> str:
        if self.input_dims is None:
            return "features"
        drop = f", dropout={self.dropout}" if self.dropout else ""
        bias = self.bias is not None
        return f"input_dims={self.input_dims}, output_dim={self.output_dim}, bias={bias}{drop}"
