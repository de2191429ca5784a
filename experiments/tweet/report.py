"""The studies' markdown report and printed summary: the paper's two claims answered with our numbers.

Claim 1 (clean accuracy, little data): the fusion that encodes the task's structure (product) has
the best clean test accuracy when the training set is small. Claim 2 (robustness): product loses
more accuracy than the other fusions when Gaussian noise is added to the inputs at test time.

Both claims compare fusions, so a results dict that lacks some (seed, fusion) block (a run that
was interrupted or killed, or is still going) answers neither: :func:`summarize` returns
``incomplete: no verdict`` and names the missing blocks, and :func:`summary_lines` and
:func:`markdown` print that. Every writer of ``results.json`` / ``results.md`` goes through
:func:`summarize`, so no file on disk ever holds a verdict drawn from some of the fusions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SMALL_MAX = 128  # sizes up to this count as "little data" for claim 1
INCOMPLETE = "incomplete: no verdict"
LABELS = {"concat": "Concatenation", "product": "Product", "tensorfusion": "Tensor", "lowrank": "Low-rank"}


def _size_key(size: str) -> float:
    return float("inf") if size == "all" else float(size)


def _fusions(res: dict[str, Any]) -> list[str]:
    present = {r["fusion"] for r in res["accuracy_vs_size"]}
    return [f for f in res["config"]["fusions"] if f in present]


def _fmt(mean: float | None, sd: float | None, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:.{digits}f}"


def missing_blocks(res: dict[str, Any]) -> dict[str, list[int]]:
    """The (seed, fusion) blocks of the run's config that ``res`` lacks, as fusion → seeds. A block
    is finished when every size has its clean run and (with a σ grid) its robustness rows."""
    cfg = res["config"]
    seeds = [int(cfg["seed"]) + k for k in range(int(cfg["n_seeds"]))]
    sizes = {str(s) for s in cfg["sizes"]}
    trained: dict[tuple[int, str], set[str]] = {}
    for r in res["runs"]:
        trained.setdefault((r["seed"], r["fusion"]), set()).add(str(r["size"]))
    tested = {(r["seed"], r["fusion"]) for r in res["robustness_runs"]}
    missing: dict[str, list[int]] = {}
    for fusion in cfg["fusions"]:
        lost = [
            s
            for s in seeds
            if not sizes <= trained.get((s, fusion), set()) or (cfg["sigmas"] and (s, fusion) not in tested)
        ]
        if lost:
            missing[fusion] = lost
    return missing


def incomplete_reason(res: dict[str, Any]) -> str | None:
    """``None`` when every block of the run finished, else ``"incomplete: no verdict (…)"`` naming
    the missing blocks. The block counter is checked too: it is what a reader sees first."""
    missing = missing_blocks(res)
    done, total = res["completed_blocks"], res["total_blocks"]
    if not missing and done >= total:
        return None
    parts = "; ".join(
        f"{fusion} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
        for fusion, seeds in missing.items()
    )
    return f"{INCOMPLETE} ({done} of {total} (seed, fusion) blocks finished; missing: {parts or '?'})"


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """The two claims as numbers: per small size, who wins clean accuracy and by how much; per
    noise condition, each fusion's accuracy drop from σ = 0 to the largest σ. For a partial run,
    ``verdict`` ("incomplete: no verdict (…)"), ``missing_blocks`` and each claim's ``holds: None``
    instead: comparing the fusions that happened to finish first would answer the claims wrongly."""
    reason = incomplete_reason(res)
    if reason is not None:
        claim = {"holds": None, "verdict": INCOMPLETE}
        return {
            "verdict": reason,
            "missing_blocks": missing_blocks(res),
            "claim1_product_wins_small_data": dict(claim),
            "claim2_product_less_robust": dict(claim),
        }
    fusions = _fusions(res)
    cell = {(r["fusion"], r["size"]): r for r in res["accuracy_vs_size"]}
    sizes = sorted({r["size"] for r in res["accuracy_vs_size"]}, key=_size_key)
    small = [s for s in sizes if _size_key(s) <= SMALL_MAX] or sizes[:1]
    clean: list[dict[str, Any]] = []
    for s in sizes:
        accs = {f: cell[(f, s)]["accuracy_mean"] for f in fusions if (f, s) in cell}
        if not accs:
            continue
        winner = max(accs, key=lambda f: accs[f])
        others = {f: a for f, a in accs.items() if f != "product"}
        best_other = max(others, key=lambda f: others[f]) if others else None
        clean.append(
            {
                "size": s,
                "small": s in small,
                "winner": winner,
                "accuracy": accs,
                "product": accs.get("product"),
                "best_other": best_other,
                "product_margin": (accs["product"] - others[best_other])
                if "product" in accs and best_other is not None
                else None,
            }
        )
    small_rows = [c for c in clean if c["small"] and c["product_margin"] is not None]
    wins = sum(c["winner"] == "product" for c in small_rows)
    claim1 = {
        "small_sizes": small,
        "product_wins": wins,
        "of": len(small_rows),
        "holds": bool(small_rows) and wins * 2 > len(small_rows),
        "per_size": clean,
    }

    rob = res["robustness"]
    sigmas = sorted({r["sigma"] for r in rob})
    claim2: dict[str, Any] = {"sigma_max": sigmas[-1] if sigmas else None, "conditions": {}}
    if len(sigmas) >= 2:
        rcell = {(r["fusion"], r["condition"], r["sigma"]): r["accuracy_mean"] for r in rob}
        held = 0
        conds = [c for c in ("img", "text", "both") if any(r["condition"] == c for r in rob)]
        for cond in conds:
            drops = {}
            for f in fusions:
                a0, a1 = rcell.get((f, cond, sigmas[0])), rcell.get((f, cond, sigmas[-1]))
                if a0 is not None and a1 is not None:
                    # relative: the share of the above-chance accuracy lost (chance = 0.5)
                    rel = (a0 - a1) / (a0 - 0.5) if a0 - 0.5 > 0.02 else None
                    drops[f] = {"clean": a0, "noisy": a1, "drop": a0 - a1, "relative_drop": rel}
            if not drops:
                continue
            most = max(drops, key=lambda f: drops[f]["drop"])
            best_noisy = max(drops, key=lambda f: drops[f]["noisy"])
            holds = "product" in drops and most == "product"
            held += holds
            claim2["conditions"][cond] = {
                "drops": drops,
                "largest_drop": most,
                "best_at_sigma_max": best_noisy,
                "product_loses_most": holds,
            }
        claim2["product_loses_most_in"] = held
        claim2["of"] = len(claim2["conditions"])
        claim2["holds"] = bool(claim2["conditions"]) and held * 2 > len(claim2["conditions"])
    else:
        claim2["holds"] = None
    return {"claim1_product_wins_small_data": claim1, "claim2_product_less_robust": claim2}


def summary_lines(res: dict[str, Any]) -> list[str]:
    """The printed summary: one answer per claim, with the numbers behind it; for a partial run
    (a summary with a ``verdict``) only which blocks are missing."""
    s = res["summary"]
    n_seeds = max((r["n_seeds"] for r in res["accuracy_vs_size"]), default=0)
    if "verdict" in s:
        return [
            f"summary ({res['status']}, {n_seeds} seed(s) so far, test accuracy mean over seeds):",
            f"  {s['verdict']}",
            "  the paper's two claims are answered only when every fusion has finished every seed; "
            "the tables hold the finished blocks",
        ]
    c1, c2 = s["claim1_product_wins_small_data"], s["claim2_product_less_robust"]
    lines = [f"summary ({res['status']}, {n_seeds} seed(s), test accuracy mean over seeds):"]
    if "product" not in _fusions(res):
        lines.append("  product fusion was not run: the paper's claims are not tested")
        return lines
    verdict = "YES" if c1["holds"] else "NO"
    lines.append(
        f"  1. does product win clean accuracy with little data (n ≤ {SMALL_MAX})? {verdict}: "
        f"best at {c1['product_wins']} of {c1['of']} small sizes"
    )
    for c in c1["per_size"]:
        if c["best_other"] is None:
            continue
        lines.append(
            f"     n = {c['size']:>4}: product {c['product']:.3f}, best other "
            f"{LABELS.get(c['best_other'], c['best_other'])} {c['accuracy'][c['best_other']]:.3f} "
            f"({c['product_margin']:+.3f})"
            + (
                f", Concatenation {c['accuracy']['concat']:.3f}"
                if c["best_other"] != "concat" and "concat" in c["accuracy"]
                else ""
            )
            + f"; winner {LABELS.get(c['winner'], c['winner'])}"
        )
    if c2.get("holds") is None:
        lines.append("  2. robustness: needs at least two σ values")
        return lines
    verdict = "YES" if c2["holds"] else "NO"
    lines.append(
        f"  2. does product lose more accuracy under noise (σ 0 → {c2['sigma_max']:g} × std, models "
        f"trained on n = {res['robustness_size']})? {verdict}: largest drop in "
        f"{c2['product_loses_most_in']} of {c2['of']} conditions (clean→noisy accuracy, change, share "
        "of the above-chance accuracy lost)"
    )
    for cond, c in c2["conditions"].items():
        parts = ", ".join(
            f"{LABELS.get(f, f)} {d['clean']:.3f}→{d['noisy']:.3f} ({-d['drop']:+.3f}"
            + (f", {100 * d['relative_drop']:.0f}%" if d["relative_drop"] is not None else "")
            + ")"
            for f, d in c["drops"].items()
        )
        lines.append(f"     noise on {cond}: {parts}")
    return lines


def size_table(res: dict[str, Any], metric: str = "accuracy") -> str:
    """Markdown: ``metric`` (mean ± sd over seeds) per training-set size (rows) and fusion (columns)."""
    fusions = _fusions(res)
    cell = {(r["fusion"], r["size"]): r for r in res["accuracy_vs_size"]}
    sizes = sorted({r["size"] for r in res["accuracy_vs_size"]}, key=_size_key)
    lines = [
        "| n train | " + " | ".join(LABELS.get(f, f) for f in fusions) + " |",
        "|---:|" + "---:|" * len(fusions),
    ]
    for s in sizes:
        vals = []
        row_best = max(
            (
                cell[(f, s)][f"{metric}_mean"]
                for f in fusions
                if (f, s) in cell and cell[(f, s)][f"{metric}_mean"] is not None
            ),
            default=None,
        )
        for f in fusions:
            r = cell.get((f, s))
            if r is None:
                vals.append("—")
                continue
            text = _fmt(r[f"{metric}_mean"], r[f"{metric}_sd"])
            best = (
                metric != "log_loss" and r[f"{metric}_mean"] is not None and r[f"{metric}_mean"] == row_best
            )
            vals.append(f"**{text}**" if best else text)
        n = next((cell[(f, s)]["n_train"] for f in fusions if (f, s) in cell), s)
        label = f"all ({n})" if s == "all" else s
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def robustness_table(res: dict[str, Any]) -> str:
    """Markdown: test accuracy (mean ± sd) per noise condition and σ (rows) and fusion (columns)."""
    fusions = _fusions(res)
    rob = res["robustness"]
    cell = {(r["fusion"], r["condition"], r["sigma"]): r for r in rob}
    sigmas = sorted({r["sigma"] for r in rob})
    conds = [c for c in ("img", "text", "both") if any(r["condition"] == c for r in rob)]
    lines = ["| noise on | σ / std | " + " | ".join(LABELS.get(f, f) for f in fusions) + " |"]
    lines.append("|---|---:|" + "---:|" * len(fusions))
    for cond in conds:
        for sg in sigmas:
            vals = [
                _fmt(cell[(f, cond, sg)]["accuracy_mean"], cell[(f, cond, sg)]["accuracy_sd"])
                if (f, cond, sg) in cell
                else "—"
                for f in fusions
            ]
            lines.append(f"| {cond} | {sg:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def backends_line(res: dict[str, Any]) -> str:
    """``tensor_fusion cpu 1200, low_rank_fusion cpu 1200, …`` from ``res["backends"]``."""
    counts = res.get("backends") or {}
    return (
        "; ".join(f"{op} " + ", ".join(f"{b} {n}" for b, n in per.items()) for op, per in counts.items())
        or "none recorded"
    )


def markdown(res: dict[str, Any]) -> str:
    """The whole ``results.md``: settings, the summary, and the three tables."""
    cfg = res["config"]
    task = "real tweets" if cfg.get("real") else "synthetic task"
    seeds: Sequence[int] = sorted({r["seed"] for r in res["runs"]})
    parts = [
        "# Tweet fusion comparison and robustness (fusionops)",
        "",
        f"Status: **{res['status']}** ({res['completed_blocks']}/{res['total_blocks']} "
        "(seed, fusion) blocks, "
        f"{res['seconds']:.0f} s). Data: {task}; seeds {', '.join(map(str, seeds)) or '—'}; "
        f"overrides {cfg.get('overrides') or 'none'}. Values: test set, mean ± sd over seeds; "
        "bold = best fusion of the row.",
        "",
        f"fusionops backends that served the layers (calls): {backends_line(res)}.",
        "",
        "## Summary",
        "",
        "```",
        *summary_lines(res),
        "```",
        "",
        "## Clean test accuracy against training-set size",
        "",
        size_table(res, "accuracy"),
        "",
        "## Clean test ROC AUC against training-set size",
        "",
        size_table(res, "roc_auc"),
        "",
        "## Robustness: test accuracy with Gaussian noise (σ × the modality's train std), "
        f"n = {res['robustness_size']}",
        "",
        robustness_table(res) if res["robustness"] else "(no robustness runs yet)",
        "",
    ]
    curves = res["roc"]["curves"]
    if curves:
        parts += [
            f"## ROC (n = {res['roc']['size']}, seed {res['roc']['seed']})",
            "",
            "| fusion | AUC |",
            "|---|---:|",
            *(f"| {LABELS.get(f, f)} | {c['auc']:.3f} |" for f, c in curves.items()),
            "",
        ]
    return "\n".join(parts)
