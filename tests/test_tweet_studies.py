"""The tweet studies (experiments/tweet/studies.py): ROC helper and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.reproduce import parse_args, study_config
from experiments.tweet import report, studies
from experiments.tweet.studies import StudyConfig, roc_curve, run_study

TINY = StudyConfig(
    fusions=("concat", "product"),
    sizes=(16, None),
    n_seeds=1,
    sigmas=(0.0, 1.0),
    overrides={"max_epochs": 3, "stop_window": 2},
    synthetic={"n_train": 48, "n_val": 24, "n_test": 40, "dim": 16},
)


def test_roc_curve_matches_rank_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # many ties
    c = roc_curve(scores, labels)
    assert c["fpr"][0] == c["tpr"][0] == 0.0 and c["fpr"][-1] == c["tpr"][-1] == 1.0
    assert np.all(np.diff(c["fpr"]) >= 0) and np.all(np.diff(c["tpr"]) >= 0)
    pos, neg = scores[labels == 1], scores[labels == 0]
    mw = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert c["auc"] == pytest.approx(mw, abs=1e-12)
    assert roc_curve([0.1, 0.9], [0, 1])["auc"] == 1.0
    with pytest.raises(ValueError):
        roc_curve([0.1, 0.2], [1, 1])


def test_tiny_study_end_to_end(tmp_path: Path):
    snapshots: list[dict] = []
    real_save = studies.write_json_atomic

    def spy(path, obj):  # keep a parsed copy of each JSON the run writes
        real_save(path, obj)
        snapshots.append(json.loads(Path(path).read_text()))

    studies.write_json_atomic = spy
    try:
        res = run_study(TINY, tmp_path, log=lambda _: None)
    finally:
        studies.write_json_atomic = real_save

    # one JSON per (seed, fusion) block plus the final one; the first is a valid partial result
    assert len(snapshots) == 3
    first = snapshots[0]
    assert first["status"] == "partial" and first["completed_blocks"] == 1
    assert {r["fusion"] for r in first["runs"]} == {"concat"}

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["completed_blocks"] == on_disk["total_blocks"] == 2
    assert len(on_disk["runs"]) == 4  # 2 fusions × 2 sizes × 1 seed
    assert {(r["fusion"], r["size"]) for r in on_disk["accuracy_vs_size"]} == {
        (f, s) for f in ("concat", "product") for s in ("16", "all")
    }
    for r in on_disk["accuracy_vs_size"]:
        assert 0 <= r["accuracy_mean"] <= 1 and r["accuracy_sd"] == 0.0 and r["n_seeds"] == 1
    assert len(on_disk["robustness"]) == 2 * 3 * 2  # fusions × conditions × σ
    clean = {r["fusion"]: r["accuracy"] for r in on_disk["runs"] if r["size"] == "all"}
    for r in on_disk["robustness"]:
        if r["sigma"] == 0.0:  # σ = 0 is the clean accuracy
            assert r["accuracy_mean"] == pytest.approx(clean[r["fusion"]])
    for curve in on_disk["roc"]["curves"].values():
        assert len(curve["fpr"]) == len(curve["tpr"]) and 0 <= curve["auc"] <= 1
    assert set(on_disk["summary"]) == {"claim1_product_wins_small_data", "claim2_product_less_robust"}
    assert on_disk["summary"] == res["summary"]

    md = (tmp_path / "results.md").read_text()
    assert "## Summary" in md and "| n train | Concatenation | Product |" in md and "noise on" in md
    for name in ("accuracy_vs_size.png", "robustness.png", "roc.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind
    assert any("does product win" in line for line in report.summary_lines(on_disk))


def test_bad_study_config_fails_fast(tmp_path: Path):
    with pytest.raises(ValueError, match="robust_size"):
        run_study(StudyConfig(sizes=(16,), robust_size=None), tmp_path, log=lambda _: None)
    with pytest.raises(ValueError, match="unknown TweetConfig"):
        run_study(StudyConfig(sizes=(None,), overrides={"epochz": 1}), tmp_path, log=lambda _: None)
    assert not (tmp_path / "results.json").exists()


def test_cli_arguments():
    cfg = study_config(parse_args(["--quick", "--seeds", "3", "--sizes", "32", "64", "--max-epochs", "5"]))
    assert cfg.n_seeds == 3 and cfg.sizes == (32, 64) and cfg.robust_size == cfg.roc_size == 64
    assert cfg.overrides["max_epochs"] == 5
    full = study_config(parse_args([]))
    assert full.n_seeds == 5 and None in full.sizes and full.robust_size is None
