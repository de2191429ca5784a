"""The multiple-kernel benchmark definition (benchmarks/ops/multiple_kernel.py): every baseline
way, and scikit-learn's pairwise kernels, compute the reference's K (so their times compare like
with like); the case's counts; the headline goals on made-up rows."""

from __future__ import annotations

import pytest
import torch

from benchmarks import ways
from benchmarks.ops.multiple_kernel import HEADLINE, MIXES, SPEC, Case, sklearn_pairwise
from fusionops import reference

SMALL = [Case(f"{mix}-small", 9, 11, (5, 3, 7), kernels) for mix, kernels in MIXES.items()]


def expected_k(inp) -> torch.Tensor:
    xs_a, xs_b, beta, kernels = inp.args
    return reference.multiple_kernel(xs_a, xs_b, beta, kernels).detach()


@pytest.mark.parametrize("way_name", [b.name for b in SPEC.baselines])
def test_every_baseline_computes_the_reference(way_name):
    case = SMALL[0]  # every base kernel kind; one case, so compile(reference) compiles once
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
