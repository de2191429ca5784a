"""The paper's classifier:
fusion → Linear(fusion_dim, hidden) → ReLU → Linear(hidden, hidden) → Linear(hidden, 2).

Fusion layers (all from ``fusionops``) and their ``fusion_dim``:

* ``concat``: :class:`fusionops.Concat`, ``d_img + d_text``.
* ``product``: ``paper_faithful=True``: :class:`fusionops.ProductConcat` (the paper's layer,
  batch flip included), ``2 d``; else the per-sample :class:`fusionops.ProductFusion`
  ``v ⊙ t``, ``d`` (the flipped half pairs a sample with another sample's text, so a
  per-sample model drops it). Both need ``d_img == d_text``.
* ``tensorfusion``: the paper uses the features layer ``TensorFusion()`` with
  ``fusion_dim = (d_img + 1)(d_text + 1)`` (591,361 at 768-d) followed by
  ``Linear(fusion_dim, hidden)``. We use the projected ``TensorFusion(input_dims, hidden)``,
  which computes exactly that composition (features then ``Linear(K, hidden)``, same
  initialisation) without materialising the ``(N, K)`` features; ``fusion_dim`` reports the
  paper's ``K`` and ``project`` is the identity (the first Linear lives in the fusion layer).
* ``lowrank``: :class:`fusionops.LowRankFusion` ``(input_dims, lowrank_dim, rank)``,
  ``fusion_dim = lowrank_dim``.
* the bilinear family (issue 20; not in the paper): ``mfb``, ``mfh`` (:class:`fusionops.MFB`,
  :class:`fusionops.MFH`: ``mm_dim``, ``factor``), ``mutan`` (:class:`fusionops.Mutan`:
  ``mm_dim``, ``rank``) and ``block`` (:class:`fusionops.Block`: ``mm_dim``, ``chunks``,
  ``rank``), block.bootstrap's layers with their default options; each ends in its own output
  projection to ``hidden`` (so ``project`` is the identity), ``fusion_dim = hidden``.
"""

from __future__ import annotations

from torch import Tensor, nn

import fusionops
from experiments.tweet.config import BILINEAR_FUSIONS, FUSIONS


class FusionClassifier(nn.Module):
    """Fusion layer and the paper's 3-layer head; ``forward(img, text)`` returns logits ``(N, 2)``."""

    def __init__(
        self,
        fusion: str,
        img_dim: int,
        text_dim: int,
        *,
        hidden: int = 32,
        rank: int = 4,
        lowrank_dim: int = 32,
        mm_dim: int = 64,
        factor: int = 2,
        chunks: int = 4,
        paper_faithful: bool = False,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"FusionClassifier: unknown fusion {fusion!r}; valid: {FUSIONS}")
        self.fusion_name = fusion
        self.paper_faithful = bool(paper_faithful)
        self.project: nn.Module
        if fusion == "concat":
            self.fusion: nn.Module = fusionops.Concat()
            self.fusion_dim = img_dim + text_dim
        elif fusion == "product":
            if img_dim != text_dim:
                raise ValueError(
                    "FusionClassifier: product fusion needs equal modality widths, got "
                    f"img_dim={img_dim}, text_dim={text_dim} (project them to one width first)"
                )
            if paper_faithful:
                self.fusion = fusionops.ProductConcat()
                self.fusion_dim = 2 * img_dim
            else:
                self.fusion = fusionops.ProductFusion()
                self.fusion_dim = img_dim
        elif fusion == "tensorfusion":
            self.fusion = fusionops.TensorFusion([img_dim, text_dim], hidden)
            self.fusion_dim = (img_dim + 1) * (text_dim + 1)
            self.project = nn.Identity()
        elif fusion in BILINEAR_FUSIONS:
            dims = [img_dim, text_dim]
            if fusion == "mfb":
                self.fusion = fusionops.MFB(dims, hidden, mm_dim=mm_dim, factor=factor)
            elif fusion == "mfh":
                self.fusion = fusionops.MFH(dims, hidden, mm_dim=mm_dim, factor=factor)
            elif fusion == "mutan":
                self.fusion = fusionops.Mutan(dims, hidden, mm_dim=mm_dim, rank=rank)
            else:
                self.fusion = fusionops.Block(dims, hidden, mm_dim=mm_dim, chunks=chunks, rank=rank)
            self.fusion_dim = hidden
            self.project = nn.Identity()
        else:
            self.fusion = fusionops.LowRankFusion([img_dim, text_dim], lowrank_dim, rank)
            self.fusion_dim = lowrank_dim
        if fusion not in ("tensorfusion", *BILINEAR_FUSIONS):
            self.project = nn.Linear(self.fusion_dim, hidden)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.Linear(hidden, 2))

    @property
    def batch_dependent(self) -> bool:
        """Whether a sample's output depends on its batch mates (the paper's ProductConcat)."""
        return isinstance(self.fusion, fusionops.ProductConcat)

    def forward(self, img: Tensor, text: Tensor) -> Tensor:
        return self.head(self.project(self.fusion([img, text])))
