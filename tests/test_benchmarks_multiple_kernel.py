"""The multiple-kernel benchmark definition (benchmarks/ops/multiple_kernel.py): every baseline
way, and scikit-learn's pairwise kernels, compute the reference's K (so their times compare like
with like); the case's counts; the headline goals on made-up rows; the forward-only ``sklearn``
way (``Baseline.modes``) gets forward rows, tests and ratios only, and no memory child."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks import memory, ops, runner, suite, table, ways
from benchmarks.csvfile import write_csv
from benchmarks.ops.multiple_kernel import HEADLINE, MIXES, SPEC, Case, sklearn_pairwise
from benchmarks.spec import MODES, Baseline
from fusionops import reference

SMALL = [Case(f"{mix}-small", 9, 11, (5, 3, 7), kernels) for mix, kernels in MIXES.items()]


def expected_k(inp) -> torch.Tensor:
    xs_a, xs_b, beta, kernels = inp.args
    return reference.multiple_kernel(xs_a, xs_b, beta, kernels).detach()


@pytest.mark.parametrize("way_name", [b.name for b in SPEC.baselines])
def test_every_baseline_computes_the_reference(way_name):
    case = SMALL[0]  # every base kernel kind; one case, so compile(reference) compiles once
    if why := SPEC.baseline(way_name).reasons("cpu", case.dtype):  # e.g. scikit-learn not installed
        pytest.skip("; ".join(why))
    inp = SPEC.make_inputs(case, "cpu", False)
    got = ways.way_by_name(SPEC, way_name).fn(*inp.args)
    assert got.shape == (case.n, case.n_b)
    torch.testing.assert_close(got, expected_k(inp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_sklearn_pairwise_computes_the_reference(case):
    pytest.importorskip("sklearn")
    inp = SPEC.make_inputs(case, "cpu", False)
    torch.testing.assert_close(sklearn_pairwise(*inp.args), expected_k(inp), rtol=1e-5, atol=1e-4)


def test_case_counts():
    case = HEADLINE["cpu"][0]
    assert (case.n, case.n_b, case.dims) == (4096, 4096, (128, 64, 300))
    assert case.kernels == ("rbf", "poly2", "linear")
    assert case.flops("forward") == 2 * 4096 * 4096 * 492
    assert case.flops("fwd+bwd") == 3 * case.flops("forward")
    assert case.columns()["k_mb"] == 67.109  # K alone, 4096² fp32
    assert case.columns()["gram_mb"] == 3 * 67.109
    assert Case.from_dict(case.to_dict()) == case  # the memory children's JSON round trip


def _rows(case: str, fused_ms: float, ref_ms: float, fused_mb: float, ref_mb: float) -> list[dict]:
    def row(way, mode, ms, peak):
        return {"case": case, "way": way, "mode": mode, "error": "", "median_ms": ms, "peak_extra_mb": peak}

    return [
        row("fused[cpu]", "fwd+bwd", fused_ms, fused_mb),
        row("reference", "fwd+bwd", ref_ms, ref_mb),
        row("fused[cpu]", "forward", fused_ms / 3, ""),
        row("reference", "forward", ref_ms / 3, ""),
    ]


def test_goals_pass_and_fail_on_the_thresholds():
    good, bad = HEADLINE["cpu"]
    rows = _rows(good.name, 100.0, 160.0, 90.0, 400.0) + _rows(bad.name, 100.0, 140.0, 90.0, 200.0)
    text = "\n".join(SPEC.goals(rows, "cpu", {}))
    first, second = text.split(f"({bad.name}")
    assert "time PASS" in first and "memory PASS" in first and "forward vs reference" in first
    assert "time FAIL" in second and "memory FAIL" in second


def test_goals_say_when_nothing_ran():
    lines = SPEC.goals([], "cpu", {})
    assert len(lines) == len(HEADLINE["cpu"]) and all("not run" in line for line in lines)
    rows = [r for r in _rows(HEADLINE["cuda"][0].name, 1.0, 2.0, 1.0, 9.0) if r["way"] == "reference"]
    why = {"fused[triton]": "no GPU", "fused[cuda]": "no GPU"}
    assert "FAIL: no fused way ran (fused[triton]: no GPU" in "\n".join(SPEC.goals(rows, "cuda", why))


def test_goals_give_the_reference_error():
    """At the GPU headline in fp32 the reference may run out of memory: the goal says so."""
    case = HEADLINE["cuda"][-1].name
    rows = [r for r in _rows(case, 1.0, 2.0, 1.0, 9.0) if r["way"] == "fused[cpu]"]
    rows = [{**r, "way": "fused[triton]"} for r in rows]
    oom = "OutOfMemoryError: CUDA out of memory"
    rows.append({"case": case, "way": "reference", "mode": "fwd+bwd", "error": oom})
    text = "\n".join(SPEC.goals(rows, "cuda", {}))
    assert "time FAIL: reference did not run (OutOfMemoryError" in text
    assert "memory FAIL: reference did not run (OutOfMemoryError" in text


# --- the forward-only sklearn way (Baseline.modes) --------------------------------------------

TINY = Case("tiny-mixed", 6, 7, (3, 2, 4), MIXES["mixed"])


def test_sklearn_is_a_forward_only_baseline_skipped_where_it_cannot_run():
    pytest.importorskip("sklearn")
    assert ways.way_modes(SPEC, "sklearn") == ("forward",)
    assert all(ways.way_modes(SPEC, b.name) == MODES for b in SPEC.baselines if b.name != "sklearn")
    available, skipped = ways.available_ways(SPEC, "cpu", "fp32")
    assert "sklearn" in [w.name for w in available] and "sklearn" not in dict(skipped)
    for device, dtype, why in (("cuda", "fp32", "CPU numpy arrays only"), ("cpu", "bf16", "float32/float64")):
        assert why in "; ".join(SPEC.baseline("sklearn").reasons(device, dtype))
    way = ways.way_by_name(SPEC, "sklearn")
    inp = SPEC.make_inputs(TINY, "cpu", True)
    ways.make_step(way, inp, "forward")()()  # runs
    for mode in ("backward", "fwd+bwd"):
        with pytest.raises(ValueError, match="serves only forward"):
            ways.make_step(way, inp, mode)
    with pytest.raises(ValueError, match="no fwd\\+bwd to measure"):
        memory._child({"op": SPEC.name, "case": TINY.to_dict(), "way": "sklearn", "device": "cpu"})


def test_every_other_op_keeps_every_way_in_every_mode():
    for spec in ops.OPS.values():
        names = [n for n in ways.all_way_names(spec) if (spec.name, n) != ("multiple_kernel", "sklearn")]
        assert all(ways.way_modes(spec, n) == MODES for n in names), spec.name


def test_baseline_modes_are_checked():
    with pytest.raises(ValueError, match="non-empty subset"):
        Baseline("x", "x", lambda: reference.multiple_kernel, modes=("sideways",))
    forward_only = Baseline("x", "x", lambda: reference.multiple_kernel, modes=("forward",))
    with pytest.raises(ValueError, match="must serve every mode"):
        dataclasses.replace(SPEC, baselines=(forward_only, *SPEC.baselines))


def test_the_suite_has_no_test_for_a_mode_a_way_lacks():
    @suite.parametrize(SPEC)
    def fn(case, way_name, mode): ...

    (pairs,) = [m.args[1] for m in fn.pytestmark if m.args[0] == ("mode", "way_name")]
    assert ("forward", "sklearn") in pairs
    assert not [p for p in pairs if p[1] == "sklearn" and p[0] != "forward"]
    assert len(pairs) == 5 * len(MODES) + 1  # fused x3, reference, compile(reference): every mode


def test_a_forward_only_way_gets_forward_rows_only_through_the_report_path(monkeypatch, capsys, tmp_path):
    """The real runner.time_case, add_memory (children stubbed), add_ratios, table, CSV and goals
    on a tiny case: sklearn has forward rows only, no error row anywhere, no memory child."""
    pytest.importorskip("sklearn")
    # No compile(reference) (compiling is slow); a new spec object, so available_ways' cache is its own.
    spec = dataclasses.replace(SPEC, baselines=tuple(b for b in SPEC.baselines if not b.compiled))
    knobs = {"seconds": 0.001, "rounds": 1}
    rows = runner.time_case(spec, TINY, "cpu", MODES, knobs, {"device_name": "test"})
    assert not [r for r in rows if r["error"]]
    by_way: dict[str, list[str]] = {}
    for r in rows:
        by_way.setdefault(str(r["way"]), []).append(str(r["mode"]))
    assert by_way["sklearn"] == ["forward"]
    assert by_way["reference"] == list(MODES)

    asked = []

    def fake_peaks(jobs, device, workers):
        asked.extend(jobs)
        return {job: memory.Peak(1_000_000, 0, "fake") for job in jobs}

    monkeypatch.setattr(memory, "peak_extra_many", fake_peaks)
    runner.add_memory([(spec, TINY, rows)], "cpu", 1)
    assert asked and all(way != "sklearn" for _, _, way in asked)
    assert all(r["peak_extra_mb"] == 1.0 for r in rows if r["mode"] == "fwd+bwd")

    runner.add_ratios(spec, rows)
    assert all("mem_vs_sklearn" not in r for r in rows)
    assert all(r["speedup_vs_sklearn"] != "" for r in rows if r["mode"] == "forward")
    assert all(r["speedup_vs_sklearn"] == "" for r in rows if r["mode"] != "forward")
    table.print_table(spec, rows, "cpu")
    out = capsys.readouterr().out
    assert "vs sklearn" in out and "error" not in out
    path = tmp_path / "mkl.csv"
    write_csv(rows, path)
    assert "speedup_vs_sklearn" in path.read_text().splitlines()[0]


def test_goals_show_the_forward_speedup_over_sklearn():
    case = HEADLINE["cpu"][0].name
    rows = _rows(case, 100.0, 160.0, 90.0, 400.0)
    rows.append({"case": case, "way": "sklearn", "mode": "forward", "error": "", "median_ms": 90.0})
    text = "\n".join(SPEC.goals(rows, "cpu", {}))
    assert "forward vs sklearn: speed-up 2.70x" in text and "time PASS" in text
    skipped = {"sklearn": "scikit-learn is not installed"}
    text = "\n".join(SPEC.goals(rows[:-1], "cpu", skipped))
    assert "forward vs sklearn: skipped (scikit-learn is not installed)" in text
