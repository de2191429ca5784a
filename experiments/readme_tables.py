"""The numbers in the studies' READMEs, generated from their committed ``results.json``.

Every README block between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` is
written by a function below from the study's results, so a README cannot drift from its
results. ``python -m experiments.readme_tables`` rewrites the blocks; ``--check`` exits with 1
and names the stale blocks (``tests/test_readme_tables.py`` runs the check).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import provenance
from experiments.tweet import report as tweet_report

ROOT = Path(__file__).resolve().parent
TWEET = ROOT / "tweet"
MKL = ROOT / "mkl_lmf"
SKEW = ROOT / "skew_pair"
TWEET_VAL = TWEET / "results" / "val_size"  # the --val-size run, beside the default one
TWEET_BILINEAR = TWEET / "results" / "bilinear"  # the bilinear family under the same protocol
BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) .*?-->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)", re.S
)


def _load(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "results.json").read_text())


def _ms(d: dict[str, float], digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"


# ------------------------------------------------------------------ tweet


def _tweet_runtime(res: dict[str, Any]) -> str:
    env = res.get("environment", {})
    cpus = env.get("device", {}).get("cpu_count", "?")
    load = env.get("load_average")
    busy = f", load average {load[0]:.0f} at the end" if load else ""
    return f"{res['seconds']:.0f} s on {cpus} CPU cores{busy}"


def tweet_numbers(res: dict[str, Any]) -> str:
    """Clean accuracy per size (every size of the run), the accuracy at the largest σ, settings."""
    fusions = [f for f in res["config"]["fusions"]]
    sigmas = sorted({r["sigma"] for r in res["robustness"]})
    cell = {(r["fusion"], r["condition"], r["sigma"]): r for r in res["robustness"]}
    rows = [tweet_report.size_table(res, "accuracy")]
    for cond in ("img", "text", "both"):
        at = [cell[(f, cond, sigmas[-1])] for f in fusions if (f, cond, sigmas[-1]) in cell]
        vals = [f"{r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f}" for r in at]
        rows.append(
            f"| σ = {sigmas[-1]:g} on {cond} (n = {res['robustness_size']}) | " + " | ".join(vals) + " |"
        )
    seeds = sorted({r["seed"] for r in res["runs"]})
    return "\n".join(
        [
            f"{len(seeds)} seeds ({seeds[0]}–{seeds[-1]}), test accuracy mean ± sd over seeds, bold = "
            f"best of the row; {tweet_report.data_text(res)}. Best epoch chosen on "
            f"{tweet_report.validation_text(res)}. Run: {_tweet_runtime(res)}.",
            "",
            *rows,
            "",
            f"fusionops backends that served the layers (calls): {tweet_report.backends_line(res)}.",
        ]
    )


def tweet_verdicts(res: dict[str, Any]) -> str:
    """The verdict table of results.md (every paired comparison)."""
    return tweet_report.verdict_table(res)


def tweet_val_size(full: dict[str, Any], short: dict[str, Any]) -> str:
    """The whole validation split against ``--val-size``: accuracy per (size, fusion) and verdicts."""
    frac = short["config"]["val_size"]
    fusions = [f for f in full["config"]["fusions"]]
    a = {(r["fusion"], r["size"]): r for r in full["accuracy_vs_size"]}
    b = {(r["fusion"], r["size"]): r for r in short["accuracy_vs_size"]}
    sizes = sorted({r["size"] for r in full["accuracy_vs_size"]}, key=tweet_report._size_key)
    lines = [
        f"Test accuracy (mean over {full['summary']['n_seeds']} seeds) with the best epoch chosen on the "
        f"whole validation split / on {frac:g} × n validation examples (`--val-size {frac:g}`, run in "
        f"{_tweet_runtime(short)}), and the difference:",
        "",
        "| n train | val (short) | " + " | ".join(tweet_report.LABELS[f] for f in fusions) + " |",
        "|---:|---:|" + "---:|" * len(fusions),
    ]
    for s in sizes:
        if not all((f, s) in b for f in fusions):
            continue
        vals = []
        for f in fusions:
            x, y = a[(f, s)]["accuracy_mean"], b[(f, s)]["accuracy_mean"]
            vals.append(f"{x:.3f} / {y:.3f} ({y - x:+.3f})")
        lines.append(f"| {s} | {b[(fusions[0], s)].get('n_val', '?')} | " + " | ".join(vals) + " |")
    c_full, c_short = full["summary"], short["summary"]
    lines += [
        "",
        "| verdict | whole validation split | short validation set |",
        "|---|---|---|",
    ]
    c1, c2 = "claim1_product_wins_small_data", "claim2_product_less_robust"
    for name, key, field in (
        ("1. product beats every other fusion, n ≤ 128", c1, "verdict"),
        ("1a. product beats Concatenation, n ≤ 128", c1, "vs_concat_verdict"),
        ("2. product loses the most accuracy under noise", c2, "verdict"),
    ):
        lines.append(f"| {name} | {c_full[key].get(field, '—')} | {c_short[key].get(field, '—')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ mkl_lmf


def mkl_setup(res: dict[str, Any]) -> str:
    """The simulated data's amplitudes and the run's sizes, from the config the results used."""
    m, lmf = res["config"]["mkl"], res["config"]["lmf"]
    amp = ", ".join(f"{x:g}" for x in m["sim"]["amplitudes"])
    seeds = res["seeds"]
    sim = f"{m['sim']['n_classes']} classes; {m['sim_train']} train / {m['sim_test']} test rows per seed"
    digits = f"digits: {m['digits_train']} train rows, the other {1797 - m['digits_train']} test"
    reg = f"{lmf['n_train']} train / {lmf['n_val']} validation / {lmf['n_test']} test rows"
    return (
        f"Amplitudes a = ({amp}) for (visual, audio, text): visual strong, audio weak, text noise "
        f"only; {sim} ({digits}). LMF regression: {reg}, {lmf['epochs']} epochs. Seeds "
        f"{seeds[0]}–{seeds[-1]} ({len(seeds)})."
    )


def mkl_results(res: dict[str, Any]) -> str:
    """β, accuracies and Fisher ratios per data set; the LMF table; the verdicts with intervals."""
    from experiments.mkl_lmf import report as mkl_report

    lines = [
        f"{len(res['seeds'])} seeds; mean ± sd over seeds; full run {res['timings_s']['total_s']:.0f} s on "
        f"{res['environment']['device']['cpu_count']} CPU cores (load average "
        f"{res['environment']['load_average'][0]:.0f} at the end: other jobs held the machine).",
        "",
        "| data | kernel | β learned | test accuracy | Fisher ratio (2-D kernel PCA) |",
        "|---|---|---:|---:|---:|",
    ]
    for kind, r in res["mkl"].items():
        s, fisher = r["summary"], r["separability"]["fisher"]
        for i, v in enumerate(r["views"]):
            lines.append(
                f"| {kind} | {v} alone | {_ms(s['beta'][i])} | {_ms(s['acc_single'][i])} | {_ms(fisher[v])} |"
            )
        n = len(r["views"])
        lines.append(
            f"| {kind} | combined, uniform β | {' / '.join([f'{1 / n:.3f}'] * n)} | "
            f"{_ms(s['acc_uniform'])} | {_ms(fisher['combined, uniform β'])} |"
        )
        learned = " / ".join(f"{b['mean']:.3f}" for b in s["beta"])
        lines.append(
            f"| {kind} | combined, learned β | {learned} | {_ms(s['acc_learned'])} | "
            f"{_ms(fisher['combined, learned β'])} |"
        )
    lmf = res["lmf"]
    lines += [
        "",
        f"LMF regression (best possible R² ≈ {lmf['best_r2']:.2f}; ridge on the concatenated features "
        f"R² {_ms(lmf['linear_r2'])}):",
        "",
        "| model | parameters | test R² | s / epoch (timed) |",
        "|---|---:|---:|---:|",
    ]
    for name, s in lmf["summary"].items():
        t = lmf["timing"].get(name, {}).get("epoch_seconds")
        lines.append(
            f"| {mkl_report.LABELS.get(name, name)} | {s['params']:,} | {_ms(s['test_r2'])} | "
            f"{'—' if t is None else f'{t:.3f}'} |"
        )
    td = lmf["tfn_direct"]
    t = lmf["timing"].get("tfn_direct", {}).get("epoch_seconds")
    lines.append(
        f"| tensor fusion on the features (timed only) | {td['params']:,} | — | "
        f"{'—' if t is None else f'{t:.3f}'} |"
    )
    lines += ["", *mkl_report.verdict_tables(res), ""]
    lines += [f"* {v}" for v in res["verdicts"].values()]
    lines += [
        "",
        "fusionops backends that served the ops (calls): "
        f"{provenance.backends_line(res.get('backends') or {})}.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ skew_pair


def skew_sweep(res: dict[str, Any]) -> str:
    """The sweep table, the dense reference, the selection and the prediction check."""
    from experiments.skew_pair import report as skew_report
    from experiments.skew_pair.plots import density_label

    cfg, sel, pred = res["config"], res["selection"], res["prediction"]
    dense = res.get("dense_reference")
    lines = [
        f"Full default run (seed {cfg['seed']}), {res['timings_s']['total_s']:.0f} s on "
        f"{res['environment']['device']['cpu_count']} CPU cores (load average "
        f"{res['environment']['load_average'][0]:.0f} at the end). Test accuracy (mean ± sd over "
        f"{cfg['n_seeds']} head seeds); † marks the pair sets predicted to solve the task.",
        "",
        skew_report.sweep_table(res["sweep"], 12),
        "",
        f"Predicted to solve the task: {pred['reaching_configs']} configurations, test accuracy ≥ "
        f"{pred['min_test_acc_reaching']:.3f}; the other {pred['other_configs']}: ≤ "
        f"{pred['max_test_acc_other']:.3f}. Probe ceiling {res['task']['probe_ceiling']:.3f}; Bayes accuracy "
        f"{res['task']['bayes_accuracy']:.3f}.",
    ]
    if dense is not None:
        lines[-1] += f" All {dense['n_pairs']} aligned pairs (η = 1, s = 0): {dense['test_acc']:.3f}."
    pa, pb, depth = res["probes"]["bit a from A"], res["probes"]["bit b from B"], cfg["task"]["depth_a"]
    best_a, best_b = max(range(len(pa)), key=pa.__getitem__), max(range(len(pb)), key=pb.__getitem__)
    lines += [
        "",
        f"Probes (validation accuracy of a linear probe per layer): bit a from A ≤ {max(pa[:depth]):.3f} in "
        f"layers 0–{depth - 1}, {pa[depth]:.3f} at layer {depth}, best {pa[best_a]:.3f} at layer {best_a}; "
        f"bit b from B best {pb[best_b]:.3f} at layer {best_b}, {pb[-1]:.3f} at the last layer.",
    ]
    tied = [r for r in sel["table"] if r.get("tied")]
    lines += [
        "",
        f"Selection: best by validation mean s = {sel['best']['skew']:+d}, η = "
        f"{density_label(sel['best']['density'])} ({sel['best']['mean']:.4f}, 95% interval "
        f"[{sel['best']['low']:.4f}, {sel['best']['high']:.4f}]); {len(tied)} configurations tied with it "
        f"(best included); chosen (sparsest tied): s = {sel['skew']:+d}, η = "
        f"{density_label(sel['density'])}, pairs {sel['pairs']}, validation {sel['val_mean']:.4f} "
        f"[{sel['val_low']:.4f}, {sel['val_high']:.4f}], test {sel['test_acc']:.3f}.",
    ]
    return "\n".join(lines)


def skew_comparison(res: dict[str, Any]) -> str:
    """The paper's comparison (SSFN against late and pairwise fusion) with the verdict."""
    from experiments.skew_pair import report as skew_report

    lines = skew_report.comparison_lines(res["comparison"])[2:]  # without the section heading
    lines += [
        "",
        f"fusionops backends that served the ops (calls, all worker processes): "
        f"{provenance.backends_line(res.get('backends') or {})}.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ the blocks


def generators() -> dict[Path, dict[str, Callable[[], str]]]:
    """README → block name → its text, computed from the committed results."""
    return {
        TWEET / "README.md": {
            "tweet-numbers": lambda: tweet_numbers(_load(TWEET / "results")),
            "tweet-verdicts": lambda: tweet_verdicts(_load(TWEET / "results")),
            "tweet-val-size": lambda: tweet_val_size(_load(TWEET / "results"), _load(TWEET_VAL)),
            "tweet-bilinear-numbers": lambda: tweet_numbers(_load(TWEET_BILINEAR)),
            "tweet-bilinear-verdicts": lambda: tweet_verdicts(_load(TWEET_BILINEAR)),
        },
        MKL / "README.md": {
            "mkl-setup": lambda: mkl_setup(_load(MKL / "results")),
            "mkl-results": lambda: mkl_results(_load(MKL / "results")),
        },
        SKEW / "README.md": {
            "skew-sweep": lambda: skew_sweep(_load(SKEW / "results")),
            "skew-comparison": lambda: skew_comparison(_load(SKEW / "results")),
        },
    }


def render(text: str, blocks: dict[str, Callable[[], str]], where: str = "README") -> str:
    """``text`` with every generated block's body replaced; every block named in ``blocks`` must
    be present (a README that lost a block is an error, not a silent pass)."""
    seen: set[str] = set()

    def body(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in blocks:
            raise KeyError(f"{where}: unknown generated block {name!r}")
        seen.add(name)
        return f"{m.group(1)}{blocks[name]().rstrip()}\n{m.group(4)}"

    out = BLOCK.sub(body, text)
    lost = sorted(set(blocks) - seen)
    if lost:
        raise KeyError(f"{where}: no generated block {', '.join(lost)}")
    return out


def stale() -> list[str]:
    """The README blocks that differ from what the results give (``path: block``)."""
    out = []
    for path, blocks in generators().items():
        text = path.read_text()
        fresh = render(text, blocks, str(path))
        if fresh != text:
            old = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
            new = {m.group("name"): m.group("body") for m in BLOCK.finditer(fresh)}
            out += [f"{path.relative_to(ROOT.parent)}: {n}" for n in blocks if old.get(n) != new.get(n)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.readme_tables", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 naming the stale blocks")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for line in bad:
            print(f"stale: {line}")
        return 1 if bad else 0
    for path, blocks in generators().items():
        text = path.read_text()
        fresh = render(text, blocks, str(path))
        if fresh != text:
            path.write_text(fresh)
            print(f"rewrote {path.relative_to(ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
