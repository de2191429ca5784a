"""The whole study: task → frozen encoders → probes → sweep → selection → JSON, markdown, PNG."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import fusionops
from experiments import atomic, provenance, stats
from experiments.skew_pair import encoders, probes, report, sweep, task
from experiments.skew_pair.plots import density_label, plot_study
from fusionops.selection import selection_markdown

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_DENSITIES = (1 / 12, 3 / 12, 5 / 12)


@dataclass(frozen=True)
class StudyConfig:
    """Everything a run depends on (all seeds derive from ``seed``: data ``seed``, encoder
    weights ``seed + 1``, fusion heads ``seed + 100 + k`` for ``k < n_seeds`` in the sweep and
    ``k < n_compare_seeds`` in the comparison with the baselines, bootstrap ``seed``)."""

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
    n_compare_seeds: int = 8
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
            n_compare_seeds=3,
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
Job = tuple[Any, "list[tuple[int, int]] | None", int]  # (key, pairs or None for late fusion, seed)


def _init_worker(stacks: sweep.Stacks, cfg: sweep.TrainConfig, backend: str | None, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(stacks=stacks, cfg=cfg, backend=backend)


def _job(
    key: Any, pairs: list[tuple[int, int]] | None, seed: int
) -> tuple[Any, sweep.RunResult, dict[str, dict[str, int]]]:
    """One training run; also the fusionops calls it made, per op and backend (counted in the
    process that ran it, so that forked workers' calls are not lost)."""
    before = fusionops.dispatch_counts()
    with fusionops.backend(_WORKER["backend"]):
        table = None if pairs is None else torch.tensor(pairs)
        result = sweep.train_head(_WORKER["stacks"], table, seed, _WORKER["cfg"])
    return key, result, provenance.count_delta(before, fusionops.dispatch_counts())


def _run_jobs(
    stacks: sweep.Stacks,
    jobs: Sequence[Job],
    cfg: StudyConfig,
    counts: dict[str, dict[str, int]],
    done: Callable[[Any, sweep.RunResult], None],
) -> None:
    """Run ``jobs``, ``cfg.workers`` processes at a time (forked, so the stacks are shared, not
    copied; one process where fork is unavailable), calling ``done(key, run)`` as each finishes
    and adding its fusionops call counts into ``counts``. Every run seeds itself, so the results
    do not depend on the number of workers."""
    initargs = (stacks, cfg.train, cfg.backend, cfg.threads)

    def finish(key: Any, run: sweep.RunResult, calls: dict[str, dict[str, int]]) -> None:
        provenance.add_counts(counts, calls)
        done(key, run)

    if cfg.workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        _init_worker(*initargs)
        for job in jobs:
            finish(*_job(*job))
    else:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(
            cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=initargs
        ) as pool:
            for future in as_completed([pool.submit(_job, *job) for job in jobs]):
                finish(*future.result())


def _train_all(
    stacks: sweep.Stacks,
    configs: Sequence[tuple[int, float, list[tuple[int, int]]]],
    seeds: Sequence[int],
    cfg: StudyConfig,
    log: Callable[[str], None],
    counts: dict[str, dict[str, int]],
) -> dict[tuple[int, float], sweep.ConfigResult]:
    """Train every configuration for every seed (see :func:`_run_jobs`)."""
    results = {(s, d): sweep.ConfigResult(s, d, pairs, []) for s, d, pairs in configs}
    jobs = [((s, d), pairs, seed) for s, d, pairs in configs for seed in seeds]

    def done(key: tuple[int, float], run: sweep.RunResult) -> None:
        entry = results[key]
        entry.runs.append(run)
        if len(entry.runs) == len(seeds):
            entry.runs.sort(key=lambda r: r.seed)
            s = entry.summary()
            spread = f" ± {s['test_acc_std']:.3f}" if len(seeds) > 1 else ""
            log(
                f"  skew {key[0]:+d} η {density_label(key[1])} ({s['n_pairs']} pairs): "
                f"val {s['val_acc']:.3f} "
                f"test {s['test_acc']:.3f}{spread} ({s['seconds']:.1f} s)"
            )

    _run_jobs(stacks, jobs, cfg, counts, done)
    return results


BASELINES = ("late", "pairwise")
MODEL_LABELS = {
    "ssfn": "SSFN (the selected skew pairs)",
    "late": "late fusion (final layer of each encoder)",
    "pairwise": "pairwise fusion (all aligned pairs (i, i))",
}


def _compare(
    stacks: sweep.Stacks,
    chosen: sweep.ConfigResult,
    pairwise: sweep.ConfigResult | None,
    cfg: StudyConfig,
    log: Callable[[str], None],
    counts: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """The paper's comparison: the selected skew-pair set against late fusion and pairwise fusion,
    trained with the same head seeds (runs the sweep already made are reused: same seed, same
    model, same result), compared on the test split by paired per-seed differences."""
    seeds = [cfg.seed + 100 + k for k in range(cfg.n_compare_seeds)]
    aligned = [tuple(p) for p in fusionops.skew_pairs(*stacks.depths, 0, 1.0).tolist()]
    models: dict[str, list[tuple[int, int]] | None] = {
        "ssfn": chosen.pairs,
        "late": None,
        "pairwise": aligned,
    }
    have: dict[str, dict[int, sweep.RunResult]] = {name: {} for name in models}
    have["ssfn"] = {r.seed: r for r in chosen.runs}
    if pairwise is not None:
        have["pairwise"] = {r.seed: r for r in pairwise.runs}
    jobs = [(name, pairs, seed) for name, pairs in models.items() for seed in seeds if seed not in have[name]]
    log(f"comparison: SSFN vs late vs pairwise fusion, {len(seeds)} seeds ({len(jobs)} new runs)")
    start = time.perf_counter()

    def done(name: str, run: sweep.RunResult) -> None:
        have[name][run.seed] = run

    _run_jobs(stacks, jobs, cfg, counts, done)
    runs = {name: [have[name][k] for k in seeds] for name in models}
    test = {name: [r.test_acc for r in rs] for name, rs in runs.items()}
    minus = {b: stats.paired(test["ssfn"], test[b]) for b in BASELINES}
    out = {
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
        "models": {
            name: {
                "label": MODEL_LABELS[name],
                "pairs": [list(p) for p in (models[name] or [])],
                "test_acc_seeds": test[name],
                "test_acc": float(np.mean(test[name])),
                "test_acc_std": float(np.std(test[name], ddof=1)) if len(seeds) > 1 else None,
                "val_acc": float(np.mean([r.val_acc for r in runs[name]])),
            }
            for name in models
        },
        "ssfn_minus": minus,
        "verdict": stats.combine(iv["verdict"] for iv in minus.values()),
    }
    for b, iv in minus.items():
        log(f"  SSFN − {MODEL_LABELS[b]}: {stats.fmt(iv)} {iv['verdict']}")
    log(f"  claim (SSFN outperforms late and pairwise fusion): {out['verdict']}")
    return out


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
    counts: dict[str, dict[str, int]] = {}  # fusionops calls per op and backend, every process
    before = fusionops.dispatch_counts()
    stacks, timings = _stacks(cfg, data, log)
    provenance.add_counts(counts, provenance.count_delta(before, fusionops.dispatch_counts()))
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
    results = _train_all(stacks, configs, seeds, cfg, log, counts)
    timings["sweep_s"] = time.perf_counter() - start
    dense = results.pop((0, 1.0), None) if cfg.dense_reference else None

    selection = _selection(results, depths, cfg)
    sel_table = [_jsonable_row(r) for r in selection.table]
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
    comparison = _compare(stacks, results[(selection.skew, selection.density)], dense, cfg, log, counts)
    timings["compare_s"] = comparison["seconds"]
    timings["total_s"] = time.perf_counter() - wall

    out = Path(out)
    # reaches and separates: configurations predicted to solve the task vs the others.
    hit = [r["test_acc"] for r in rows if r["reaches"]]
    miss = [r["test_acc"] for r in rows if not r["reaches"]]
    results_json: dict[str, Any] = {
        "study": "skew-pair fusion sweep and bootstrapped-sparsity selection (experiments/skew_pair)",
        "config": cfg.to_dict(),
        "environment": {
            **provenance.environment(("transformers", "matplotlib")),
            "fusionops_backend": cfg.backend or os.environ.get("FUSIONOPS_BACKEND") or "auto",
            "threads_per_worker": cfg.threads,
            "workers": cfg.workers,
        },
        # which fusionops backend served each op (calls, eager; counted in every worker process)
        "backends": counts,
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
        "comparison": {**comparison, "rule": stats.RULE},
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
    _draw(results_json, out)
    atomic.write_json(out / "results.json", results_json)
    atomic.write_text(out / "results.md", _markdown(results_json))
    log(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'sweep.png'} "
        f"({timings['total_s']:.0f} s)"
    )
    return results_json


def _draw(res: dict[str, Any], out: Path) -> None:
    """``sweep.png`` from the results dict alone (run_study and render)."""
    cfg, sel, comparison = res["config"], res["selection"], res["comparison"]
    readable = res["task"]["probe_ceiling"]
    lines = {"chance": 0.5, f"probe ceiling {readable:.2f}": readable}
    baselines = {}
    for name in BASELINES:
        m = comparison["models"][name]
        baselines[f"{m['label'].split(' (')[0]} (mean of {len(comparison['seeds'])} seeds)"] = m["test_acc"]
    title = (
        "Synthetic task (ours): skew-pair fusion of two random-weight encoders (BERT A, ELECTRA B) on the "
        f"planted-depth XOR: bit a first in layer {cfg['task']['depth_a']} of A, bit b in layer "
        f"{cfg['task']['depth_b']} of B; {cfg['n_train']} train / {cfg['n_val']} val / {cfg['n_test']} test, "
        f"{cfg['n_seeds']} head seed(s) per configuration (error bars: left ± 1 sd over seeds, none for one "
        "seed; middle 95% bootstrap)"
    )
    chosen = next(r for r in sel["table"] if r["chosen"])
    plot_study(
        res["sweep"],
        {"table": sel["table"], "best": sel["best"], "chosen": chosen},
        {k: v for k, v in res["probes"].items() if k.startswith("bit")},
        lines,
        Path(out) / "sweep.png",
        title,
        baselines,
    )


def render(out: Path = RESULTS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Redraw ``sweep.png`` and ``results.md`` from ``out/results.json`` (no training)."""
    import json

    res = json.loads((Path(out) / "results.json").read_text())
    _draw(res, Path(out))
    atomic.write_text(Path(out) / "results.md", _markdown(res))
    log(f"redrew {Path(out) / 'sweep.png'} and {Path(out) / 'results.md'}")
    return res


def _markdown(res: dict[str, Any]) -> str:
    cfg, sel, t = res["config"], res["selection"], res["timings_s"]
    depth = len(res["probes"]["bit a from A"])
    selection_md = selection_markdown(sel["table"], sel["level"])
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
        f"linear probes of each bit) {res['task']['probe_ceiling']:.3f}; chance 0.5. Data: synthetic "
        "(ours), two random-weight encoders.",
        "",
        "fusionops backends that served the ops (calls, eager, all worker processes): "
        f"{provenance.backends_line(res.get('backends') or {})}.",
        "",
        f"Environment: {provenance.summary_line(res['environment'])}.",
        "",
        *report.comparison_lines(res["comparison"]),
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
