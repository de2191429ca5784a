"""Training and evaluation: :func:`main_train`, :func:`evaluate`, :func:`roc_auc`.

The paper's procedure: AdamW(lr, weight_decay); seeded shuffled mini-batches; stop when the
(population) standard deviation of the last ``stop_window`` epoch losses is <= ``stop_std`` or
after ``max_epochs``; keep the checkpoint with the best validation accuracy (first epoch on
ties) and load it at the end; report test accuracy, log loss and ROC AUC.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from experiments.atomic import write_json as write_json_atomic
from experiments.tweet.config import TweetConfig, load_config
from experiments.tweet.data import Split, TweetData, load_data
from experiments.tweet.model import FusionClassifier

MODALITIES = ("img", "text")
LOG_LOSS_EPS = 1e-15
VAL_SEED_OFFSET = 7_919  # the validation subset's generator: seed + this (not the training subset's)


@dataclass
class TrainResult:
    """What one run produced. ``to_dict()`` is the JSON form (everything but the model)."""

    config: TweetConfig
    synth: bool
    seed: int
    train_size: int
    epochs: int
    epoch_losses: list[float]
    val_accuracies: list[float]
    best_epoch: int
    n_val: int
    test_metrics: dict[str, float]
    model: nn.Module | None = field(default=None, repr=False)
    out_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result without the model, JSON-serialisable."""
        return {
            "config": self.config.to_dict(),
            "synth": self.synth,
            "seed": self.seed,
            "train_size": self.train_size,
            "epochs": self.epochs,
            "epoch_losses": self.epoch_losses,
            "val_accuracies": self.val_accuracies,
            "best_epoch": self.best_epoch,
            "n_val": self.n_val,
            "test_metrics": self.test_metrics,
        }


