"""The study's markdown report and its verdicts on the source's two claims."""

from __future__ import annotations

from typing import Any

from experiments.mkl_lmf.plots import LABELS


def _ms(d: dict[str, float], digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"


def verdicts(res: dict[str, Any]) -> dict[str, str]:
    """One line per claim (only for the parts that ran)."""
    out: dict[str, str] = {}
    if "mkl" in res:
        parts = []
        for kind, r in res["mkl"].items():
            sep = r["separability"]
            fisher = {k: v["mean"] for k, v in sep["fisher"].items()}
            learned = fisher["combined, learned β"]
            best_name = max(r["views"], key=lambda v: fisher[v])
            margin = learned / fisher[best_name] - 1
            s = r["summary"]
            best_acc = max(a["mean"] for a in s["acc_single"])
            parts.append(
                f"{kind}: mean Fisher ratio of the learned combination {learned:.3f} vs best single "
                f"({best_name}) {fisher[best_name]:.3f} ({margin:+.1%}), above every single kernel in "
                f"{sep['learned_wins']} of {sep['n_seeds']} seeds → "
                f"{'more' if sep['learned_beats_every_single'] else 'NOT more'} separable; test accuracy "
                f"{s['acc_learned']['mean']:.3f} vs best single {best_acc:.3f}"
            )
        held = all(r["separability"]["learned_beats_every_single"] for r in res["mkl"].values())
        out["mkl"] = (
            f"Claim 1 (combined kernel more separable than single kernels in a PCA view): "
            f"{'SUPPORTED' if held else 'NOT SUPPORTED'} on {'both data sets' if held else 'every data set'}"
            if held or not any(r["separability"]["learned_beats_every_single"] for r in res["mkl"].values())
            else "Claim 1 (combined kernel more separable than single kernels in a PCA view): MIXED"
        )
        out["mkl"] += " — " + "; ".join(parts)
    if "lmf" in res:
        lmf = res["lmf"]
        st = lmf["summary"]["lmf_direct"]["steady"]
        rise = max(s["max_rise"] for s in st)
        ratio = max(s["last_over_first"] for s in st)
        out["lmf"] = (
            "Claim 2 (LMF training loss falls steadily): "
            f"{'SUPPORTED' if lmf['claim_steady'] else 'NOT SUPPORTED'} — the epoch training loss of LMF "
            f"rank 4 on the features rose by at most {rise:.1%} from one epoch to the next (the rule "
            "allows 5%, the end at most 0.25 × the start) and ended at "
            f"≤ {ratio:.2f} × its first value in every seed; test R² "
            f"{_ms(lmf['summary']['lmf_direct']['test_r2'])} (best possible ≈ {lmf['best_r2']:.2f}, linear "
            f"{_ms(lmf['linear_r2'])})"
        )
    return out


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
    cfg, t = res["config"], res["timings_s"]
    load = ", ".join(f"{x:.1f}" for x in res["environment"]["load_average_at_end"] or [])
    lines = [
        "# From MKL to low-rank tensors: results",
        "",
        f"Generated by `python -m experiments.mkl_lmf` (seeds {res['seeds']}); see README.md for the set-up. "
        f"{t['total_s']:.0f} s in all on {res['environment']['cpu_count']} CPU cores "
        f"(load average at the end {load}).",
        "",
        "## Verdicts",
        "",
    ]
    lines += [f"* {v}" for v in res["verdicts"].values()]
    lines.append("")
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
