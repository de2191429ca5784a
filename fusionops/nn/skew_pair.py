"""Skew-pair fusion (Hu et al. 2024, SSFN; DESIGN.md section 4): the layer and its encoder glue.

* :class:`SkewPairFusion` fuses the per-layer summaries of two encoders over a sparse set of
  layer pairs with the SSFN co-attention block, computed per sample by the fused op.
* :func:`layer_summaries` turns a ``transformers`` ``hidden_states`` tuple into ``(N, L, D)``.
* :class:`EncoderStacks` does that for two encoders and brings them to one width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusionops.ops.skew_pair import skew_pair_attention
from fusionops.pairs import PairList, pair_list, skew_pairs

POOLS = ("uniform", "learned")
SUMMARY_POOLS = ("cls", "mean")
ACTIVATIONS = ("relu", "gelu")


class _CoAttention(nn.Module):
    """One direction of SSFN's ``CoAttention`` block, over every pair at once, per sample:

    ``x = norm1(q + dropout1(attn))`` (the op returns ``q + attn``), then
    ``x = norm2(x + dropout2(linear2(dropout(act(linear1(x))))))``.

    ``self_attn`` is an ``nn.MultiheadAttention`` used only as the holder of the attention
    weights (same initialisation and ``state_dict`` keys as SSFN's ``self_attn``, so its weights
    load); its ``forward`` is never called: on SSFN's ``(B, D)`` inputs it would attend across the
    batch, while :func:`fusionops.skew_pair_attention` keeps every sample to itself.
    """

    def __init__(
        self, dim: int, heads: int, ff_dim: int, dropout: float, activation: str, factory: dict[str, Any]
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.0, bias=True, **factory)
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.linear1 = nn.Linear(dim, ff_dim, **factory)
        self.linear2 = nn.Linear(ff_dim, dim, **factory)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.ReLU() if activation == "relu" else nn.GELU()

    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s initialisation (Xavier-uniform ``(3D, D)`` in-projection,
        zero biases, ``nn.Linear``-initialised out-projection), default LayerNorm and Linear."""
        attn = self.self_attn
        nn.init.xavier_uniform_(attn.in_proj_weight)
        nn.init.zeros_(attn.in_proj_bias)
        attn.out_proj.reset_parameters()
        nn.init.zeros_(attn.out_proj.bias)
        for module in (self.norm1, self.norm2, self.linear1, self.linear2):
            module.reset_parameters()

    def forward(self, hq: Tensor, hkv: Tensor, pairs: PairList, heads: int, window: int) -> Tensor:
        attn = self.self_attn
        wq, wk, wv = attn.in_proj_weight.chunk(3)
        bq, bk, bv = attn.in_proj_bias.chunk(3)
        wo, bo = attn.out_proj.weight, attn.out_proj.bias
        out = skew_pair_attention(hq, hkv, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads=heads, window=window)
        if self.training and self.dropout1.p > 0:
            # SSFN drops out the attention term only, before its residual (which the op adds).
            residual = hq[:, [i for i, _ in pairs]]
            out = residual + self.dropout1(out - residual)
        x = self.norm1(out)
        ff = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class SkewPairFusion(nn.Module):
    """Sparse skew-pair fusion of two encoders' per-layer summaries (SSFN), ``(N, dim)``.

    ``forward(ha, hb)``: ``ha (N, La, dim)``, ``hb (N, Lb, dim)`` (e.g. from
    :class:`EncoderStacks`). For every pair ``(i, j)`` of ``.pairs``:

    * A→B: ``x = block_ab(skew_pair_attention(ha, hb, pairs, ...))``: layer i of A attends to
      layer j of B (and, with ``window > 0``, to B's layers within ``window`` of j), then SSFN's
      ``CoAttention`` rest: LayerNorm, feed-forward (``dim → ff_dim → dim``, ReLU or GELU,
      dropout) with its residual, LayerNorm;
    * with ``symmetric`` also B→A on the swapped pairs ``(j, i)`` with its own weights and
      block, and the two directions averaged per pair (SSFN's ``(x + y) / 2``);
    * pairs pooled to ``(N, dim)``: ``pool="uniform"`` their mean (SSFN's ``Σ / P``),
      ``pool="learned"`` a softmax-weighted sum with learned logits ``pair_logits (P,)``
      (initialised to zero, i.e. uniform).

    Unlike the SSFN code, every sample attends within itself only (DESIGN.md section 4), and
    each direction has its own block (SSFN reuses one). With ``window = 0`` the softmax runs
    over a single key, so the query and key weights have no effect (zero gradient); the key
    bias never has an effect (a softmax is shift-invariant).

    Pairs: ``pairs`` (a zero-based ``(P, 2)`` tensor or list of ``(i, j)``), or
    ``layers=(La, Lb)`` with ``skew`` and ``density``, giving
    ``fusionops.skew_pairs(La, Lb, skew, density)`` (then forward requires exactly those
    depths, which catches a stack that still holds the embedding output). Kept in the
    ``pairs`` buffer (in ``state_dict``; choose them with :func:`fusionops.select_skew_pairs`).

    Parameters: ``block_ab`` (and ``block_ba``) hold ``self_attn`` (``nn.MultiheadAttention``
    weights, used by the fused op), ``norm1``, ``norm2``, ``linear1``, ``linear2`` (named as in
    SSFN's ``CoAttention``, so its ``state_dict`` loads into either block); ``pair_logits``
    with ``pool="learned"``. Dropout applies in training mode only.
    """

    def __init__(
        self,
        dim: int,
        pairs: Tensor | Sequence[tuple[int, int]] | None = None,
        *,
        layers: tuple[int, int] | None = None,
        skew: int = 0,
        density: float = 1 / 12,
        heads: int = 8,
        window: int = 0,
        ff_dim: int | None = None,
        dropout: float = 0.1,
        symmetric: bool = True,
        pool: str = "uniform",
        activation: str = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{name}: dim must be an int >= 1, got {dim!r}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"{name}: heads must be an int >= 1 dividing dim = {dim}, got {heads!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"{name}: window must be an int >= 0, got {window!r}")
        ff_dim = 4 * dim if ff_dim is None else ff_dim
        if isinstance(ff_dim, bool) or not isinstance(ff_dim, int) or ff_dim < 1:
            raise ValueError(f"{name}: ff_dim must be an int >= 1 (default 4 * dim), got {ff_dim!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        if pool not in POOLS:
            raise ValueError(f"{name}: pool must be one of {POOLS}, got {pool!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if (pairs is None) == (layers is None):
            raise ValueError(
                f"{name}: give either pairs (explicit (i, j)) or layers=(La, Lb) with skew and density, "
                f"not {'both' if pairs is not None else 'neither'}"
            )
        if layers is not None:
            if not (isinstance(layers, Sequence) and len(layers) == 2):
                raise ValueError(
                    f"{name}: layers must be (La, Lb), the depths of the two stacks, got {layers!r}"
                )
            la, lb = layers
            table = skew_pairs(la, lb, skew, density)
            self.layers: tuple[int, int] | None = (la, lb)
            self.skew: int | None = skew
            self.density: float | None = density
        else:
            table = torch.tensor(pair_list(name, pairs), dtype=torch.int64)
            self.layers = self.skew = self.density = None
        self.dim, self.heads, self.window, self.ff_dim = dim, heads, window, ff_dim
        self.symmetric, self.pool, self.activation = bool(symmetric), pool, activation
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("pairs", table.to(device=device))
        # The same pairs as Python ints: what forward hands the op, so torch.compile sees a
        # constant rather than reading the buffer back (kept in step by _load_from_state_dict).
        self._pair_list: PairList = pair_list(name, table)
        self.block_ab = _CoAttention(dim, heads, ff_dim, float(dropout), activation, factory)
        self.block_ba = (
            _CoAttention(dim, heads, ff_dim, float(dropout), activation, factory) if symmetric else None
        )
        if pool == "learned":
            self.pair_logits = nn.Parameter(torch.empty(table.shape[0], **factory))
        else:
            self.register_parameter("pair_logits", None)
        self.reset_parameters()

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])

    def reset_parameters(self) -> None:
        """Re-initialise every parameter: attention as ``nn.MultiheadAttention``, LayerNorm and
        Linear as PyTorch's defaults, pair logits to zero (uniform pooling)."""
        self.block_ab.reset_parameters()
        if self.block_ba is not None:
            self.block_ba.reset_parameters()
        if self.pair_logits is not None:
            nn.init.zeros_(self.pair_logits)

    def _check(self, label: str, h: object, other: Tensor | None) -> None:
        name = type(self).__name__
        if not isinstance(h, Tensor):
            raise TypeError(f"{name}: {label} must be a tensor (N, L, {self.dim}), got {type(h).__name__}")
        if h.dim() != 3 or h.shape[2] != self.dim:
            raise ValueError(
                f"{name}: {label} must have shape (N, L, {self.dim}) (rows, layers, width dim = {self.dim}), "
                f"got {tuple(h.shape)}"
            )
        if other is not None and h.shape[0] != other.shape[0]:
            raise ValueError(f"{name}: {label} has {h.shape[0]} rows but ha has {other.shape[0]}")
        col, stack = (0, "ha") if label == "ha" else (1, "hb")
        depth = int(h.shape[1])
        if self.layers is not None and depth != self.layers[col]:
            raise ValueError(
                f"{name}: {label} has {depth} layers but the pairs were built for layers={self.layers} "
                f"({stack} with {self.layers[col]}); a stack that still holds the embedding output has "
                "one layer more (layer_summaries(drop_embeddings=True) drops it)"
            )
        need = max(p[col] for p in self._pair_list) + 1
        if depth < need:
            raise ValueError(
                f"{name}: {label} has {depth} layers but the pairs use layer {need - 1} of {stack} "
                f"(zero-based), so it needs at least {need}"
            )

    def forward(self, ha: Tensor, hb: Tensor) -> Tensor:
        self._check("ha", ha, None)
        self._check("hb", hb, ha)
        pairs = self._pair_list
        fused = self.block_ab(ha, hb, pairs, self.heads, self.window)  # (N, P, D)
        if self.block_ba is not None:
            back = self.block_ba(hb, ha, tuple((j, i) for i, j in pairs), self.heads, self.window)
            fused = 0.5 * (fused + back)
        if self.pair_logits is None:
            return fused.mean(dim=1)
        weights = torch.softmax(self.pair_logits, dim=0).to(fused.dtype)
        return torch.einsum("p,npd->nd", weights, fused)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pair_list = pair_list(type(self).__name__, self.pairs)

    def extra_repr(self) -> str:
        where = (
            f"layers={self.layers}, skew={self.skew}, density={self.density:.4g}"
            if self.layers is not None
            else "explicit pairs"
        )
        return (
            f"dim={self.dim}, pairs={list(self._pair_list)} ({where}), heads={self.heads}, "
            f"window={self.window}, ff_dim={self.ff_dim}, symmetric={self.symmetric}, "
            f"pool={self.pool!r}, activation={self.activation!r}"
        )


def layer_summaries(
    hidden_states: Sequence[Tensor],
    *,
    pool: str = "cls",
    attention_mask: Tensor | None = None,
    drop_embeddings: bool = True,
) -> Tensor:
    """Per-layer summary vectors ``(N, L, D)`` of a ``transformers`` ``hidden_states`` tuple.

    ``hidden_states``: the ``L + 1`` tensors ``(N, T, D)`` of a model run with
    ``output_hidden_states=True``, the embedding output first; ``drop_embeddings`` (default, as
    SSFN does) leaves it out, so layer ``l`` of the result is encoder layer ``l + 1``.

    ``pool="cls"``: token 0 of every layer (BERT's CLS; ``attention_mask`` is not needed);
    ``pool="mean"``: the mean over the tokens where ``attention_mask (N, T)`` is nonzero (every
    token when None), for encoders without a summary token. The mask must index the T
    positions of the hidden states (for audio encoders that downsample, their frame-level mask).
    """
    name = "layer_summaries"
    if pool not in SUMMARY_POOLS:
        raise ValueError(f"{name}: pool must be one of {SUMMARY_POOLS}, got {pool!r}")
    if hidden_states is None:
        raise ValueError(f"{name}: hidden_states is None; run the encoder with output_hidden_states=True")
    if isinstance(hidden_states, Tensor) or not isinstance(hidden_states, (list, tuple)):
        raise TypeError(
            f"{name}: hidden_states must be a tuple of (N, T, D) tensors (outputs.hidden_states of a "
            f"model run with output_hidden_states=True), got {type(hidden_states).__name__}"
        )
    states = list(hidden_states)
    if not states:
        raise ValueError(
            f"{name}: hidden_states is empty; expected the embedding output and one tensor per layer"
        )
    for k, h in enumerate(states):
        if not isinstance(h, Tensor) or h.dim() != 3:
            what = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"{name}: hidden_states[{k}] must be a tensor of shape (N, T, D), got {what}")
        if h.shape != states[0].shape or h.dtype != states[0].dtype or h.device != states[0].device:
            raise ValueError(
                f"{name}: hidden_states[{k}] is {tuple(h.shape)} {h.dtype} on {h.device} but "
                f"hidden_states[0] is {tuple(states[0].shape)} {states[0].dtype} on {states[0].device}; "
                "expected one shape, dtype and device"
            )
    if drop_embeddings:
        states = states[1:]
        if not states:
            raise ValueError(
                f"{name}: hidden_states holds only the embedding output; no layer is left after "
                "drop_embeddings=True"
            )
    n, t, _ = states[0].shape
    if t == 0:
        raise ValueError(f"{name}: hidden_states have no tokens (T = 0)")
    stack = torch.stack(states, dim=1)  # (N, L, T, D)
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"{name}: attention_mask must be an (N, T) tensor, got {type(attention_mask).__name__}"
            )
        if tuple(attention_mask.shape) != (n, t):
            raise ValueError(
                f"{name}: attention_mask must have shape (N, T) = {(n, t)} (the hidden states' rows and "
                f"tokens), got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=stack.device) != 0
    if pool == "cls":
        return stack[:, :, 0]
    if mask is None:
        return stack.mean(dim=2)
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        row = int((counts == 0).nonzero()[0])
        raise ValueError(f"{name}: attention_mask row {row} has no token; a masked mean needs at least one")
    weights = mask.to(stack.dtype) / counts.to(stack.dtype).unsqueeze(1)  # (N, T)
    return torch.einsum("nltd,nt->nld", stack, weights)


class EncoderStacks(nn.Module):
    """Per-layer summaries of two encoders at one width, ready for :class:`SkewPairFusion`.

    ``forward(hidden_a, hidden_b, mask_a=None, mask_b=None) -> (ha, hb)``: each ``hidden_*`` is
    a ``hidden_states`` tuple (summarised by :func:`layer_summaries` with this module's ``pool``
    and ``drop_embeddings``, ``mask_*`` as its ``attention_mask``) or an already summarised
    ``(N, L, width)`` tensor. Each side whose width differs from ``dim`` gets a learned
    ``nn.Linear(width, dim)`` (``proj_a`` / ``proj_b``, shared by all its layers); a side already
    at ``dim`` passes through unchanged (``nn.Identity``).

    ``dim`` defaults to the larger of the two widths, so the wider encoder is left untouched
    and no projection narrows information away; pass ``dim`` to choose another width.
    """

    def __init__(
        self,
        width_a: int,
        width_b: int,
        dim: int | None = None,
        *,
        pool: str = "cls",
        drop_embeddings: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for label, w in (("width_a", width_a), ("width_b", width_b), ("dim", dim)):
            if w is None and label == "dim":
                continue
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(f"{name}: {label} must be an int >= 1, got {w!r}")
        if pool not in SUMMARY_POOLS:
            raise ValueError(f"{name}: pool must be one of {SUMMARY_POOLS}, got {pool!r}")
        self.width_a, self.width_b = width_a, width_b
        self.dim = max(width_a, width_b) if dim is None else dim
        self.pool, self.drop_embeddings = pool, drop_embeddings
        factory = {"device": device, "dtype": dtype}
        self.proj_a = nn.Identity() if width_a == self.dim else nn.Linear(width_a, self.dim, **factory)
        self.proj_b = nn.Identity() if width_b == self.dim else nn.Linear(width_b, self.dim, **factory)

    def _side(self, label: str, hidden: Sequence[Tensor] | Tensor, mask: Tensor | None, width: int) -> Tensor:
        name = type(self).__name__
        if isinstance(hidden, Tensor):
            if mask is not None:
                raise ValueError(
                    f"{name}: mask_{label} applies to a hidden_states tuple; hidden_{label} is already "
                    "summarised"
                )
            h = hidden
        else:
            h = layer_summaries(
                hidden, pool=self.pool, attention_mask=mask, drop_embeddings=self.drop_embeddings
            )
        if h.dim() != 3 or h.shape[2] != width:
            raise ValueError(
                f"{name}: hidden_{label} must have width width_{label} = {width} "
                f"(summaries (N, L, {width})), got {tuple(h.shape)}"
            )
        return h

    def forward(
        self,
        hidden_a: Sequence[Tensor] | Tensor,
        hidden_b: Sequence[Tensor] | Tensor,
        mask_a: Tensor | None = None,
        mask_b: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        ha = self.proj_a(self._side("a", hidden_a, mask_a, self.width_a))
        hb = self.proj_b(self._side("b", hidden_b, mask_b, self.width_b))
        return ha, hb

    def extra_repr(self) -> str:
        return (
            f"width_a={self.width_a}, width_b={self.width_b}, dim={self.dim}, pool={self.pool!r}, "
            f"drop_embeddings={self.drop_embeddings}"
        )
