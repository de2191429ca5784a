"""The studies' READMEs agree with their committed results: every generated block is what
``python -m experiments.readme_tables`` makes of the committed ``results.json``."""

from __future__ import annotations

import json

import pytest

from experiments import readme_tables
from experiments.mkl_lmf.mkl_part import MKLConfig


def test_readme_blocks_match_the_committed_results():
    stale = readme_tables.stale()
    assert stale == [], f"stale README blocks (run python -m experiments.readme_tables): {stale}"


def test_check_mode_exit_code(capsys):
    assert readme_tables.main(["--check"]) == 0
    assert "stale" not in capsys.readouterr().out


def test_render_replaces_only_the_blocks_and_needs_each_one():
    text = "a\n<!-- generated: x (tool) -->\nold\n<!-- end generated: x -->\nb\n"
    assert readme_tables.render(text, {"x": lambda: "new\n"}) == (
        "a\n<!-- generated: x (tool) -->\nnew\n<!-- end generated: x -->\nb\n"
    )
    with pytest.raises(KeyError, match="no generated block y"):
        readme_tables.render(text, {"x": lambda: "", "y": lambda: ""})
    with pytest.raises(KeyError, match="unknown generated block 'x'"):
        readme_tables.render(text, {})


def test_tweet_readme_has_every_size_of_the_run():
    res = json.loads((readme_tables.TWEET / "results" / "results.json").read_text())
    readme = (readme_tables.TWEET / "README.md").read_text()
    for size in res["config"]["sizes"]:
        label = f"| all ({res['data']['0']['n_train']})" if size == "all" else f"| {size} |"
        assert label in readme, size
    assert "which the paper found weaker" not in readme


def test_mkl_readme_amplitudes_are_the_codes():
    amplitudes = ", ".join(f"{a:g}" for a in MKLConfig().sim.amplitudes)
    res = json.loads((readme_tables.MKL / "results" / "results.json").read_text())
    assert res["config"]["mkl"]["sim"]["amplitudes"] == list(MKLConfig().sim.amplitudes)
    readme = (readme_tables.MKL / "README.md").read_text()
    assert f"Amplitudes a = ({amplitudes})" in readme and "(0.15, 0.13, 0)" not in readme
