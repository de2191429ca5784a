"""The tweet studies (experiments/tweet/studies.py): ROC helper and a tiny end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.reproduce import parse_args, study_config
from experiments.tweet import plots, report, studies
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
    assert set(on_disk["summary"]) == {
        "rule",
        "n_seeds",
        "claim1_product_wins_small_data",
        "claim2_product_less_robust",
    }
    assert on_disk["summary"] == res["summary"]
    for claim in ("claim1_product_wins_small_data", "claim2_product_less_robust"):
        # one seed: no interval, so no claim can be answered either way
        assert on_disk["summary"][claim]["verdict"] == "INCONCLUSIVE"
    # the noisy ROC panel: models of the robustness size, noise on both modalities
    noisy = on_disk["roc_noisy"]
    assert noisy["size"] == "all" and noisy["condition"] == "both" and noisy["sigma"] == 1.0
    assert set(noisy["curves"]) == {"concat", "product"}
    assert on_disk["roc"]["size"] == "16"  # the clean ROC at the smallest size
    # provenance: versions, commit, device, and the backend that served each op
    env = on_disk["environment"]
    assert env["versions"]["torch"] and env["versions"]["fusionops"] and "sha" in env["commit"]
    assert env["device"]["type"] == "cpu" and env["device"]["cpu_count"] >= 1
    assert sum(on_disk["backends"]["product_fusion"].values()) > 0
    assert all(r["n_val"] == 24 for r in on_disk["runs"])  # the whole validation split

    md = (tmp_path / "results.md").read_text()
    assert "## Summary" in md and "| n train | Concatenation | Product |" in md and "noise on" in md
    for name in ("accuracy_vs_size.png", "robustness.png", "roc.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind
    assert any("does product beat" in line for line in report.summary_lines(on_disk))
    assert "synthetic data (ours" in plots.caption(on_disk)


def test_bad_study_config_fails_fast(tmp_path: Path):
    with pytest.raises(ValueError, match="robust_size"):
        run_study(StudyConfig(sizes=(16,), robust_size=None), tmp_path, log=lambda _: None)
    with pytest.raises(ValueError, match="unknown TweetConfig"):
        run_study(StudyConfig(sizes=(None,), overrides={"epochz": 1}), tmp_path, log=lambda _: None)
    assert not (tmp_path / "results.json").exists()


def test_cli_arguments():
    cfg = study_config(parse_args(["--quick", "--seeds", "3", "--sizes", "32", "64", "--max-epochs", "5"]))
    assert cfg.n_seeds == 3 and cfg.sizes == (32, 64) and cfg.robust_size == 64 and cfg.clean_roc_size() == 32
    assert cfg.overrides["max_epochs"] == 5
    full = study_config(parse_args([]))
    assert (
        full.n_seeds == 10 and None in full.sizes and full.robust_size is None and full.clean_roc_size() == 32
    )
    quick = study_config(parse_args(["--quick"]))
    assert quick.n_seeds == studies.QUICK_SEEDS >= 5 and quick.robust_size in quick.sizes
    assert quick.val_size is None and quick.validation_size(32, 500) is None


def test_val_size_is_proportional_to_the_training_size():
    cfg = study_config(parse_args(["--val-size", "0.25"]))
    assert cfg.val_size == 0.25
    assert [cfg.validation_size(n, 500) for n in (2, 32, 128, 2000, 4000)] == [1, 8, 32, 500, 500]


def fake_results(diffs: dict[str, list[float]], drops: dict[str, list[float]]) -> dict:
    """A complete results dict without training: product's clean accuracy at n = 32 is 0.8 per
    seed, each rival's is 0.8 − diff; under noise on ``both`` each fusion loses ``drops``."""
    fusions = ("product", *diffs)
    n = len(diffs[next(iter(diffs))])
    runs, robust = [], []
    for f in fusions:
        for k in range(n):
            acc = 0.8 if f == "product" else 0.8 - diffs[f][k]
            runs.append(
                {
                    "fusion": f,
                    "size": "32",
                    "n_train": 32,
                    "n_val": 500,
                    "seed": k,
                    "accuracy": acc,
                    "roc_auc": acc,
                    "log_loss": 0.5,
                }
            )
            for sigma, a in ((0.0, 0.9), (2.0, 0.9 - drops[f][k])):
                robust.append(
                    {
                        "fusion": f,
                        "seed": k,
                        "condition": "both",
                        "sigma": sigma,
                        "accuracy": a,
                        "roc_auc": None,
                    }
                )
    res = {
        "status": "complete",
        "completed_blocks": n * len(fusions),
        "total_blocks": n * len(fusions),
        "config": {"fusions": list(fusions), "sizes": ["32"], "n_seeds": n, "seed": 0, "sigmas": [0.0, 2.0]},
        "runs": runs,
        "robustness_runs": robust,
        "robustness_size": "32",
        **studies.aggregate(runs, robust),
    }
    res["summary"] = report.summarize(res)
    return res


