"""The benchmark regression gate (benchmarks.compare) and the measured machine limits
(benchmarks.limits), on small CSVs and probes the tests make themselves."""

from __future__ import annotations

import math
import re

import pytest

from benchmarks import compare, limits
from benchmarks.csvfile import write_csv

WAYS = {"fused[cpu]": 10.0, "reference": 30.0, "compile(reference)": 20.0}


def rows(device="Xeon (2 threads)", scale=None, error_way=None):
    """Report-like rows of two cases x the ways above, fwd+bwd; ``scale`` multiplies one way's
    time ({way: factor}) and ``speedup_vs_reference`` follows, as the report computes it."""
    scale = scale or {}
    out = []
    for case in ("small", "large"):
        times = {w: t * scale.get(w, 1.0) * (3 if case == "large" else 1) for w, t in WAYS.items()}
        for way, ms in times.items():
            out.append(
                {
                    "device_name": device,
                    "op": "tensor_fusion",
                    "case": case,
                    "way": way,
                    "mode": "fwd+bwd",
                    "error": "boom" if way == error_way else "",
                    "median_ms": ms,
                    "speedup_vs_reference": round(times["reference"] / ms, 3),
                }
            )
    return out


def run(tmp_path, old, new, *args):
    write_csv(old, tmp_path / "old.csv")
    write_csv(new, tmp_path / "new.csv")
    return compare.main([str(tmp_path / "old.csv"), str(tmp_path / "new.csv"), *args])


def test_identical_runs_pass(tmp_path, capsys):
    assert run(tmp_path, rows(), rows()) == 0
    assert "PASS: 0 fused rows" in capsys.readouterr().out


def test_a_slower_fused_way_fails(tmp_path, capsys):
    assert run(tmp_path, rows(), rows(scale={"fused[cpu]": 1.5})) == 1
    out = capsys.readouterr().out
    assert out.count("SLOWER") == 2 and "FAIL: 2 fused rows" in out


def test_within_the_threshold_passes_and_the_threshold_is_an_option(tmp_path):
    assert run(tmp_path, rows(), rows(scale={"fused[cpu]": 1.35})) == 0
    assert run(tmp_path, rows(), rows(scale={"fused[cpu]": 1.2}), "--threshold", "0.1") == 1


def test_rows_under_min_ms_are_shown_but_not_gated(tmp_path, capsys):
    """Sub-millisecond CPU rows swing by ±30% between identical runs (the gate's spread
    measurement), so by default they are not gated; --min-ms 0 gates them too."""
    fast = [{**r, "median_ms": r["median_ms"] / 100} for r in rows()]
    slow = [{**r, "median_ms": r["median_ms"] / 100} for r in rows(scale={"fused[cpu]": 2.0})]
    assert run(tmp_path, fast, slow) == 0
    assert "not gated" in capsys.readouterr().out
    assert run(tmp_path, fast, slow, "--min-ms", "0") == 1


def test_folders_of_csvs_are_compared(tmp_path):
    for name, scale in (("old", {}), ("new", {"fused[cpu]": 1.5})):
        (tmp_path / name).mkdir()
        write_csv(rows(scale=scale), tmp_path / name / "tensor_fusion_cpu_quick.csv")
        (tmp_path / name / "crossover_cpu.csv").write_text("op,case\nx,y\n")  # not a report CSV
    assert compare.main([str(tmp_path / "old"), str(tmp_path / "new")]) == 1


def test_slower_baselines_alone_do_not_fail(tmp_path, capsys):
    assert run(tmp_path, rows(), rows(scale={"reference": 2.0, "compile(reference)": 2.0})) == 0
    assert "(baseline)" in capsys.readouterr().out


def test_across_machines_the_speedup_is_compared(tmp_path, capsys):
    """Another device 3x slower at everything: same speed-ups, so no regression; but a fused
    way that lost half its speed-up fails."""
    slow_machine = {w: 3.0 for w in WAYS}
    assert run(tmp_path, rows(), rows(device="H100", scale=slow_machine)) == 0
    assert "metric: speedup" in capsys.readouterr().out
    worse = {**slow_machine, "fused[cpu]": 6.0}
    assert run(tmp_path, rows(), rows(device="H100", scale=worse)) == 1
    assert run(tmp_path, rows(), rows(device="H100", scale=worse), "--metric", "time") == 1


def test_rows_with_errors_are_not_compared(tmp_path, capsys):
    assert run(tmp_path, rows(), rows(error_way="fused[cpu]", scale={"fused[cpu]": 9.0})) == 2
    assert "no fused row measured in both files" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda p: None, r"no such file or folder"),
        (lambda p: p.write_text("a,b\n1,2\n"), r"not a benchmarks.report CSV \(missing columns"),
    ],
)
def test_unusable_input_exits_2(tmp_path, capsys, make, pattern):
    write_csv(rows(), tmp_path / "new.csv")
    make(tmp_path / "old.csv")
    assert compare.main([str(tmp_path / "old.csv"), str(tmp_path / "new.csv")]) == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_limits_are_measured_and_scale_rows():
    lim = limits.measure("cpu", matmul_n=64, copy_mb=1)
    assert lim.matmul_dtype == "float32"
    assert math.isfinite(lim.matmul_tflops) and lim.matmul_tflops > 0
    assert math.isfinite(lim.bandwidth_gbps) and lim.bandwidth_gbps > 0
    info = {"matmul_tflops": "2.0", "bandwidth_gbps": "50"}
    assert limits.fractions({"tflops": 0.5}, info) == {"frac_matmul": 0.25}
    assert limits.fractions({"gbps": 10.0}, info) == {"frac_bandwidth": 0.2}
    assert limits.fractions({"tflops": 0.5}, {}) == {}


@pytest.mark.parametrize(
    "input_bytes, l2, expected",
    [
        (10 << 20, 50 << 20, 8),
        (30 << 20, 50 << 20, 4),
        (200 << 20, 50 << 20, 1),
        (1 << 20, 50 << 20, 8),
        (0, 50, 1),
    ],
)
def test_rotation_copies_span_twice_l2(input_bytes, l2, expected):
    assert limits.rotation_copies(input_bytes, l2) == expected
