"""The whole study: task → frozen encoders → probes → sweep → selection → JSON, markdown, PNG."""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import Tensor

import fusionops
from experiments import atomic
from experiments.skew_pair import encoders, probes, report, sweep, task
from experiments.skew_pair.plots import density_label, plot_study

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_DENSITIES = (1 / 12, 3 / 12, 5 / 12)


@dataclass(frozen=True)
class StudyConfig:
    """Everything a run depends on (all seeds derive from ``seed``: data ``seed``, encoder
    weights ``seed + 1``, fusion heads ``seed + 100 + k`` for ``k < n_seeds``, bootstrap
    ``seed``)."""

    task: task.TaskConfig = field(default_factory=task.TaskConfig)
    encoders: encoders.EncoderConfig = field(default_factory=encoders.EncoderConfig)
    train: sweep.TrainConfig = field(default_factory=sweep.TrainConfig)
    n_train: int = 2000
    n_val: int = 1000
    n_test: int = 1000
    skews: tuple[int, ...] = tuple(range(-4, 9))
    densities: tuple[float, ...] = PAPER_DENSITIES
    n_seeds: int = 2
    seed: int = 0
    n_boot: int = 1000
    dense_reference: bool = True
    workers: int = 2
    threads: int = 1
    backend: str | None = None

    @classmethod
    def quick(cls, **changes: Any) -> StudyConfig:
        """A one-minute version: fewer examples, one seed, every other skew, shorter training."""
        base = cls(
            n_train=1000,
            n_val=500,
            n_test=500,
            skews=tuple(range(-4, 9, 2)),
            n_seeds=1,
            dense_reference=False,
            train=sweep.TrainConfig(epochs=20, batch_size=128, lr=3e-3),
        )
        return replace(base, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.to_dict() if hasattr(value, "to_dict") else value
        out["skews"], out["densities"] = list(self.skews), list(self.densities)
        return out


# Worker state: set by _init_worker in each process (inherited through fork, not pickled).
_WORKER: dict[str, Any] = {}


def _init_worker(stacks: sweep.Stacks, cfg: sweep.TrainConfig, backend: str | None, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(stacks=stacks, cfg=cfg, backend=backend)


def _job(
    key: tuple[int, float], pairs: list[tuple[int, int]], seed: int
) -> tuple[tuple[int, float], sweep.RunResult]:
    with fusionops.backend(_WORKER["backend"]):
        result = sweep.train_head(_WORKER["stacks"], torch.tensor(pairs), seed, _WORKER["cfg"])
    return key, result


def _train_all(
    stacks: sweep.Stacks,
    configs: Sequence[tuple[int, float, list[tuple[int, int]]]],
    seeds: Sequence[int],
    cfg: StudyConfig,
    log: Callable[[str], None],
) -> dict[tuple[int, float], sweep.ConfigResult]:
    """Train every configuration for every seed, ``cfg.workers`` processes at a time (forked, so
    the stacks are shared, not copied; one process where fork is unavailable). Every run seeds
    itself, so the results do not depend on the number of workers."""
    results = {(s, d): sweep.ConfigResult(s, d, pairs, []) for s, d, pairs in configs}
    jobs = [((s, d), pairs, seed) for s, d, pairs in configs for seed in seeds]
    initargs = (stacks, cfg.train, cfg.backend, cfg.threads)

    def done(key: tuple[int, float], run: sweep.RunResult) -> None:
        entry = results[key]
        entry.runs.append(run)
        if len(entry.runs) == len(seeds):
            entry.runs.sort(key=lambda r: r.seed)
            s = entry.summary()
            log(
                f"  skew {key[0]:+d} η {density_label(key[1])} ({s['n_pairs']} pairs): "
                f"val {s['val_acc']:.3f} "
                f"test {s['test_acc']:.3f} ± {s['test_acc_std']:.3f} ({s['seconds']:.1f} s)"
            )

    if cfg.workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        _init_worker(*initargs)
        for job in jobs:
            done(*_job(*job))
    else:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(
            cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=initargs
        ) as pool:
            for future in as_completed([pool.submit(_job, *job) for job in jobs]):
                done(*future.result())
    return results


def _stacks(
    cfg: StudyConfig, data: task.Task, log: Callable[[str], None]
) -> tuple[sweep.Stacks, dict[str, float]]:
    """Run the frozen encoders once; standardise their summaries with training statistics."""
    start = time.perf_counter()
    length = max(cfg.task.length("a"), cfg.task.length("b"))
    model_a, model_b = encoders.build_encoders(cfg.encoders, cfg.task.vocab_size, length, cfg.seed + 1)
    built = time.perf_counter()
    raw_a = encoders.summaries(model_a, data.tokens_a, cfg.task.radius_a, cfg.encoders.batch_size)
    raw_b = encoders.summaries(model_b, data.tokens_b, cfg.task.radius_b, cfg.encoders.batch_size)
    ran = time.perf_counter()
    n1, n2 = cfg.n_train, cfg.n_train + cfg.n_val
    train, val, test = torch.arange(n1), torch.arange(n1, n2), torch.arange(n2, len(data))
    stacks = sweep.Stacks(
        encoders.standardize(raw_a, train), encoders.standardize(raw_b, train), data.label, train, val, test
    )
    log(
        f"encoders: A {type(model_a).__name__} {tuple(raw_a.shape)}, B {type(model_b).__name__} "
        f"{tuple(raw_b.shape)} (built in {built - start:.1f} s, run in {ran - built:.1f} s)"
    )
    return stacks, {"build_s": built - start, "extract_s": ran - built}


def _selection(
    results: dict[tuple[int, float], sweep.ConfigResult], depths: tuple[int, int], cfg: StudyConfig
) -> fusionops.SkewPairSelection:
    by_pairs = {tuple(map(tuple, r.pairs)): r for r in results.values()}

    def score(pairs: Tensor) -> np.ndarray:
        return by_pairs[tuple(map(tuple, pairs.tolist()))].val_outcomes()

    return fusionops.select_skew_pairs(
        score, depths[0], depths[1], list(cfg.skews), list(cfg.densities), n_boot=cfg.n_boot, seed=cfg.seed
    )


def _jsonable_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["pairs"] = [list(p) for p in row.get("pairs", ())]
    return out


def run_study(cfg: StudyConfig, out: Path = RESULTS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the study and write ``results.json``, ``results.md`` and ``sweep.png`` into ``out``."""
    wall = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_val + cfg.n_test
    data = task.make_task(cfg.task, n, cfg.seed)
    log(
        f"task: {n} examples (A {cfg.task.length('a')} tokens, bit at layer {cfg.task.depth_a}; "
        f"B {cfg.task.length('b')} tokens, bit at layer {cfg.task.depth_b}); Bayes accuracy "
        f"{task.bayes_accuracy(cfg.task):.3f}"
    )
    stacks, timings = _stacks(cfg, data, log)
    depths = stacks.depths
    for label, depth, layers in (
        ("depth_a", cfg.task.depth_a, depths[0]),
        ("depth_b", cfg.task.depth_b, depths[1]),
    ):
        if depth >= layers:
            raise ValueError(f"task.{label} = {depth} is not a layer of a {layers}-layer encoder")

    probe = {
        "bit a from A": probes.layer_probe(stacks.a, data.bit_a, stacks.train, stacks.val),
        "bit b from B": probes.layer_probe(stacks.b, data.bit_b, stacks.train, stacks.val),
        "label from A": probes.layer_probe(stacks.a, data.label, stacks.train, stacks.val),
        "label from B": probes.layer_probe(stacks.b, data.label, stacks.train, stacks.val),
    }
    readable = probes.xor_ceiling(max(probe["bit a from A"]), max(probe["bit b from B"]))
    log(f"probes: best bit a {max(probe['bit a from A']):.3f}, bit b {max(probe['bit b from B']):.3f}")

    configs = []
    for d in cfg.densities:
        for s in cfg.skews:
            if -(depths[1] - 1) <= s <= depths[0] - 1:
                configs.append(
                    (s, float(d), [tuple(p) for p in fusionops.skew_pairs(*depths, s, d).tolist()])
                )
    if cfg.dense_reference:
        configs.append((0, 1.0, [tuple(p) for p in fusionops.skew_pairs(*depths, 0, 1.0).tolist()]))
    seeds = [cfg.seed + 100 + k for k in range(cfg.n_seeds)]
    log(f"sweep: {len(configs)} configurations × {len(seeds)} seeds, {cfg.workers} worker(s)")
    start = time.perf_counter()
    results = _train_all(stacks, configs, seeds, cfg, log)
    timings["sweep_s"] = time.perf_counter() - start
    dense = results.pop((0, 1.0), None) if cfg.dense_reference else None

    selection = _selection(results, depths, cfg)
    sel_table = [_jsonable_row(r) for r in selection.table]
    chosen = next(r for r in sel_table if r["chosen"])
    log(
        f"selection: skew {selection.skew:+d}, η {density_label(selection.density)} "
        f"({len(selection.pairs)} pairs), val {selection.mean:.3f} "
        f"[{selection.low:.3f}, {selection.high:.3f}]; "
        f"best: skew {selection.best['skew']:+d}, η {density_label(selection.best['density'])}, "
        f"val {selection.best['mean']:.3f}"
    )

    rows = []
    for _, r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = r.summary()
        row["reaches"] = task.reaches(cfg.task, r.pairs)
        rows.append(row)
    chosen_row = next(r for r in rows if r["skew"] == selection.skew and r["density"] == selection.density)
    timings["total_s"] = time.perf_counter() - wall

    lines = {"chance": 0.5, f"probe ceiling {readable:.2f}": readable}
    if dense is not None:
        lines[f"all {len(dense.pairs)} pairs (η = 1, s = 0)"] = dense.summary()["test_acc"]
    title = (
        f"Skew-pair fusion of two random-weight encoders (BERT A, ELECTRA B) on the planted-depth XOR task: "
        f"bit a first in layer {cfg.task.depth_a} of A, bit b in layer {cfg.task.depth_b} of B; "
        f"{cfg.n_train} train / {cfg.n_val} val / {cfg.n_test} test, {cfg.n_seeds} seed(s)"
    )
    out = Path(out)
    plot_study(
        rows,
        {"table": sel_table, "best": _jsonable_row(selection.best), "chosen": chosen},
        {k: v for k, v in probe.items() if k.startswith("bit")},
        lines,
        out / "sweep.png",
        title,
    )
    # reaches and separates: configurations predicted to solve the task vs the others.
    hit = [r["test_acc"] for r in rows if r["reaches"]]
    miss = [r["test_acc"] for r in rows if not r["reaches"]]
    results_json: dict[str, Any] = {
        "study": "skew-pair fusion sweep and bootstrapped-sparsity selection (experiments/skew_pair)",
        "config": cfg.to_dict(),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "fusionops_backend": cfg.backend or os.environ.get("FUSIONOPS_BACKEND") or "auto",
            "threads_per_worker": cfg.threads,
            "workers": cfg.workers,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "timings_s": timings,
        "task": {
            "lengths": {"a": cfg.task.length("a"), "b": cfg.task.length("b")},
            "signal_start": {"a": cfg.task.signal_start("a"), "b": cfg.task.signal_start("b")},
            "label_mean": float(data.label.double().mean()),
            "bayes_accuracy": task.bayes_accuracy(cfg.task),
            "probe_ceiling": readable,
        },
        "probes": probe,
        "sweep": rows,
        "dense_reference": dense.summary() if dense is not None else None,
        "prediction": {
            "reaching_configs": len(hit),
            "other_configs": len(miss),
            "min_test_acc_reaching": min(hit) if hit else None,
            "max_test_acc_other": max(miss) if miss else None,
        },
        "selection": {
            "skew": selection.skew,
            "density": selection.density,
            "pairs": selection.pairs.tolist(),
            "val_mean": selection.mean,
            "val_low": selection.low,
            "val_high": selection.high,
            "test_acc": chosen_row["test_acc"],
            "best": _jsonable_row(selection.best),
            "level": selection.level,
            "n_boot": selection.n_boot,
            "n_examples": selection.n_examples,
            "table": sel_table,
        },
    }
    atomic.write_json(out / "results.json", results_json)
    atomic.write_text(out / "results.md", _markdown(results_json, selection.to_markdown(), depths[0]))
    log(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'sweep.png'} "
        f"({timings['total_s']:.0f} s)"
    )
    return results_json


def _markdown(res: dict[str, Any], selection_md: str, depth: int) -> str:
    cfg, sel, t = res["config"], res["selection"], res["timings_s"]
    dense = res["dense_reference"]
    lines = [
        "# Skew-pair sweep: results",
        "",
        f"Generated by `python -m experiments.skew_pair` (seed {cfg['seed']}); see README.md for the set-up.",
        f"{cfg['n_train']} train / {cfg['n_val']} validation / {cfg['n_test']} test examples, "
        f"{cfg['n_seeds']} head seed(s) per configuration, {cfg['train']['epochs']} epochs; "
        f"backend {res['environment']['fusionops_backend']}; "
        f"{t['total_s']:.0f} s in all ({t['sweep_s']:.0f} s training, {t['extract_s']:.1f} s encoders).",
        "",
        f"Bayes accuracy {res['task']['bayes_accuracy']:.3f}; probe ceiling (XOR of the best per-layer "
        f"linear probes of each bit) {res['task']['probe_ceiling']:.3f}; chance 0.5.",
        "",
        "## Test accuracy by skew and density (mean ± sd over seeds)",
        "",
        "† : the pair set reaches both planted depths (layer ≥ depth_a of A and layer ≥ depth_b of B).",
        "",
        report.sweep_table(res["sweep"], depth),
        "",
    ]
    if dense is not None:
        lines += [
            f"Reference, all {dense['n_pairs']} pairs (η = 1, s = 0): test {dense['test_acc']:.3f} ± "
            f"{dense['test_acc_std']:.3f}, validation {dense['val_acc']:.3f}.",
            "",
        ]
    lines += [
        "## Selection (bootstrapping sparsity, `fusionops.select_skew_pairs`)",
        "",
        f"Chosen: skew {sel['skew']:+d}, density {density_label(sel['density'])}, pairs {sel['pairs']} "
        f"(validation {sel['val_mean']:.3f}, {100 * sel['level']:g}% interval [{sel['val_low']:.3f}, "
        f"{sel['val_high']:.3f}]; test {sel['test_acc']:.3f}). Best by validation mean: skew "
        f"{sel['best']['skew']:+d}, density {density_label(sel['best']['density'])} "
        f"({sel['best']['mean']:.3f}).",
        "",
        f"Validation outcomes per example are the fraction of seeds that got it right; {sel['n_boot']} "
        f"paired bootstrap resamples of the {sel['n_examples']} validation examples.",
        "",
        selection_md,
        "",
        "## Where each bit can be read (linear probe per layer, validation accuracy)",
        "",
        report.probe_table(res["probes"]),
        "",
    ]
    return "\n".join(lines)