def test_verdicts_follow_the_paired_intervals():
    # product − concat: clearly positive; product − tensor: clearly negative; lowrank: around 0
    res = fake_results(
        {
            "concat": [0.10, 0.12, 0.11, 0.13],
            "tensorfusion": [-0.02, -0.03, -0.025, -0.02],
            "lowrank": [0.02, -0.03, 0.01, -0.01],
        },
        {
            "product": [0.30, 0.31, 0.29, 0.30],
            "concat": [0.10, 0.12, 0.11, 0.09],
            "tensorfusion": [0.28, 0.33, 0.27, 0.34],
            "lowrank": [0.1, 0.1, 0.1, 0.1],
        },
    )
    c1 = res["summary"]["claim1_product_wins_small_data"]
    row = c1["per_size"][0]
    assert row["product_minus"]["concat"]["verdict"] == "YES"
    assert row["product_minus"]["tensorfusion"]["verdict"] == "NO"
    assert row["product_minus"]["lowrank"]["verdict"] == "INCONCLUSIVE"
    iv = row["product_minus"]["concat"]
    assert iv["n"] == 4 and iv["mean"] == pytest.approx(0.115) and iv["low"] < 0.115 < iv["high"]
    assert c1["verdict"] == "NO" and c1["holds"] is False  # a rival significantly better: NO
    assert c1["vs_concat_verdict"] == "YES"
    c2 = res["summary"]["claim2_product_less_robust"]
    assert c2["conditions"]["both"]["product_drop_minus"]["concat"]["verdict"] == "YES"
    assert c2["conditions"]["both"]["product_drop_minus"]["tensorfusion"]["verdict"] == "INCONCLUSIVE"
    assert c2["verdict"] == "INCONCLUSIVE" and c2["holds"] is None
    md = report.markdown({**res, "seconds": 1.0, "roc": {"curves": {}}})
    assert (
        "YES if the interval lies above 0" in md and "| 1 (clean accuracy) | n = 32 | Concatenation |" in md
    )
    text = "\n".join(report.summary_lines(res))
    assert "? NO" in text and "? INCONCLUSIVE" in text and "1a. does product beat Concatenation" in text


def test_val_size_run_records_the_validation_examples(tmp_path: Path):
    res = run_study(replace(TINY, val_size=0.25), tmp_path, log=lambda _: None, plots=False)
    assert {(r["size"], r["n_val"]) for r in res["runs"]} == {("16", 4), ("all", 12)}
    assert res["config"]["val_size"] == 0.25
    md = (tmp_path / "results.md").read_text()
    assert "0.25 × the training size (--val-size; 4 at n = 16, 12 at n = all)" in md
    assert "| 16 (val 4) |" in md


def test_validation_subset_is_seeded_and_nested():
    from experiments.tweet.synthetic import make_synthetic
    from experiments.tweet.train import validation_subset

    val = make_synthetic(n_train=8, n_val=50, n_test=8, dim=4, seed=0).val
    small, big = validation_subset(val, 5, seed=3), validation_subset(val, 20, seed=3)
    assert len(small) == 5 and len(big) == 20
    assert torch.equal(small.img, big.img[:5])  # nested across sizes for one seed
    assert torch.equal(small.img, validation_subset(val, 5, seed=3).img)
    assert not torch.equal(small.img, validation_subset(val, 5, seed=4).img)
    assert validation_subset(val, None, seed=3) is val and validation_subset(val, 99, seed=3) is val
