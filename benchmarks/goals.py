"""Helpers for the ops' headline goals (each op's ``goals`` function lives in its module).

A goal is checked on the rows of one report run, so every time compared was measured side by
side (interleaved) on the same inputs, and every peak in a fresh child of the same run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from benchmarks.spec import Row


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def find(rows: Sequence[Row], case: str, way: str, mode: str = "fwd+bwd") -> Row | None:
    """The row of (case, way, mode) that ran without error, if any (None, too, for a mode the
    way does not serve, e.g. fwd+bwd of a forward-only baseline: it has no such row)."""
    return next(
        (r for r in rows if r["case"] == case and r["way"] == way and r["mode"] == mode and not r["error"]),
        None,
    )


def ms(row: Row) -> float:
    return float(row["median_ms"])  # type: ignore[arg-type]


def peak(row: Row) -> float | None:
    """Peak extra MB of a fwd+bwd row, None where memory was not measured."""
    return None if row.get("peak_extra_mb", "") == "" else float(row["peak_extra_mb"])  # type: ignore[arg-type]


def not_run(op: str, case: str, rows: Sequence[Row], what: str = "headline goal") -> str | None:
    """A line saying the headline case did not run (None when it did)."""
    if any(r["case"] == case for r in rows):
        return None
    return f"{op} {what}: case {case} not run (python -m benchmarks.report --op {op} --case headline)"


def best_fused(
    rows: Sequence[Row], case: str, wanted: Sequence[str], skipped: Mapping[str, str]
) -> tuple[Row | None, str]:
    """The fastest of the ``wanted`` fused ways that ran on ``case`` (fwd+bwd), or why none did."""
    ran = [r for w in wanted if (r := find(rows, case, w))]
    if ran:
        return min(ran, key=ms), ""
    return None, "; ".join(f"{w}: {skipped.get(w, 'failed or not run')}" for w in wanted)


def speedup_line(fused: Row, base: Row | None, base_name: str, need: float | None, why: str = "") -> str:
    """``time PASS: speed-up 2.10x >= 2x (fused[triton] 1.00 ms, reference 2.10 ms)``; without
    ``need``, an informative line with no verdict. A baseline that did not run (``why``) fails
    a goal that needs it."""
    if base is None:
        if need is None:
            return f"vs {base_name}: did not run, no ratio"
        return f"time FAIL: {base_name} did not run ({why or 'failed'}), no verdict"
    ratio = ms(base) / ms(fused)
    detail = f"{fused['way']} {ms(fused):.2f} ms, {base_name} {ms(base):.2f} ms"
    if need is None:
        return f"vs {base_name}: speed-up {ratio:.2f}x ({detail})"
    return f"time {verdict(ratio >= need)}: speed-up vs {base_name} {ratio:.2f}x >= {need:g}x ({detail})"


def no_slower_line(fused: Row, base: Row, base_name: str) -> str:
    """``time PASS: fused[cpu] 34.60 ms <= multibench 51.80 ms (speed-up 1.50x)``."""
    t_f, t_b = ms(fused), ms(base)
    return (
        f"time {verdict(t_f <= t_b)}: {fused['way']} {t_f:.2f} ms <= {base_name} {t_b:.2f} ms "
        f"(speed-up {t_b / t_f:.2f}x)"
    )


def mode_speedup_line(
    rows: Sequence[Row], case: str, fused_way: str, base_name: str, mode: str, skipped: Mapping[str, str]
) -> str | None:
    """``forward vs sklearn: speed-up 3.10x (...)``: an informative line (no verdict) comparing
    ``fused_way`` with a baseline in one ``mode``, e.g. a forward-only peer. ``skipped[base]``
    when the baseline could not run here; None when either row is missing for another reason
    (a mode not run, a failure)."""
    fused = find(rows, case, fused_way, mode)
    if fused is None:
        return None
    base = find(rows, case, base_name, mode)
    if base is None:
        return f"{mode} vs {base_name}: skipped ({skipped[base_name]})" if base_name in skipped else None
    return f"{mode} " + speedup_line(fused, base, base_name, None)
