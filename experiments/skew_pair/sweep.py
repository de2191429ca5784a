"""Train one fusion head per (skew, density, seed) on cached layer summaries.

The model is ``EncoderStacks`` (a learned projection of each encoder's summaries to ``dim``)
→ ``SkewPairFusion`` over the configuration's pairs → a two-layer classifier. The encoders
are not part of it: their summaries are computed once (``encoders.py``) and shared.

The late-fusion baseline (:class:`LateFusionClassifier`, ``pairs=None`` in :func:`train_head`)
replaces the pair fusion by the concatenated final-layer summaries of both encoders and a
``Linear(2 dim, dim)``, then the same classifier; the pairwise baseline is the skew-pair model
on every aligned pair ``(i, i)`` (skew 0, density 1).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

import fusionops


@dataclass(frozen=True)
class TrainConfig:
    """Fusion head and optimiser settings (AdamW with a one-cycle schedule, a fixed number of
    epochs, the last epoch's weights kept)."""

    dim: int = 32
    heads: int = 4
    window: int = 0
    dropout: float = 0.1
    hidden: int = 32
    epochs: int = 25
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-2

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Stacks:
    """Standardised summaries ``a (N, La, Wa)``, ``b (N, Lb, Wb)``, labels ``(N,)`` and the
    row indices of the three splits."""

    a: Tensor
    b: Tensor
    label: Tensor
    train: Tensor
    val: Tensor
    test: Tensor

    @property
    def depths(self) -> tuple[int, int]:
        return int(self.a.shape[1]), int(self.b.shape[1])


class FusionClassifier(nn.Module):
    """``EncoderStacks`` → ``SkewPairFusion`` over ``pairs`` → ``Linear-GELU-Linear`` to 2 logits."""

    def __init__(self, width_a: int, width_b: int, pairs: Tensor, cfg: TrainConfig) -> None:
        super().__init__()
        self.stacks = fusionops.EncoderStacks(width_a, width_b, cfg.dim)
        self.fusion = fusionops.SkewPairFusion(
            cfg.dim, pairs, heads=cfg.heads, window=cfg.window, dropout=cfg.dropout
        )
        self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 2))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ha, hb = self.stacks(a, b)
        return self.head(self.fusion(ha, hb))


class LateFusionClassifier(nn.Module):
    """``EncoderStacks`` → final layer of each → ``cat`` → ``Linear(2 dim, dim)`` → the same
    ``Linear-GELU-Linear`` classifier as :class:`FusionClassifier`."""

    def __init__(self, width_a: int, width_b: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.stacks = fusionops.EncoderStacks(width_a, width_b, cfg.dim)
        self.fusion = nn.Linear(2 * cfg.dim, cfg.dim)
        self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 2))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ha, hb = self.stacks(a, b)
        return self.head(self.fusion(torch.cat([ha[:, -1], hb[:, -1]], dim=-1)))


@dataclass
class RunResult:
    """One trained head: accuracies and the per-example validation outcomes (0/1)."""

    pairs: list[tuple[int, int]]
    seed: int
    val_acc: float
    test_acc: float
    train_acc: float
    seconds: float
    val_correct: np.ndarray = field(repr=False)


@torch.no_grad()
def _predict(model: nn.Module, stacks: Stacks, rows: Tensor, batch_size: int = 2048) -> Tensor:
    model.eval()
    out = [model(stacks.a[chunk], stacks.b[chunk]).argmax(dim=1) for chunk in rows.split(batch_size)]
    return torch.cat(out)


def train_head(stacks: Stacks, pairs: Tensor | None, seed: int, cfg: TrainConfig) -> RunResult:
    """Train a fresh head for ``pairs`` (``None``: the late-fusion baseline) with seed ``seed``;
    evaluate on validation and test."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    width_a, width_b = stacks.a.shape[2], stacks.b.shape[2]
    model: nn.Module = (
        LateFusionClassifier(width_a, width_b, cfg)
        if pairs is None
        else FusionClassifier(width_a, width_b, pairs, cfg)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(stacks.train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(cfg.epochs):
        model.train()
        order = stacks.train[torch.randperm(len(stacks.train), generator=gen)]
        for rows in order.split(cfg.batch_size):
            loss = loss_fn(model(stacks.a[rows], stacks.b[rows]), stacks.label[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    correct = {
        name: (_predict(model, stacks, rows) == stacks.label[rows])
        for name, rows in (("train", stacks.train), ("val", stacks.val), ("test", stacks.test))
    }
    return RunResult(
        pairs=[] if pairs is None else [tuple(p) for p in pairs.tolist()],
        seed=seed,
        val_acc=float(correct["val"].float().mean()),
        test_acc=float(correct["test"].float().mean()),
        train_acc=float(correct["train"].float().mean()),
        seconds=time.perf_counter() - start,
        val_correct=correct["val"].numpy().astype(np.float64),
    )


@dataclass
class ConfigResult:
    """All seeds of one (skew, density) configuration."""

    skew: int
    density: float
    pairs: list[tuple[int, int]]
    runs: list[RunResult]

    def summary(self) -> dict[str, object]:
        """Mean and standard deviation over seeds of the accuracies, and the time spent."""
        row: dict[str, object] = {
            "skew": self.skew,
            "density": self.density,
            "n_pairs": len(self.pairs),
            "pairs": [list(p) for p in self.pairs],
        }
        for split in ("val", "test", "train"):
            accs = np.array([getattr(r, f"{split}_acc") for r in self.runs])
            row[f"{split}_acc"] = float(accs.mean())
            row[f"{split}_acc_std"] = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
            row[f"{split}_acc_seeds"] = [float(x) for x in accs]
        row["seconds"] = float(sum(r.seconds for r in self.runs))
        return row

    def val_outcomes(self) -> np.ndarray:
        """Per validation example: the fraction of seeds that classify it correctly."""
        return np.mean([r.val_correct for r in self.runs], axis=0)
