"""Low-rank multimodal fusion layers (Liu et al. 2018), drop-in for MultiBench and the LMF code."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fusionops._checks import check_layer_widths
from fusionops.nn._lmf_peers import LMF_FACTOR_KEYS, MULTIBENCH_NO_FACTORS, load_peer_layout, shape_errors
from fusionops.ops.low_rank_fusion import low_rank_fusion


class LowRankFusion(nn.Module):
    """``y = Σ_r w_r · Π_m ([1, x_m] F_m[r]) + b`` (DESIGN.md section 2), fused.

    Parameters (all registered, so they are trained, saved in ``state_dict`` and follow
    ``.to(device/dtype)``, unlike MultiBench's and PyKale's plain-list factors):

    * ``factors[m]``: ``(R, d_m + 1, O)``, Xavier-normal initialised as in the LMF code;
    * ``rank_weight``: ``(R,)``, initialised like the LMF code's ``fusion_weights (1, R)``;
    * ``bias``: ``(O,)``, zero (``bias=False`` drops it).

    ``forward(xs, mask=None)``: ``xs[m]`` of shape ``(*, d_m)``; returns ``(*, O)``. ``mask``
    ``(*, M)`` bool marks present modalities; a missing one contributes ``[1, 0…0]``.

    Peers' weights: :meth:`from_lmf_weights` and :meth:`from_lmf_state_dict` build a layer from
    the original LMF code's tensors; ``load_state_dict`` also takes that code's keys
    (``audio_factor``, ``video_factor``, ``text_factor``, ``fusion_weights``, ``fusion_bias``;
    ``lmf_factor_keys`` names the factors in forward's modality order); :meth:`from_multibench`
    adopts a live MultiBench ``LowRankTensorFusion``, whose ``state_dict`` lacks its factors
    (loading one says so).
    """

    # The LMF code's factor keys in forward's modality order (the load_state_dict hook's).
    lmf_factor_keys: tuple[str, ...] = LMF_FACTOR_KEYS

    def __init__(
        self,
        input_dims: Sequence[int],
        output_dim: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        dims = tuple(int(d) for d in input_dims)
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"{name}: input_dims must be one or more widths >= 1, got {input_dims}")
        if int(output_dim) < 1:
            raise ValueError(f"{name}: output_dim must be >= 1, got {output_dim}")
        if int(rank) < 1:
            raise ValueError(f"{name}: rank must be >= 1, got {rank}")
        self.input_dims = dims
        self.output_dim = int(output_dim)
        self.rank = int(rank)
        factory = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(self.rank, d + 1, self.output_dim, **factory)) for d in dims
        )
        self.rank_weight = nn.Parameter(torch.empty(self.rank, **factory))
        self.bias = nn.Parameter(torch.empty(self.output_dim, **factory)) if bias else None
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(load_peer_layout)

    def reset_parameters(self) -> None:
        """The LMF code's initialisation: Xavier-normal factors and rank weights (the latter
        as the ``(1, R)`` matrix it stores them in), zero bias."""
        for factor in self.factors:
            nn.init.xavier_normal_(factor)
        with torch.no_grad():
            self.rank_weight.normal_(0.0, math.sqrt(2.0 / (1 + self.rank)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, xs: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        check_layer_widths(type(self).__name__, self.input_dims, xs)
        return low_rank_fusion(xs, list(self.factors), self.rank_weight, self.bias, mask=mask)

    @classmethod
    def from_lmf_weights(
        cls, factors: Sequence[Tensor], fusion_weights: Tensor, fusion_bias: Tensor | None = None
    ) -> LowRankFusion:
        """A layer holding copies of the original LMF code's weights.

        ``factors[m]`` ``(R, d_m + 1, O)`` in the modality order of ``forward``;
        ``fusion_weights`` ``(1, R)`` (or ``(R,)``); ``fusion_bias`` ``(1, O)`` (or ``(O,)``).
        The layer then computes what the LMF code's fusion computes on the same inputs.
        """
        name = f"{cls.__name__}.from_lmf_weights"
        if not factors or any(not isinstance(f, Tensor) or f.dim() != 3 for f in factors):
            raise ValueError(f"{name}: factors must be one or more (R, d_m + 1, O) tensors")
        rank, _, out = (int(n) for n in factors[0].shape)
        dims = [int(f.shape[1]) - 1 for f in factors]
        bad = shape_errors(
            {f"factors[{m}]": f for m, f in enumerate(factors)},
            [(rank, d + 1, out) for d in dims],
            fusion_weights,
            fusion_bias,
            rank,
            out,
        )
        if bad:  # every mis-shaped tensor at once; R and O are those of factors[0]
            raise ValueError(f"{name}: " + "; ".join(bad.values()) + f" (R = {rank}, O = {out})")
        ref = factors[0]
        layer = cls(dims, out, rank, bias=fusion_bias is not None, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for mine, f in zip(layer.factors, factors, strict=True):
                mine.copy_(f)
            layer.rank_weight.copy_(fusion_weights.reshape(rank))
            if fusion_bias is not None:
                layer.bias.copy_(fusion_bias.reshape(out))
        return layer

    @classmethod
    def from_lmf_state_dict(
        cls, state_dict: Mapping[str, Tensor], factor_keys: Sequence[str] = LMF_FACTOR_KEYS, prefix: str = ""
    ) -> LowRankFusion:
        """A layer from a ``state_dict`` of the original LMF model (``audio_factor``,
        ``video_factor``, ``text_factor``, ``fusion_weights``, ``fusion_bias``).

        ``factor_keys`` names the factors in the order the modalities are passed to
        ``forward`` (the LMF model's ``forward(audio, video, text)`` order by default);
        ``prefix`` is prepended to every key (e.g. ``"module."`` for a DataParallel save).
        """
        name = f"{cls.__name__}.from_lmf_state_dict"
        keys = [prefix + k for k in (*factor_keys, "fusion_weights")]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            no_factors = all(prefix + k not in state_dict for k in factor_keys)
            multibench = no_factors and prefix + "fusion_weights" in state_dict
            why = f"; {MULTIBENCH_NO_FACTORS}" if multibench else ""
            raise KeyError(f"{name}: missing keys {missing}{why}; state_dict has {sorted(state_dict)[:12]}")
        factors = {prefix + k: state_dict[prefix + k] for k in factor_keys}
        fusion_weights, fusion_bias = state_dict[keys[-1]], state_dict.get(prefix + "fusion_bias")
        first = next(iter(factors.values()))
        if all(f.dim() == 3 for f in factors.values()):  # else from_lmf_weights says what is wrong
            rank, out = int(first.shape[0]), int(first.shape[2])
            want = [(rank, int(f.shape[1]), out) for f in factors.values()]
            bad = shape_errors(factors, want, fusion_weights, fusion_bias, rank, out)
            if bad:  # named by the state_dict's keys, all at once
                raise ValueError(f"{name}: " + "; ".join(bad.values()) + f" (R = {rank}, O = {out})")
        return cls.from_lmf_weights(list(factors.values()), fusion_weights, fusion_bias)

    @classmethod
    def from_multibench(cls, peer: nn.Module) -> LowRankFusion:
        """A layer holding copies of a live MultiBench ``LowRankTensorFusion``'s weights: its
        ``factors`` list ``(R, d_m + 1, O)``, ``fusion_weights (1, R)``, ``fusion_bias (1, O)``.

        The only way to carry its factors over: MultiBench never registers them, so its
        ``state_dict`` does not hold them. Same as ``from_lmf_weights(peer.factors,
        peer.fusion_weights, peer.fusion_bias)``.
        """
        absent = [a for a in ("factors", "fusion_weights", "fusion_bias") if not hasattr(peer, a)]
        if absent:
            raise TypeError(
                f"{cls.__name__}.from_multibench: {type(peer).__name__} has no {absent}; expected "
                "MultiBench's LowRankTensorFusion (a factors list, fusion_weights, fusion_bias)"
            )
        return cls.from_lmf_weights(list(peer.factors), peer.fusion_weights, peer.fusion_bias)

    def extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dim={self.output_dim}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


class LowRankTensorFusion(LowRankFusion):
    """Drop-in for MultiBench's ``LowRankTensorFusion(input_dims, output_dim, rank, flatten=True)``.

    ``forward(modalities, training=False)`` flattens each modality from dim 1 when ``flatten``
    (as MultiBench does) and returns ``(batch, output_dim)``. Unlike MultiBench's, the factors,
    rank weights and bias are registered parameters (MultiBench keeps its factors in a plain
    list, so they are never trained, saved or cast). ``bias``, ``device`` and ``dtype`` are
    keyword-only extras (MultiBench's positional constructor is unchanged).
    """

    def __init__(
        self,
        input_dims: Sequence[int],
        output_dim: int,
        rank: int,
        flatten: bool = True,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_dims, output_dim, rank, bias=bias, device=device, dtype=dtype)
        self.flatten = flatten

    @classmethod
    def from_multibench(cls, peer: nn.Module) -> LowRankTensorFusion:
        """:meth:`LowRankFusion.from_multibench`, keeping the peer's ``flatten``."""
        layer = super().from_multibench(peer)
        layer.flatten = bool(getattr(peer, "flatten", True))
        return layer

    def forward(
        self, modalities: Sequence[Tensor], training: bool = False, mask: Tensor | None = None
    ) -> Tensor:
        if self.flatten and isinstance(modalities, (list, tuple)):
            modalities = [torch.flatten(x, start_dim=1) if isinstance(x, Tensor) else x for x in modalities]
        return super().forward(modalities, mask=mask).reshape(-1, self.output_dim)
