"""Part (b): low-rank multimodal fusion (rank 4, one output) on the simulated regression task,
compared with tensor fusion on the same data.

Models (all trained the same way: AdamW, minibatches, MSE, last weights kept):

* ``lmf_direct``: ``fusionops.LowRankFusion((128, 64, 300), 1, rank=4)`` directly on the
  features: the source's set-up;
* ``lmf_encoded`` / ``tfn_encoded``: one ``Linear(d_m, width)`` encoder per modality, then
  ``LowRankFusion`` (rank 4) or projected ``TensorFusion`` on the encodings, so the two fusions
  differ in nothing else;
* ``tfn_direct``: projected ``TensorFusion((128, 64, 300), 1)`` (K = 129·65·301 = 2,523,885
  weights) is only timed (training steps on a few batches) and counted, not trained (see the
  README).

Every model's time per epoch is measured apart from training, interleaved and best of a few
rounds (:func:`time_models`), so that load from other jobs does not decide the comparison.

Ridge regression on the concatenated features (penalty chosen on the validation rows) gives the
linear baseline's test R²."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import fusionops
from experiments.mkl_lmf import data

MODELS = ("lmf_direct", "lmf_encoded", "tfn_encoded")


@dataclass(frozen=True)
class LMFConfig:
    n_train: int = 1500
    n_val: int = 500
    n_test: int = 1000
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    rank: int = 4
    width: int = 16  # encoder width of the *_encoded models
    tfn_timing_batches: int = 4  # batches of batch_size rows timed for tfn_direct (0: skip)
    timing_batches: int = 8  # batches timed for each trained model
    timing_rounds: int = 3
    task: data.SimulatedRegression = data.SimulatedRegression()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Encoded(nn.Module):
    """One linear encoder per modality, then a fusion layer."""

    def __init__(self, dims: Sequence[int], width: int, fusion: nn.Module) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(nn.Linear(d, width) for d in dims)
        self.fusion = fusion

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        return self.fusion([enc(x) for enc, x in zip(self.encoders, xs, strict=True)])


def build_model(name: str, cfg: LMFConfig) -> nn.Module:
    enc = (cfg.width,) * len(data.DIMS)
    if name == "lmf_direct":
        return fusionops.LowRankFusion(data.DIMS, 1, cfg.rank)
    if name == "lmf_encoded":
        return Encoded(data.DIMS, cfg.width, fusionops.LowRankFusion(enc, 1, cfg.rank))
    if name == "tfn_encoded":
        return Encoded(data.DIMS, cfg.width, fusionops.TensorFusion(enc, 1))
    if name == "tfn_direct":
        return fusionops.TensorFusion(data.DIMS, 1)
    raise ValueError(f"unknown model {name!r}; expected one of {(*MODELS, 'tfn_direct')}")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mse(model: nn.Module, xs: list[Tensor], y: Tensor) -> float:
    with torch.no_grad():
        return float(((model(xs)[:, 0] - y) ** 2).mean())


def train(name: str, cfg: LMFConfig, split: dict[str, data.MultiView], seed: int) -> dict[str, Any]:
    """Train one model; per-epoch training loss (mean of the epoch's batch losses) and
    validation MSE (after the epoch; entry 0 is before training), seconds per epoch (training
    steps only), test MSE and R² of the last weights."""
    torch.manual_seed(seed)
    model = build_model(name, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr, va, te = split["train"], split["val"], split["test"]
    order = torch.Generator().manual_seed(seed)
    train_loss: list[float] = []
    val_mse = [_mse(model, va.views, va.labels)]
    seconds: list[float] = []
    n = len(tr)
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        perm = torch.randperm(n, generator=order)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = ((model([x[idx] for x in tr.views])[:, 0] - tr.labels[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        seconds.append(time.perf_counter() - start)
        train_loss.append(total / n)
        val_mse.append(_mse(model, va.views, va.labels))
    test_mse = _mse(model, te.views, te.labels)
    return {
        "seed": seed,
        "train_loss": train_loss,
        "val_mse": val_mse,
        "epoch_seconds": seconds,
        "test_mse": test_mse,
        "test_r2": 1 - test_mse / float(te.labels.var(unbiased=False)),
        "params": parameter_count(model),
    }


def _time_steps(model: nn.Module, tr: data.MultiView, batches: int, batch_size: int) -> float:
    """Seconds per row of ``batches`` AdamW training steps (forward, backward, update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    start = time.perf_counter()
    rows = 0
    for b in range(batches):
        idx = torch.arange(b * batch_size, (b + 1) * batch_size) % len(tr)
        loss = ((model([x[idx] for x in tr.views])[:, 0] - tr.labels[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows += len(idx)
    return (time.perf_counter() - start) / rows


def time_models(cfg: LMFConfig, tr: data.MultiView, seed: int) -> dict[str, Any]:
    """Seconds per epoch of ``n_train`` rows for every model, tensor fusion on the raw features
    included: ``timing_rounds`` rounds, the models interleaved within a round, best round kept
    (on a shared machine the minimum is the least disturbed measurement). The trained models
    are timed on ``timing_batches`` batches, ``tfn_direct`` on ``tfn_timing_batches``."""
    torch.manual_seed(seed)
    names = (*MODELS, "tfn_direct") if cfg.tfn_timing_batches > 0 else MODELS
    models = {name: build_model(name, cfg) for name in names}
    best = {name: float("inf") for name in names}
    for _ in range(cfg.timing_rounds):
        for name, model in models.items():
            batches = cfg.tfn_timing_batches if name == "tfn_direct" else cfg.timing_batches
            best[name] = min(best[name], _time_steps(model, tr, batches, cfg.batch_size))
    return {
        name: {"epoch_seconds": best[name] * cfg.n_train, "params": parameter_count(models[name])}
        for name in names
    }


RIDGE_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0, 1e4, 1e5)


def linear_baseline(split: dict[str, data.MultiView]) -> dict[str, float]:
    """Ridge regression on the concatenated features (intercept unpenalized by centring), its
    penalty chosen from ``RIDGE_GRID`` on the validation rows: test R² and the penalty."""
    tr = split["train"]
    x_mean = torch.cat(tr.views, 1).double().mean(0)
    y_mean = float(tr.labels.double().mean())

    def design(v: data.MultiView) -> Tensor:
        return torch.cat(v.views, 1).double() - x_mean

    def r2(w: Tensor, v: data.MultiView) -> float:
        y = v.labels.double()
        resid = float((design(v) @ w + y_mean - y).pow(2).mean())
        return 1 - resid / float(y.var(unbiased=False))

    x = design(tr)
    gram, rhs = x.T @ x, x.T @ (tr.labels.double() - y_mean)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    fits = {lam: torch.linalg.solve(gram + lam * eye, rhs) for lam in RIDGE_GRID}
    best = max(fits, key=lambda lam: r2(fits[lam], split["val"]))
    return {"test_r2": r2(fits[best], split["test"]), "penalty": best}


MAX_RISE = 0.05  # "falls steadily": no epoch-to-epoch rise above 5 % …
END_RATIO = 0.25  # … and the last epoch's loss at most 0.25 × the first's


def steady_fall(
    curve: Sequence[float], max_rise: float = MAX_RISE, ratio: float = END_RATIO
) -> dict[str, Any]:
    """The README's definition of "the loss falls steadily": no epoch-to-epoch rise of more than
    ``max_rise`` (relative), and the last value at most ``ratio`` × the first. Also reports the
    share of epochs in which it fell and the largest relative rise."""
    pairs = list(zip(curve, curve[1:], strict=False))
    frac = sum(b < a for a, b in pairs) / len(pairs) if pairs else 1.0
    rise = max([b / a - 1 for a, b in pairs if a > 0] + [0.0])
    end = curve[-1] / curve[0] if curve and curve[0] > 0 else float("nan")
    steady = rise <= max_rise and end <= ratio
    return {"share_falling": frac, "max_rise": rise, "last_over_first": end, "steady": steady}


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def run_lmf(cfg: LMFConfig, seeds: list[int], log: Callable[[str], None]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODELS}
    linear: list[float] = []
    timing: dict[str, Any] = {}
    for seed in seeds:
        full = cfg.task.make(cfg.n_train + cfg.n_val + cfg.n_test, seed)
        idx = torch.arange(len(full))
        split = {
            "train": full.take(idx[: cfg.n_train]),
            "val": full.take(idx[cfg.n_train : cfg.n_train + cfg.n_val]),
            "test": full.take(idx[cfg.n_train + cfg.n_val :]),
        }
        base = linear_baseline(split)
        linear.append(base["test_r2"])
        for name in MODELS:
            run = train(name, cfg, split, seed)
            runs[name].append(run)
            log(
                f"  {name} seed {seed}: test MSE {run['test_mse']:.3f}, R² {run['test_r2']:.3f}, "
                f"{statistics.median(run['epoch_seconds']):.2f} s/epoch"
            )
        if not timing:
            timing = time_models(cfg, split["train"], seed)
            shown = ", ".join(f"{k} {v['epoch_seconds']:.2f}" for k, v in timing.items())
            log(f"  timed (best of {cfg.timing_rounds}, s per epoch): {shown}")
    summary = {
        name: {
            "params": rs[0]["params"],
            "test_mse": _mean_sd([r["test_mse"] for r in rs]),
            "test_r2": _mean_sd([r["test_r2"] for r in rs]),
            "epoch_seconds": _mean_sd([statistics.median(r["epoch_seconds"]) for r in rs]),
            "final_train_loss": _mean_sd([r["train_loss"][-1] for r in rs]),
            "steady": [steady_fall(r["train_loss"]) for r in rs],
        }
        for name, rs in runs.items()
    }
    return {
        "runs": runs,
        "summary": summary,
        "linear_r2": _mean_sd(linear),
        "linear_r2_seeds": linear,
        "best_r2": 1 - cfg.task.noise,
        "timing": timing,
        "tfn_direct": {
            "params": parameter_count(build_model("tfn_direct", cfg)),
            "K": int(torch.tensor([d + 1 for d in data.DIMS]).prod()),
            "epoch_seconds": timing.get("tfn_direct", {}).get("epoch_seconds"),
        },
        "claim_steady": all(s["steady"] for s in summary["lmf_direct"]["steady"]),
    }
