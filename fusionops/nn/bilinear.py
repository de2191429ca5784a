"""Bilinear pooling layers (DESIGN.md section 6), drop-in for block.bootstrap.pytorch's
``fusions.py`` (Cadene/block.bootstrap.pytorch, ``block/models/networks/fusions/fusions.py``):
:class:`MLB`, :class:`MFB`, :class:`MFH`, :class:`Mutan`, :class:`Block`.

Each has block.bootstrap's constructor arguments, ``forward([x0, x1])`` and parameter names
(``linear0``, ``linear1``, ``linear_out``, ``merge_linear0/1``, ``merge_linears0/1``,
``linear0_0``…), so a state_dict saved from their layer loads with plain
``layer.load_state_dict(sd)`` (strict), and ``n_params`` as theirs.

What runs fused: MLB, MFB, MFH, Mutan and Block go through :func:`fusionops.mfb` /
:func:`fusionops.mfh` / :func:`fusionops.block_fusion`, which never hold the ``(N, k·o)`` /
``(N, R·s)`` projections.
The dropouts that sit inside those ops (``dropout_input`` of MLB/MFB/MFH, ``dropout_pre_norm``,
``dropout_pre_lin``) are fused too, in training mode: their masks are hashed from a seed drawn
from torch's generator at each call (so ``torch.manual_seed`` makes training reproducible), not
``F.dropout``'s stream, and regenerated in backward. ``dropout_input`` of Mutan/Block acts on
the projected ``x̃``, ``t̃`` (``F.dropout``), before the op. An ``activ_input`` other than
relu, tanh or None runs the materialising reference (``fusionops.reference``, with
``F.dropout``), as block.bootstrap does. ``dropout_output`` and ``activ_output`` act after
the output projection, outside the op. MFH stacks its blocks' weights into the op's ``(p, k·o, d)``
layout at each call (a copy of their size, as Block's chunks).

Differences from block.bootstrap: any leading shape ``(*, d)`` (theirs: ``(N, d)``; their
``F.normalize`` over dim 1 would normalise the wrong dim of 3-d inputs, ours is the last);
Block's ``chunks`` must divide ``mm_dim`` (theirs allows uneven chunks via ``get_sizes_list``);
inputs are checked (widths, batch, dtype, device) with errors naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionops._checks import check_layer_widths
from fusionops.ops._bilinear import check_pair
from fusionops.ops.block_fusion import block_fusion
from fusionops.ops.mfb import mfb
from fusionops.ops.mfh import mfh
from fusionops.reference import bilinear as reference
from fusionops.reference.bilinear import ACTIVATIONS

__all__ = ["MFB", "MFH", "MLB", "Block", "Mutan"]


def _check_dims(layer: str, input_dims: Sequence[int], output_dim: int, mm_dim: int) -> tuple[int, int]:
    dims = tuple(int(d) for d in input_dims)
    if len(dims) != 2 or any(d < 1 for d in dims):
        raise ValueError(f"{layer}: input_dims must be two widths >= 1 (x0, x1), got {input_dims}")
    for name, v in (("output_dim", output_dim), ("mm_dim", mm_dim)):
        if int(v) < 1:
            raise ValueError(f"{layer}: {name} must be >= 1, got {v}")
    return dims  # type: ignore[return-value]


def _check_count(layer: str, name: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{layer}: {name} must be an int >= 1, got {v!r}")


def _pair(layer: str, input_dims: Sequence[int], x: object) -> tuple[Tensor, Tensor]:
    """``forward``'s ``[x0, x1]``: two tensors of the layer's widths."""
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        got = f"{len(x)} items" if isinstance(x, (list, tuple)) else type(x).__name__
        raise ValueError(f"{layer}: forward takes [x0, x1] (two modalities), got {got}")
    x0, x1 = x
    for i, v in enumerate((x0, x1)):
        if not isinstance(v, Tensor) or v.dim() == 0:
            raise TypeError(f"{layer}: x[{i}] must be a tensor of shape (*, d), got {type(v).__name__}")
    check_layer_widths(layer, input_dims, x)
    check_pair(layer, x0, x1, names=("x[0]", "x[1]"))
    return x0, x1


def _activation_out(z: Tensor, name: str | None) -> Tensor:
    return getattr(F, name)(z) if name else z


class _Bilinear(nn.Module):
    def _dropout_out(self, z: Tensor) -> Tensor:
        p = self.dropout_output
        return F.dropout(z, p=p, training=self.training) if p > 0 else z

    def _count(self) -> None:
        self.n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _p(self, p: float) -> float:
        """A dropout inside the op: its probability in training, 0 in eval."""
        return p if self.training else 0.0


class MFB(_Bilinear):
    """Multimodal factorized bilinear pooling (Yu et al. 2017), block.bootstrap's ``MFB``:
    ``linear0 (d0 → mm_dim·factor)``, ``linear1``, ``linear_out (mm_dim → output_dim)``;
    ``y = activ_output(linear_out(n(SumPool_factor(act(linear0(x0)) ⊙ act(linear1(x1))))))``."""

    def __init__(
        self,
        input_dims: Sequence[int],
        output_dim: int,
        mm_dim: int = 1200,
        factor: int = 2,
        activ_input: str | None = "relu",
        activ_output: str | None = "relu",
        normalize: bool = False,
        dropout_input: float = 0.0,
        dropout_pre_norm: float = 0.0,
        dropout_output: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_dims = _check_dims(name, input_dims, output_dim, mm_dim)
        _check_count(name, "factor", factor)
        self.output_dim, self.mm_dim, self.factor = int(output_dim), int(mm_dim), factor
        self.activ_input, self.activ_output, self.normalize = activ_input, activ_output, bool(normalize)
        self.dropout_input, self.dropout_pre_norm, self.dropout_output = (
            dropout_input,
            dropout_pre_norm,
            dropout_output,
        )
        self.dropout_pre_lin = 0.0  # MLB's; MFB has dropout_pre_norm instead
        self.linear0 = nn.Linear(self.input_dims[0], mm_dim * factor)
        self.linear1 = nn.Linear(self.input_dims[1], mm_dim * factor)
        self.linear_out = nn.Linear(mm_dim, output_dim)
        self._count()

    def _fused(self) -> bool:
        """Whether this call runs the fused op: its activation is a fused one."""
        return (self.activ_input or None) in ACTIVATIONS

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        x0, x1 = _pair(type(self).__name__, self.input_dims, x)
        params = (self.linear0.weight, self.linear0.bias, self.linear1.weight, self.linear1.bias,
                  self.linear_out.weight, self.linear_out.bias)  # fmt: skip
        if self._fused():
            z = mfb(
                x0, x1, *params, factor=self.factor, activation=self.activ_input or None,
                normalize=self.normalize,
                dropout_input=self._p(self.dropout_input), dropout_pre_norm=self._p(self.dropout_pre_norm),
                dropout_pre_lin=self._p(self.dropout_pre_lin),
            )  # fmt: skip
        else:
            z = reference.mfb(
                x0, x1, *params, self.factor, self.activ_input or None, self.normalize,
                dropout_input=self.dropout_input, dropout_pre_norm=self.dropout_pre_norm,
                dropout_pre_lin=self.dropout_pre_lin, training=self.training,
            )  # fmt: skip
        return self._dropout_out(_activation_out(z, self.activ_output))


class MLB(MFB):
    """Multimodal low-rank bilinear pooling (Kim et al. 2017), block.bootstrap's ``MLB``: MFB
    with ``factor = 1`` (``linear0 (d0 → mm_dim)``); Kim et al. use ``activ_input="tanh"``.
    ``dropout_pre_lin`` acts on ``z`` before ``linear_out`` (after ``normalize``)."""

    def __init__(
        self,
        input_dims: Sequence[int],
        output_dim: int,
        mm_dim: int = 1200,
        activ_input: str | None = "relu",
        activ_output: str | None = "relu",
        normalize: bool = False,
        dropout_input: float = 0.0,
        dropout_pre_lin: float = 0.0,
        dropout_output: float = 0.0,
    ) -> None:
        super().__init__(
            input_dims, output_dim, mm_dim, 1, activ_input, activ_output, normalize, dropout_input, 0.0,
            dropout_output,
        )  # fmt: skip
        self.dropout_pre_lin = dropout_pre_lin


class MFH(_Bilinear):
    """Multimodal factorized high-order pooling (Yu et al. 2018), block.bootstrap's ``MFH``:
    ``order`` (their 2) MFB blocks ``linear0_i``, ``linear1_i`` chained by products, then
    ``linear_out (order·mm_dim → output_dim)`` on ``cat(z_0 … z_{order−1})``."""

    def __init__(
        self,
        input_dims: Sequence[int],
        output_dim: int,
        mm_dim: int = 1200,
        factor: int = 2,
        activ_input: str | None = "relu",
        activ_output: str | None = "relu",
        normalize: bool = False,
        dropout_input: float = 0.0,
        dropout_pre_lin: float = 0.0,
        dropout_output: float = 0.0,
        *,
        order: int = 2,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_dims = _check_dims(name, input_dims, output_dim, mm_dim)
        _check_count(name, "factor", factor)
        _check_count(name, "order", order)
        self.output_dim, self.mm_dim, self.factor, self.order = int(output_dim), int(mm_dim), factor, order
        self.activ_input, self.activ_output, self.normalize = activ_input, activ_output, bool(normalize)
        self.dropout_input, self.dropout_pre_lin, self.dropout_output = (
            dropout_input,
            dropout_pre_lin,
            dropout_output,
        )
        for i in range(order):  # their names: linear0_0, linear1_0, linear0_1, linear1_1
            setattr(self, f"linear0_{i}", nn.Linear(self.input_dims[0], mm_dim * factor))
            setattr(self, f"linear1_{i}", nn.Linear(self.input_dims[1], mm_dim * factor))
        self.linear_out = nn.Linear(mm_dim * order, output_dim)
        self._count()

    _fused = MFB._fused

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        x0, x1 = _pair(type(self).__name__, self.input_dims, x)
        l0s = [getattr(self, f"linear0_{i}") for i in range(self.order)]
        l1s = [getattr(self, f"linear1_{i}") for i in range(self.order)]
        out = (self.linear_out.weight, self.linear_out.bias)
        if self._fused():
            z = mfh(
                x0, x1, torch.stack([m.weight for m in l0s]), torch.stack([m.bias for m in l0s]),
                torch.stack([m.weight for m in l1s]), torch.stack([m.bias for m in l1s]), *out,
                factor=self.factor, activation=self.activ_input or None, normalize=self.normalize,
                dropout_input=self._p(self.dropout_input), dropout_pre_lin=self._p(self.dropout_pre_lin),
            )  # fmt: skip
        else:
            z = reference.mfh(
                x0, x1, [m.weight for m in l0s], [m.bias for m in l0s], [m.weight for m in l1s],
                [m.bias for m in l1s], *out, self.factor, self.activ_input or None, self.normalize,
                dropout_input=self.dropout_input, dropout_pre_lin=self.dropout_pre_lin,
                training=self.training,
            )  # fmt: skip
        return self._dropout_out(_activation_out(z, self.activ_output))


class Mutan(_Bilinear):
    """MUTAN (Ben-younes et al. 2017), block.bootstrap's ``Mutan``: ``linear0/1 (d → mm_dim)``,
    ``merge_linear0/1 (mm_dim → mm_dim·rank)``, ``linear_out``; ``shared=True`` shares the
    modules of x1 with x0 (as theirs: both names stay in the state_dict). BLOCK with one chunk."""

    def __init__(
        self,
        input_dims: Sequence[int],
        output_dim: int,
        mm_dim: int = 1600,
        rank: int = 15,
        shared: bool = False,
        normalize: bool = False,
        dropout_input: float = 0.0,
        dropout_pre_lin: float = 0.0,
        dropout_output: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_dims = _check_dims(name, input_dims, output_dim, mm_dim)
        _check_count(name, "rank", rank)
        self.output_dim, self.mm_dim, self.rank, self.shared = int(output_dim), int(mm_dim), rank, shared
        self.normalize = bool(normalize)
        self.dropout_input, self.dropout_pre_lin, self.dropout_output = (
            dropout_input,
            dropout_pre_lin,
            dropout_output,
        )
        self.linear0 = nn.Linear(self.input_dims[0], mm_dim)
        self.merge_linear0 = nn.Linear(mm_dim, mm_dim * rank)
        if shared:
            self.linear1 = self.linear0
            self.merge_linear1 = self.merge_linear0
        else:
            self.linear1 = nn.Linear(self.input_dims[1], mm_dim)
            self.merge_linear1 = nn.Linear(mm_dim, mm_dim * rank)
        self.linear_out = nn.Linear(mm_dim, output_dim)
        self._count()

    def _merge(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        m0, m1 = self.merge_linear0, self.merge_linear1
        return m0.weight[None], m0.bias[None], m1.weight[None], m1.bias[None]

    def _normalize(self) -> str:
        return "after_cat" if self.normalize else "none"

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        x0, x1 = _pair(type(self).__name__, self.input_dims, x)
        x0, x1 = self.linear0(x0), self.linear1(x1)
        if self.dropout_input > 0:
            x0 = F.dropout(x0, p=self.dropout_input, training=self.training)
            x1 = F.dropout(x1, p=self.dropout_input, training=self.training)
        params = (*self._merge(), self.linear_out.weight, self.linear_out.bias)
        z = block_fusion(
            x0,
            x1,
            *params,
            rank=self.rank,
            normalize=self._normalize(),
            dropout_pre_lin=self._p(self.dropout_pre_lin),
        )
        return self._dropout_out(z)


class Block(Mutan):
    """BLOCK (Ben-younes et al. 2019), block.bootstrap's ``Block``: ``linear0/1 (d → mm_dim)``,
    ``merge_linears0/1[c] (s → s·rank)`` per chunk (``s = mm_dim / chunks``), ``linear_out``;
    ``pos_norm`` ``"before_cat"`` (theirs) or ``"after_cat"``."""

    def __init__(
        self,
        input_dims: Sequence[int],
        output_dim: int,
        mm_dim: int = 1600,
        chunks: int = 20,
        rank: int = 15,
        shared: bool = False,
        dropout_input: float = 0.0,
        dropout_pre_lin: float = 0.0,
        dropout_output: float = 0.0,
        pos_norm: str = "before_cat",
    ) -> None:
        nn.Module.__init__(self)
        name = type(self).__name__
        self.input_dims = _check_dims(name, input_dims, output_dim, mm_dim)
        _check_count(name, "rank", rank)
        _check_count(name, "chunks", chunks)
        if mm_dim % chunks != 0:
            raise ValueError(
                f"{name}: chunks must divide mm_dim (chunks of equal width), got chunks={chunks}, "
                f"mm_dim={mm_dim} (remainder {mm_dim % chunks})"
            )
        if pos_norm not in ("before_cat", "after_cat"):
            raise ValueError(f"{name}: pos_norm must be 'before_cat' or 'after_cat', got {pos_norm!r}")
        self.output_dim, self.mm_dim, self.chunks, self.rank = int(output_dim), int(mm_dim), chunks, rank
        self.shared, self.pos_norm = shared, pos_norm
        self.dropout_input, self.dropout_pre_lin, self.dropout_output = (
            dropout_input,
            dropout_pre_lin,
            dropout_output,
        )
        self.linear0 = nn.Linear(self.input_dims[0], mm_dim)
        self.linear1 = self.linear0 if shared else nn.Linear(self.input_dims[1], mm_dim)
        size = mm_dim // chunks
        self.sizes_list = [size] * chunks
        self.merge_linears0 = nn.ModuleList(nn.Linear(size, size * rank) for _ in range(chunks))
        self.merge_linears1 = (
            self.merge_linears0
            if shared
            else nn.ModuleList(nn.Linear(size, size * rank) for _ in range(chunks))
        )
        self.linear_out = nn.Linear(mm_dim, output_dim)
        self._count()

    def _merge(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        # The chunks' weights stacked (C, R·s, s): a copy of their size per call.
        def stack(ms: nn.ModuleList) -> tuple[Tensor, Tensor]:
            return torch.stack([m.weight for m in ms]), torch.stack([m.bias for m in ms])

        w0, b0 = stack(self.merge_linears0)
        w1, b1 = (w0, b0) if self.shared else stack(self.merge_linears1)
        return w0, b0, w1, b1

    def _normalize(self) -> str:
        return self.pos_norm
