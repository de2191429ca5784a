"""Plots of a report: speed-up and peak memory against N, one PNG per sweep of shapes."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from benchmarks.spec import OpSpec, Row


def plot(spec: OpSpec, rows: list[Row], csv_path: Path) -> list[Path]:
    """Write ``<csv stem>_<sweep>.png`` for every sweep with at least two values of N.

    Left: fwd+bwd speed-up of every way over the op's reference against N.
    Right: peak extra memory of one fwd+bwd against N, with the bytes of what the reference
    materialises (the op's table column, when it has one) and of y + gradients for scale.
    Returns the files written; matplotlib missing means none (and says so).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("plots: matplotlib is not installed (pip install matplotlib); no plots written")
        return []

    sweeps: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        if row["mode"] == "fwd+bwd" and not row["error"]:
            sweeps[str(row["sweep"])].append(row)
    written = []
    for sweep, srows in sweeps.items():
        ns = sorted({int(r["n"]) for r in srows})  # type: ignore[call-overload]
        if len(ns) < 2:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, way in enumerate(dict.fromkeys(str(r["way"]) for r in srows)):
            color = f"C{i}"  # one colour per way in both panels
            pts = sorted(((int(r["n"]), r) for r in srows if r["way"] == way), key=lambda p: p[0])  # type: ignore[call-overload]
            if way != spec.reference:
                sp = [(n, r["speedup_vs_reference"]) for n, r in pts if r["speedup_vs_reference"]]
                if sp:
                    ax_t.plot(*zip(*sp, strict=True), marker="o", color=color, label=way)
            mem = [(n, r["peak_extra_mb"]) for n, r in pts if r["peak_extra_mb"] != ""]
            if mem:
                ax_m.plot(*zip(*mem, strict=True), marker="o", color=color, label=way)
        scales = [("out_mb", "k:", "bytes of y + gradients")]
        if spec.table_column:
            _, key, label = spec.table_column
            scales.insert(0, (key, "k--", label))
        for key, style, label in scales:
            pts = sorted({(int(r["n"]), float(r[key])) for r in srows if key in r})  # type: ignore[call-overload,arg-type]
            if pts:
                ax_m.plot(*zip(*pts, strict=True), style, label=label)
        ax_t.axhline(1.0, color="grey", lw=0.8, label=f"{spec.reference} (1x)")
        ax_t.set(
            xscale="log",
            xlabel="N (rows)",
            ylabel=f"speed-up vs {spec.reference} (×)",
            title=f"fwd+bwd time, {sweep}",
        )
        ax_m.set(
            xscale="log",
            yscale="log",
            xlabel="N (rows)",
            ylabel="peak extra memory (MB)",
            title=f"fwd+bwd peak memory, {sweep}",
        )
        for ax in (ax_t, ax_m):
            ax.set_xticks(ns, [str(n) for n in ns])  # label the measured N, not decades
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax_m.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_m.yaxis.set_minor_formatter(NullFormatter())
        fig.suptitle(f"{spec.title} on {rows[0]['device_name']}", fontsize=9)
        fig.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", sweep).strip("-")
        path = csv_path.with_name(f"{csv_path.stem}_{slug}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