def roc_auc(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """ROC AUC by ranks (Mann-Whitney U), tied scores sharing their average rank; NaN if one class."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each group of ties
    average = last - (counts - 1) / 2  # the group's average 1-based rank
    ranks = average[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def loss_fn(logits: Tensor, labels: Tensor, paper_faithful: bool) -> Tensor:
    """``CrossEntropyLoss(logits)``, or the paper's ``CrossEntropyLoss(softmax(logits))`` (double softmax)."""
    if paper_faithful:
        return nn.functional.cross_entropy(torch.softmax(logits, dim=1), labels)
    return nn.functional.cross_entropy(logits, labels)


def _noisy_inputs(split: Split, sigma: float, noisy: Sequence[str], seed: int) -> tuple[Tensor, Tensor]:
    if isinstance(noisy, str):
        noisy = (noisy,)
    bad = [m for m in noisy if m not in MODALITIES]
    if bad:
        raise ValueError(f"evaluate: noisy names unknown modalities {bad}; valid: {MODALITIES}")
    if sigma < 0:
        raise ValueError(f"evaluate: noise_sigma must be >= 0, got {sigma}")
    img, text = split.img, split.text
    if sigma == 0:
        return img, text
    g = torch.Generator().manual_seed(int(seed))
    # both draws always happen (img first) so the img noise is the same whether text is noisy or not
    n_img = torch.randn(img.shape, generator=g, dtype=img.dtype) * sigma
    n_text = torch.randn(text.shape, generator=g, dtype=text.dtype) * sigma
    return (img + n_img if "img" in noisy else img), (text + n_text if "text" in noisy else text)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    noise_sigma: float = 0.0,
    noisy: Sequence[str] = MODALITIES,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Accuracy, log loss and ROC AUC on ``split``, with Gaussian noise of std ``noise_sigma`` added
    to the modalities in ``noisy`` (seeded by ``seed``). Also returns ``probs`` (N,) = P(class 1)
    and ``labels`` (N,) as numpy arrays. The batch size matters only for the batch-dependent
    ``ProductConcat`` (``paper_faithful``); ``batch_size=None`` uses the model's
    ``eval_batch_size`` (set by :func:`main_train`: the training batch size for a batch-dependent
    model, ``None`` otherwise), and ``None`` runs the split as one batch.
    """
    img, text = _noisy_inputs(split, float(noise_sigma), noisy, seed)
    logits = _logits(model, img, text, batch_size)
    probs2 = torch.softmax(logits.double(), dim=1)
    labels = split.label
    p_true = probs2.gather(1, labels[:, None]).squeeze(1).clamp(LOG_LOSS_EPS, 1.0)
    return {
        "accuracy": float((probs2.argmax(1) == labels).double().mean()),
        "log_loss": float(-p_true.log().mean()),
        "roc_auc": roc_auc(probs2[:, 1], labels),
        "probs": probs2[:, 1].numpy(),
        "labels": labels.numpy(),
    }


def _logits(model: nn.Module, img: Tensor, text: Tensor, batch_size: int | None) -> Tensor:
    was_training = model.training
    model.eval()
    if batch_size is None:
        batch_size = getattr(model, "eval_batch_size", None)
    n = int(img.shape[0])
    step = max(n if batch_size is None else int(batch_size), 1)
    with torch.no_grad():
        logits = torch.cat([model(img[i : i + step], text[i : i + step]) for i in range(0, n, step)])
    model.train(was_training)
    return logits


def _accuracy(model: nn.Module, split: Split) -> float:
    """Accuracy only (the per-epoch validation check: no log loss or ROC AUC)."""
    logits = _logits(model, split.img, split.text, None)
    return float((logits.argmax(1) == split.label).double().mean())


def validation_subset(val: Split, size: int | None, seed: int) -> Split:
    """The first ``size`` examples of a seeded permutation of ``val`` (nested across sizes for
    one seed; the permutation's stream differs from the training subset's), or all of it."""
    if size is None or size >= len(val):
        return val
    if size < 1:
        raise ValueError(f"validation size must be >= 1, got {size}")
    perm = torch.randperm(len(val), generator=torch.Generator().manual_seed(VAL_SEED_OFFSET + int(seed)))
    return val.select(perm[:size])


def _result_path(out: Path, cfg: TweetConfig, synth: bool, train_size: int, seed: int) -> Path:
    if out.suffix == ".json":
        return out
    kind = "synth" if synth else "real"
    faithful = "_paper" if cfg.paper_faithful else ""
    return out / f"{cfg.fusion}{faithful}_{kind}_n{train_size}_seed{seed}.json"


def main_train(
    config: str | Path | dict | TweetConfig,
    synth: bool,
    *,
    data: TweetData | None = None,
    train_size: int | None = None,
    seed: int | None = None,
    out: Path | None = None,
    val_size: int | None = None,
) -> TrainResult:
    """Train one model as the paper does and test it.

    ``config``: a :class:`TweetConfig`, a dict, or a YAML path/bare name in ``configs/``.
    ``synth``: synthetic (``config.synthetic``) or real data (``config.data_dir``); ignored
    when ``data`` is given. ``train_size``: train on a seeded random subset of this many
    training samples (nested across sizes for one seed). ``seed``: overrides ``config.seed``.
    ``out``: a ``.json`` file, or a folder receiving
    ``{fusion}[_paper]_{synth|real}_n{train_size}_seed{seed}.json``, written atomically.
    ``val_size``: choose the best epoch on a seeded subset of this many validation examples
    (:func:`validation_subset`) instead of the whole validation split.
    """
    cfg = load_config(config)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    seed = cfg.seed
    if data is None:
        data = load_data(cfg, synth)
    train = data.train
    if train_size is not None:
        if not 1 <= int(train_size) <= len(train):
            raise ValueError(f"main_train: train_size must be in [1, {len(train)}], got {train_size}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        train = train.select(perm[: int(train_size)])
    val = validation_subset(data.val, val_size, seed)
    torch.manual_seed(seed)
    model = FusionClassifier(
        cfg.fusion,
        train.img.shape[1],
        train.text.shape[1],
        hidden=cfg.hidden,
        rank=cfg.rank,
        lowrank_dim=cfg.lowrank_dim,
        mm_dim=cfg.mm_dim,
        factor=cfg.factor,
        chunks=cfg.chunks,
        paper_faithful=cfg.paper_faithful,
    )
    # only the batch-flipping ProductConcat depends on the batch: evaluate it in training-size batches
    model.eval_batch_size = cfg.batch_size if model.batch_dependent else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    losses: list[float] = []
    val_accs: list[float] = []
    best_acc, best_epoch, best_state = -math.inf, -1, None
    for epoch in range(cfg.max_epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = loss_fn(model(train.img[idx], train.text[idx]), train.label[idx], cfg.paper_faithful)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        val_acc = _accuracy(model, val)
        val_accs.append(val_acc)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        window = losses[-cfg.stop_window :]
        if len(window) == cfg.stop_window and float(np.std(window)) <= cfg.stop_std:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    metrics = evaluate(model, data.test)
    result = TrainResult(
        config=cfg,
        synth=bool(synth),
        seed=seed,
        train_size=n,
        epochs=len(losses),
        epoch_losses=losses,
        val_accuracies=val_accs,
        best_epoch=best_epoch,
        n_val=len(val),
        test_metrics={k: metrics[k] for k in ("accuracy", "log_loss", "roc_auc")},
        model=model,
    )
    if out is not None:
        path = _result_path(Path(out), cfg, bool(synth), n, seed)
        write_json_atomic(path, result.to_dict())
        result.out_path = str(path)
    return result
