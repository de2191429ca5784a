"""The fixed-cost benchmark (benchmarks/fixed_cost.py) runs every way of every op and prints the
issue's targets; its raw kernels compute what the public ops compute."""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import fixed_cost
from fusionops import _extension

pytestmark = pytest.mark.skipif(not _extension.extension_loaded(), reason="the C++ extension is not built")


def test_raw_kernels_and_linear_on_z_compute_the_public_result():
    for case in fixed_cost.cases():
        expected = case.reference().detach()
        torch.testing.assert_close(case.raw(), expected, rtol=1e-4, atol=1e-4, msg=case.name)
        torch.testing.assert_close(case.public().detach(), expected, rtol=1e-4, atol=1e-4, msg=case.name)
        if case.linear_on_z is not None:
            torch.testing.assert_close(case.linear_on_z().detach(), expected, rtol=1e-4, atol=1e-4)


def test_quick_run_writes_every_way_and_the_goals(tmp_path, capsys):
    fixed_cost.main(["--op", "tensor_fusion", "--op", "product_fusion", "--rounds", "1", "--budget", "0.001",
                     "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    # tensor fusion's 6 targets, then "automatic <= reference" per case and mode
    n_cases = sum(c.op in ("tensor_fusion", "product_fusion") for c in fixed_cost.cases())
    assert out.count("PASS") + out.count("FAIL") == 6 + n_cases * len(fixed_cost.MODES), out
    assert "product_fusion research N=64 d=128 M=2 fwd+bwd, automatic:" in out
    (path,) = tmp_path.glob("fixed_cost_cpu_*.csv")
    rows = list(csv.DictReader(path.open()))
    ways = {(r["op"], r["way"]) for r in rows}
    assert ("tensor_fusion", "linear on Z") in ways and ("product_fusion", "raw kernel") in ways
    assert {r["mode"] for r in rows} == set(fixed_cost.MODES)
    assert all(float(r["us_per_call"]) > 0 and r["git_commit"] for r in rows)
