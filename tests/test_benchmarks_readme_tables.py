"""README's performance numbers agree with the committed CSVs and the op registry, and
``python -m fusionops.info`` prints one correct size rule per registered op."""

from __future__ import annotations

import csv
import re

import pytest

from benchmarks import readme_tables
from fusionops.info import report
from fusionops.registry import OPS


def test_readme_tables_match_the_committed_csvs():
    stale = readme_tables.stale()
    assert stale == [], f"stale README tables (run python -m benchmarks.readme_tables): {stale}"
    assert readme_tables.main(["--check"]) == 0


def _readme_rows(first_header_cell: str) -> list[list[str]]:
    text = readme_tables.README.read_text()
    start = text.index(f"| {first_header_cell} |")
    lines = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]


def test_tensor_fusion_table_parsed_against_the_csv():
    """Independent of the generator: every number of README's tensor fusion table, read back,
    is the CSV's (to its printed precision). The issue's example: N = 128 vs compile 0.88×."""
    with open(readme_tables.RESULTS / "tensor_fusion_cpu_2026-11-23_full.csv", newline="") as f:
        rows = {(r["n"], r["dims"], r["way"], r["mode"]): r for r in csv.DictReader(f)}
    table = _readme_rows("case (N, dims, O)")
    assert len(table) == 5
    for case, z, fwd, both_ms, vs_ref, vs_compile, peaks in table:
        n, dims = re.match(r"(\d+), \(([\d, ]+)\)", case).groups()
        key = (n, dims.replace(", ", "x"))
        fused, fused_fwd = rows[(*key, "fused[cpu]", "fwd+bwd")], rows[(*key, "fused[cpu]", "forward")]
        num = lambda s: [float(v) for v in re.findall(r"\d+\.\d+", s)]  # noqa: E731
        assert num(z) == pytest.approx([float(fused["z_mb"])], abs=0.051)
        assert num(fwd) == pytest.approx(
            [float(fused_fwd["median_ms"]), float(fused_fwd["speedup_vs_reference"])], abs=0.051
        )
        assert num(both_ms) == pytest.approx([float(fused["median_ms"])], abs=0.051)
        assert num(vs_ref) == pytest.approx([float(fused["speedup_vs_reference"])], abs=0.0051)
        assert num(vs_compile) == pytest.approx([float(fused["speedup_vs_compile"])], abs=0.0051)
        ways = ("fused[cpu]", "reference", "compile(reference)")
        want = [float(rows[(*key, w, "fwd+bwd")]["peak_extra_mb"]) for w in ways]
        assert num(peaks) == pytest.approx(want, abs=0.051)
    assert "0.88×" in table[0][5]


def test_render_rewrites_only_its_own_blocks_and_needs_each():
    text = "a\n<!-- generated: x (t) -->\nold\n<!-- end generated: x -->\n"
    text += "<!-- generated: other (t) -->\nkeep\n<!-- end generated: other -->\n"
    out = readme_tables.render(text, {"x": lambda: "new\n"})
    assert "new\n<!-- end generated: x -->" in out and "keep\n" in out and "old" not in out
    with pytest.raises(KeyError, match="no generated block"):
        readme_tables.render(text, {"x": lambda: "", "y": lambda: ""})


def test_info_prints_one_correct_rule_per_op():
    rules = [line for line in report().splitlines() if "automatic choice:" in line]
    assert sorted(line.split(" on cpu")[0] for line in rules) == sorted(OPS)
    for line in rules:
        op = OPS[line.split(" on cpu")[0]]
        assert "< 0" not in line and line.count("with gradients:") == 1 and line.count("inference:") == 1
        for mode, threshold in (("with gradients", op.cpu_min_size), ("inference", op.cpu_min_size_forward)):
            part = line.split(f"{mode}:", 1)[1].split(";")[0]
            if threshold:
                assert f"{op.size_metric} < {threshold}" in part, line
            elif op.cpu_min_modalities <= 1:
                assert "every call goes to the fused kernels" in part, line
            if op.cpu_min_modalities > 1:
                assert f"fewer than {op.cpu_min_modalities} modalities" in part, line
