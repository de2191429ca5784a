"""The study's markdown report and its verdicts on the source's two claims."""

from __future__ import annotations

from typing import Any

from experiments import provenance, stats
from experiments.mkl_lmf.lmf_part import END_RATIO, MAX_RISE
from experiments.mkl_lmf.plots import LABELS


def _ms(d: dict[str, float], digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"


LEARNED = "combined, learned β"


def claims(res: dict[str, Any]) -> dict[str, Any]:
    """The two claims as paired per-seed comparisons with 95% t-intervals (``experiments.stats``).

    Claim 1, per data set: the learned combination's Fisher ratio minus each single kernel's,
    per seed; YES on a data set when every difference's interval is above 0. Claim 2: per seed,
    the rule's two margins, ``5 % − largest epoch-to-epoch rise`` and ``0.25 − last / first``
    epoch loss of LMF on the features; YES when both intervals are above 0. Claims combine their
    parts (YES if all YES, NO if any NO). Beside them, our own comparisons (not the source's
    claims): test accuracy of the learned combination minus each single kernel's and minus
    uniform β's, and test R² of the LMF and tensor-fusion models against each other."""
    out: dict[str, Any] = {"rule": stats.RULE}
    if "mkl" in res:
        per: dict[str, Any] = {}
        for kind, r in res["mkl"].items():
            runs, views = r["runs"], r["views"]
            learned = [run["fisher"][LEARNED] for run in runs]
            fisher = {v: stats.paired(learned, [run["fisher"][v] for run in runs]) for v in views}
            acc = [run["acc_learned"] for run in runs]
            accuracy = {
                v: stats.paired(acc, [run["acc_single"][i] for run in runs]) for i, v in enumerate(views)
            }
            accuracy["uniform β"] = stats.paired(acc, [run["acc_uniform"] for run in runs])
            per[kind] = {
                "fisher_learned_minus": fisher,
                "verdict": stats.combine(c["verdict"] for c in fisher.values()),
                "accuracy_learned_minus": accuracy,
                "every_seed_rule": r["separability"]["learned_beats_every_single"],
            }
        out["mkl"] = {"per_dataset": per, "verdict": stats.combine(p["verdict"] for p in per.values())}
    if "lmf" in res:
        lmf = res["lmf"]
        st = lmf["summary"]["lmf_direct"]["steady"]
        rise = stats.interval(MAX_RISE - s["max_rise"] for s in st)
        fall = stats.interval(END_RATIO - s["last_over_first"] for s in st)
        r2 = {m: [run["test_r2"] for run in lmf["runs"][m]] for m in lmf["runs"]}
        ours = {
            "lmf_encoded − tfn_encoded": stats.paired(r2["lmf_encoded"], r2["tfn_encoded"]),
            "lmf_encoded − lmf_direct": stats.paired(r2["lmf_encoded"], r2["lmf_direct"]),
        }
        if len(lmf.get("linear_r2_seeds", [])) == len(r2["lmf_direct"]):
            ours["lmf_direct − linear ridge"] = stats.paired(r2["lmf_direct"], lmf["linear_r2_seeds"])
        out["lmf"] = {
            "rise_margin": rise,
            "fall_margin": fall,
            "verdict": stats.combine([rise["verdict"], fall["verdict"]]),
            "every_seed_rule": lmf["claim_steady"],
            "test_r2_minus": ours,
        }
    return out


def verdicts(res: dict[str, Any]) -> dict[str, str]:
    """One line per claim (only for the parts that ran), from :func:`claims`."""
    c = res.get("claims") or claims(res)
    out: dict[str, str] = {}
    if "mkl" in c:
        parts = []
        for kind, p in c["mkl"]["per_dataset"].items():
            diffs = "; ".join(f"minus {v} {stats.fmt(iv)}" for v, iv in p["fisher_learned_minus"].items())
            parts.append(
                f"{kind} {p['verdict']} (learned combination's Fisher ratio {diffs}; the old every-seed "
                f"rule: {'met' if p['every_seed_rule'] else 'not met'})"
            )
        out["mkl"] = (
            "Claim 1 (a combined kernel is more separable than every single kernel, Fisher ratio of the "
            f"2-D kernel PCA): {c['mkl']['verdict']} — " + "; ".join(parts)
        )
    if "lmf" in c:
        p = c["lmf"]
        lmf = res["lmf"]
        out["lmf"] = (
            f"Claim 2 (LMF training loss falls steadily): {p['verdict']} — per seed, 5 % minus the largest "
            f"epoch-to-epoch rise {stats.fmt(p['rise_margin'], pct=True)} ({p['rise_margin']['verdict']}), "
            f"0.25 minus last/first epoch loss {stats.fmt(p['fall_margin'])} "
            f"({p['fall_margin']['verdict']}); "
            f"every seed passing the rule: {'yes' if p['every_seed_rule'] else 'no'}; test R² "
            f"{_ms(lmf['summary']['lmf_direct']['test_r2'])} (best possible ≈ {lmf['best_r2']:.2f}, linear "
            f"{_ms(lmf['linear_r2'])})"
        )
    return out


def verdict_tables(res: dict[str, Any]) -> list[str]:
    """Markdown tables of every comparison behind the verdicts, then our own comparisons."""
    c = res["claims"]
    lines = [
        "| claim | data / model | difference (per seed) | mean [95% interval] | seeds | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    if "mkl" in c:
        for kind, p in c["mkl"]["per_dataset"].items():
            for v, iv in p["fisher_learned_minus"].items():
                lines.append(
                    f"| 1 | {kind} | Fisher ratio: learned combination − {v} | {stats.fmt(iv)} | {iv['n']} | "
                    f"{iv['verdict']} |"
                )
    if "lmf" in c:
        p = c["lmf"]
        for name, iv, pct in (
            ("5 % − largest epoch-to-epoch rise of the training loss", p["rise_margin"], True),
            ("0.25 − last / first epoch training loss", p["fall_margin"], False),
        ):
            lines.append(
                f"| 2 | LMF rank 4 on the features | {name} | {stats.fmt(iv, pct=pct)} | {iv['n']} | "
                f"{iv['verdict']} |"
            )
    lines += ["", "Our comparisons (not the source's claims; same rule):", ""]
    lines += [
        "| data / models | difference (per seed) | mean [95% interval] | seeds | reads |",
        "|---|---|---:|---:|---|",
    ]
    if "mkl" in c:
        for kind, p in c["mkl"]["per_dataset"].items():
            for v, iv in p["accuracy_learned_minus"].items():
                lines.append(
                    f"| {kind} | test accuracy: learned combination − {v} | {stats.fmt(iv)} | {iv['n']} | "
                    f"{iv['verdict']} |"
                )
    if "lmf" in c:
        for name, iv in c["lmf"]["test_r2_minus"].items():
            a, b = (LABELS.get(x.strip(), x.strip()) for x in name.split("−"))
            lines.append(
                f"| regression | test R²: {a} − {b} | {stats.fmt(iv)} | {iv['n']} | {iv['verdict']} |"
            )
    return lines


def _mkl_section(kind: str, r: dict[str, Any]) -> list[str]:
    s, views = r["summary"], r["views"]
    lines = [
        f"### {kind} ({r['n_classes']} classes; {r['runs'][0]['n_train']} train / "
        f"{r['runs'][0]['n_test']} test rows per seed)",
        "",
        "| kernel | β learned (mean ± sd) | test accuracy |",
        "|---|---:|---:|",
    ]
    for i, v in enumerate(views):
        lines.append(f"| {v} alone | {_ms(s['beta'][i])} | {_ms(s['acc_single'][i])} |")
    uniform = " / ".join(f"{1 / len(views):.3f}" for _ in views)
    learned = " / ".join(f"{b['mean']:.3f}" for b in s["beta"])
    lines.append(f"| combined, uniform β | {uniform} | {_ms(s['acc_uniform'])} |")
    lines.append(f"| combined, learned β | {learned} | {_ms(s['acc_learned'])} |")
    lines += ["", "β per seed (in view order) and ranking:", ""]
    for run in r["runs"]:
        rank = " > ".join(views[i] for i in sorted(range(len(views)), key=lambda i, run=run: -run["beta"][i]))
        lines.append(
            f"* seed {run['seed']}: β = ({', '.join(f'{b:.3f}' for b in run['beta'])}), {rank}; "
            f"{run['steps_taken']} steps, objective {run['objective'][0]:.2f} → {run['objective'][-1]:.2f}"
        )
    sep = r["separability"]
    fisher = sep["fisher"]
    lines += [
        "",
        f"Kernel PCA of {len(r['kpca']['labels'])} test rows per seed (plotted: seed {r['kpca']['seed']}): "
        "Fisher ratio trace(S_b)/trace(S_w) in the 2-D embedding",
        "",
        "| | " + " | ".join(fisher) + " |",
        "|---|" + "---:|" * len(fisher),
        "| mean ± sd | " + " | ".join(_ms(v) for v in fisher.values()) + " |",
    ]
    for run in r["runs"]:
        lines.append(
            f"| seed {run['seed']} | " + " | ".join(f"{run['fisher'][k]:.3f}" for k in fisher) + " |"
        )
    lines += [
        "",
        f"The learned combination beats every single kernel in {sep['learned_wins']} of {sep['n_seeds']} "
        f"seeds; the uniform combination does in {sep['uniform_wins']}.",
        "",
    ]
    return lines


def markdown(res: dict[str, Any]) -> str:
    cfg, t, env = res["config"], res["timings_s"], res["environment"]
    load = ", ".join(f"{x:.1f}" for x in (env.get("load_average") or env.get("load_average_at_end") or []))
    cpus = env.get("device", {}).get("cpu_count", env.get("cpu_count"))
    lines = [
        "# From MKL to low-rank tensors: results",
        "",
        f"Generated by `python -m experiments.mkl_lmf` (seeds {res['seeds']}); see README.md for the set-up. "
        f"{t['total_s']:.0f} s in all on {cpus} CPU cores (load average at the end {load}). Data: "
        "scikit-learn's bundled digits (real images, split into three views) and two simulated "
        "(synthetic) data sets of ours.",
        "",
        "fusionops backends that served the ops (calls, eager): "
        f"{provenance.backends_line(res.get('backends') or {})}.",
        "",
        f"Environment: {provenance.summary_line(env) if 'versions' in env else 'not recorded'}.",
        "",
        "## Verdicts",
        "",
        stats.RULE,
        "",
    ]
    lines += [f"* {v}" for v in res["verdicts"].values()]
    lines += ["", *verdict_tables(res), ""]
    if "mkl" in res:
        m = cfg["mkl"]
        lines += [
            "## (a) Multiple kernel learning",
            "",
            "`fusionops.MultipleKernelRidgeClassifier`, one RBF kernel (γ = 1/d, features standardized "
            f"on the training rows) per view, kernels normalized, ridge λ = {m['alpha']}, β learned by "
            f"{m['steps']} Adam steps (lr {m['lr']}) on the simplex; uniform β and each view alone use "
            "the same estimator with β fixed. Accuracies are mean ± sd over seeds.",
            "",
        ]
        for kind, r in res["mkl"].items():
            lines += _mkl_section(kind, r)
    if "lmf" in res:
        lmf, c = res["lmf"], cfg["lmf"]
        lines += [
            "## (b) Low-rank fusion vs tensor fusion (regression)",
            "",
            f"{c['n_train']} train / {c['n_val']} validation / {c['n_test']} test rows; AdamW lr {c['lr']}, "
            f"weight decay {c['weight_decay']}, batch {c['batch_size']}, {c['epochs']} epochs, last weights. "
            f"Best possible R² ≈ {lmf['best_r2']:.2f}; ridge regression on the concatenated features: "
            f"R² {_ms(lmf['linear_r2'])}.",
            "",
            "| model | parameters | test MSE | test R² | s / epoch (timed) | s / epoch (in training) "
            "| final train loss |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        timing = lmf.get("timing", {})

        def timed(name: str) -> str:
            t = timing.get(name)
            return f"{t['epoch_seconds']:.3f}" if t else "—"

        for name, s in lmf["summary"].items():
            lines.append(
                f"| {LABELS.get(name, name)} | {s['params']:,} | {_ms(s['test_mse'])} | "
                f"{_ms(s['test_r2'])} | {timed(name)} | {_ms(s['epoch_seconds'], 2)} | "
                f"{_ms(s['final_train_loss'])} |"
            )
        td = lmf["tfn_direct"]
        lines.append(
            f"| tensor fusion on the features (timed only, not trained) | {td['params']:,} | — | — | "
            f"{timed('tfn_direct')} | — | — |"
        )
        lines += [
            "",
            f"s / epoch (timed): training steps (forward, backward, AdamW) on {c['timing_batches']} batches "
            f"({c['tfn_timing_batches']} for tensor fusion on the features) scaled to {c['n_train']} rows, "
            f"models interleaved, best of {c['timing_rounds']} rounds, first seed's data. s / epoch (in "
            "training): median over epochs, mean ± sd over seeds; on a shared machine it carries "
            "other jobs' load.",
            "",
            "Training loss per epoch of LMF rank 4 on the features (steadiness test of claim 2):",
            "",
            "| seed | share of epochs where it fell | largest rise | last / first | steady |",
            "|---:|---:|---:|---:|---|",
        ]
        for run, st in zip(lmf["runs"]["lmf_direct"], lmf["summary"]["lmf_direct"]["steady"], strict=True):
            lines.append(
                f"| {run['seed']} | {st['share_falling']:.2f} | {st['max_rise']:.1%} | "
                f"{st['last_over_first']:.3f} | {'yes' if st['steady'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)
