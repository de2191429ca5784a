"""The report's console table of one op's rows."""

from __future__ import annotations

from benchmarks.spec import OpSpec, Row


def _ratio(v: object) -> str:
    return f"{v:.2f}x" if v != "" else "-"


def _throughput(spec: OpSpec, rows: list[Row], gpu: bool) -> tuple[str, str, float] | None:
    """(header, row key, scale) of the throughput column: GB/s for memory-bound ops, else FLOP/s."""
    if any("gbps" in r for r in rows):
        return "GB/s", "gbps", 1.0
    if any("tflops" in r for r in rows):
        return ("TFLOP/s", "tflops", 1.0) if gpu else ("GFLOP/s", "tflops", 1e3)
    return None


def print_table(spec: OpSpec, rows: list[Row], device: str) -> None:
    base_cols = [
        (f"vs {'ref' if b.column == 'reference' else b.column}", f"speedup_vs_{b.column}")
        for b in spec.baselines
    ]
    extra = [spec.table_column[:2]] if spec.table_column else []
    thr = _throughput(spec, rows, device.startswith("cuda"))
    head = ["case", "way", "mode", "median ms", *(h for h, _ in base_cols), "peak MB", *(h for h, _ in extra)]
    frac = next((k for k in ("frac_matmul", "frac_bandwidth") if any(k in r for r in rows)), None)
    head += [thr[0]] if thr else []
    head += [{"frac_matmul": "of matmul", "frac_bandwidth": "of copy"}[frac]] if frac else []
    lines = [head]
    for r in rows:
        line = [str(r["case"]), str(r["way"]), str(r["mode"])]
        if r["error"]:
            line += ["error"] + [""] * len(base_cols) + [""]
        else:
            line += [
                f"{r['median_ms']:.3f}",
                *(_ratio(r[k]) for _, k in base_cols),
                f"{r['peak_extra_mb']:.1f}" if r["peak_extra_mb"] != "" else "-",
            ]
        line += [f"{r[k]:.1f}" for _, k in extra]
        if thr:
            line += [f"{float(r[thr[1]]) * thr[2]:.1f}" if r.get(thr[1], "") != "" else ""]  # type: ignore[arg-type]
        if frac:
            line += [f"{100 * float(r[frac]):.0f}%" if r.get(frac, "") != "" else ""]  # type: ignore[arg-type]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print(
            "  ".join(
                c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "vs X: speed-up (X's median / this median; > 1 is faster). "
        "peak MB: extra peak of one fwd+bwd (fresh child process)."
    )
