"""The MKL → low-rank tensors study (experiments/mkl_lmf): data generators, kernel PCA and the
separability score on hand examples, a tiny end-to-end run of both parts, the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.mkl_lmf import data
from experiments.mkl_lmf.__main__ import parse_args, study_config
from experiments.mkl_lmf.kpca import fisher_ratio, kernel_pca
from experiments.mkl_lmf.lmf_part import LMFConfig, build_model, parameter_count, steady_fall
from experiments.mkl_lmf.mkl_part import MKLConfig
from experiments.mkl_lmf.study import FILES, StudyConfig, render, run_study


def test_digit_views_shapes_and_content():
    d = data.digit_views()
    assert len(d) == 1797 and d.names == data.DIGIT_VIEWS
    assert [tuple(v.shape) for v in d.views] == [(1797, 32), (1797, 32), (1797, 16)]
    assert set(d.labels.tolist()) == set(range(10))
    # the profiles are the row and column sums of the image the two halves make up
    image = torch.cat([d.views[0], d.views[1]], 1).reshape(-1, 8, 8)
    assert torch.equal(d.views[2], torch.cat([image.sum(2), image.sum(1)], 1))


def test_split_and_standardize():
    train, test = data.split(50, 30, seed=1)
    assert len(train) == 30 and len(test) == 20
    assert sorted(torch.cat([train, test]).tolist()) == list(range(50))
    assert torch.equal(train, data.split(50, 30, seed=1)[0]) and not torch.equal(
        train, data.split(50, 30, 2)[0]
    )
    x = torch.randn(50, 4, dtype=torch.float64) * 3 + 1
    x[:, 3] = 2.0  # a constant feature stays finite (zero)
    (z,) = data.standardize([x], train)
    assert torch.allclose(z[train, :3].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z[train, :3].std(0), torch.ones(3, dtype=torch.float64))
    assert torch.equal(z[:, 3], torch.zeros(50, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_train"):
        data.split(10, 10, seed=0)


def test_simulated_mkl_structure():
    sim = data.SimulatedMKL()
    a, b, c = sim.make(400, 3), sim.make(400, 3), sim.make(400, 4)
    assert [tuple(v.shape) for v in a.views] == [(400, 128), (400, 64), (400, 300)]
    assert a.names == ("visual", "audio", "text")
    assert torch.bincount(a.labels).tolist() == [100] * 4
    assert all(torch.equal(u, v) for u, v in zip(a.views, b.views, strict=True))
    assert not torch.equal(a.views[0], c.views[0])

    # the generator draws the same noise whatever the amplitudes, so the difference from a
    # signal-free draw is the class signal a_m · μ_y P_m itself
    pure = replace(sim, amplitudes=(0.0, 0.0, 0.0)).make(400, 3)
    assert torch.equal(pure.labels, a.labels)
    signal = [v - p for v, p in zip(a.views, pure.views, strict=True)]
    for sig in signal:  # a function of the class only
        for k in range(4):
            rows = sig[a.labels == k]
            assert torch.allclose(rows, rows[:1].expand_as(rows), atol=1e-12)
    power = [float(sig.pow(2).mean()) for sig in signal]
    assert power[0] > power[1] > 0 and power[2] == 0  # visual strong, audio weak, text noise only

    # the class means explain more of the feature variance in the stronger modality
    def between_share(x: torch.Tensor, y: torch.Tensor) -> float:
        means = torch.stack([x[y == k].mean(0) for k in range(4)])[y]
        return float(((means - x.mean(0)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    share = [between_share(v, a.labels) for v in a.views]
    assert share[0] > share[1] > share[2]


def test_simulated_regression_structure():
    task = data.SimulatedRegression()
    a, b = task.make(3000, 0), task.make(3000, 0)
    assert [tuple(v.shape) for v in a.views] == [(3000, 128), (3000, 64), (3000, 300)]
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, task.make(3000, 1).labels)
    assert abs(float(a.labels.mean())) < 0.1 and abs(float(a.labels.var()) - 1) < 0.1
    # the target is (almost) not linear in the features: least squares explains little of it
    x = torch.cat([torch.cat(a.views, 1), torch.ones(3000, 1)], 1).double()
    w = torch.linalg.lstsq(x[:2000], a.labels[:2000, None].double()).solution
    r2 = 1 - float(((x[2000:] @ w)[:, 0] - a.labels[2000:]).pow(2).mean()) / float(a.labels[2000:].var())
    assert r2 < 0.2


def test_kernel_pca_on_a_hand_example():
    # centred points on the axes: the linear kernel's kernel PCA is the points themselves (up to sign)
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    coords = kernel_pca(x @ x.T)
    assert torch.allclose(coords.abs(), x.abs(), atol=1e-12)
    # shifting the points changes the kernel, not the centred embedding
    shifted = x + torch.tensor([5.0, -3.0], dtype=torch.float64)
    assert torch.allclose(kernel_pca(shifted @ shifted.T).abs(), x.abs(), atol=1e-9)
    # a constant kernel has nothing to embed
    assert torch.allclose(kernel_pca(torch.ones(5, 5)), torch.zeros(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        kernel_pca(torch.ones(3, 4))


def test_fisher_ratio_on_a_hand_example():
    pts = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # S_b: 2·‖(−2, 0)‖² + 2·‖(2, 0)‖² = 16; S_w: four points at distance 1 from their means = 4
    assert fisher_ratio(pts, labels) == pytest.approx(4.0)
    assert fisher_ratio(3 * pts + 7, labels) == pytest.approx(4.0)  # scale and shift invariant
    assert fisher_ratio(pts, torch.tensor([0, 1, 0, 1])) == pytest.approx(4 / 16)  # split the other way
    assert fisher_ratio(pts, torch.tensor([0, 1, 1, 0])) == pytest.approx(0.0)  # diagonals share a mean
    assert math.isinf(fisher_ratio(pts[[0, 2]], torch.tensor([0, 1])))


def test_models_and_steadiness():
    cfg = LMFConfig()
    assert parameter_count(build_model("lmf_direct", cfg)) == 4 * (129 + 65 + 301) + 4 + 1
    assert parameter_count(build_model("tfn_direct", cfg)) == 129 * 65 * 301 + 1
    with pytest.raises(ValueError, match="unknown model"):
        build_model("concat", cfg)
    assert steady_fall([4.0, 3.0, 2.0, 1.0])["steady"]
    assert steady_fall([4.0, 2.0, 2.02, 0.5])["steady"]  # a 1% wiggle is allowed
    assert not steady_fall([4.0, 3.0, 3.5, 0.5])["steady"]  # a 17% rise is not
    assert steady_fall([4.0, 3.0, 3.5, 0.5])["max_rise"] == pytest.approx(0.5 / 3)
    assert not steady_fall([4.0, 3.9, 3.8])["steady"]  # fell, but not far


TINY = StudyConfig(
    mkl=MKLConfig(steps=3, digits_train=60, sim_train=40, sim_test=40, plot_points=30),
    lmf=LMFConfig(
        n_train=64,
        n_val=32,
        n_test=32,
        epochs=3,
        batch_size=32,
        tfn_timing_batches=1,
        timing_batches=1,
        timing_rounds=1,
    ),
    n_seeds=2,
    threads=1,
)


def test_tiny_end_to_end(tmp_path: Path):
    res = run_study(TINY, tmp_path, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)  # no temp file left behind
    for name in FILES:
        if name.endswith(".png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for kind, n_views in (("digits", 3), ("simulated", 3)):
        r = on_disk["mkl"][kind]
        assert len(r["runs"]) == 2 and [run["seed"] for run in r["runs"]] == [0, 1]
        for run in r["runs"]:
            assert len(run["beta"]) == n_views and sum(run["beta"]) == pytest.approx(1.0)
            assert all(0 <= a <= 1 for a in [run["acc_learned"], run["acc_uniform"], *run["acc_single"]])
        panels = r["kpca"]["panels"]
        assert [p["name"] for p in panels][-2:] == ["combined, uniform β", "combined, learned β"]
        assert len(panels) == n_views + 2 and all(len(p["coords"]) == 30 for p in panels)
        assert all(set(run["fisher"]) == {p["name"] for p in panels} for run in r["runs"])
        sep = r["separability"]
        assert sep["n_seeds"] == 2 and 0 <= sep["learned_wins"] <= 2
        assert sep["fisher"]["combined, learned β"]["mean"] == pytest.approx(
            sum(run["fisher"]["combined, learned β"] for run in r["runs"]) / 2
        )
    lmf = on_disk["lmf"]
    for name in ("lmf_direct", "lmf_encoded", "tfn_encoded"):
        assert [len(r["train_loss"]) for r in lmf["runs"][name]] == [3, 3]
        assert [len(r["val_mse"]) for r in lmf["runs"][name]] == [4, 4]
    assert lmf["tfn_direct"]["params"] == 129 * 65 * 301 + 1 and lmf["tfn_direct"]["K"] == 129 * 65 * 301
    assert set(lmf["timing"]) == {"lmf_direct", "lmf_encoded", "tfn_encoded", "tfn_direct"}
    assert all(t["epoch_seconds"] > 0 for t in lmf["timing"].values())
    assert lmf["timing"]["tfn_direct"]["params"] == lmf["tfn_direct"]["params"]
    md = (tmp_path / "results.md").read_text()
    assert "Claim 1" in md and "Claim 2" in md and "| combined, learned β |" in md
    assert set(on_disk["verdicts"]) == {"mkl", "lmf"}
    # verdicts: paired per-seed differences and 95% t-intervals
    claims = on_disk["claims"]
    assert claims["mkl"]["verdict"] in ("YES", "NO", "INCONCLUSIVE")
    runs = on_disk["mkl"]["digits"]["runs"]
    iv = claims["mkl"]["per_dataset"]["digits"]["fisher_learned_minus"]["top half"]
    assert iv["n"] == 2 and iv["diffs"] == pytest.approx(
        [r["fisher"]["combined, learned β"] - r["fisher"]["top half"] for r in runs]
    )
    assert iv["low"] <= iv["mean"] <= iv["high"]
    rise = claims["lmf"]["rise_margin"]
    assert rise["diffs"] == pytest.approx(
        [0.05 - s["max_rise"] for s in lmf["summary"]["lmf_direct"]["steady"]]
    )
    assert claims["lmf"]["verdict"] in ("YES", "NO", "INCONCLUSIVE")
    assert "YES if the interval lies above 0" in md and "| 1 | digits | Fisher ratio" in md
    # provenance: versions, commit, device, and the backend that served each op
    env = on_disk["environment"]
    assert env["versions"]["scikit-learn"] and "sha" in env["commit"] and env["device"]["type"] == "cpu"
    assert sum(on_disk["backends"]["multiple_kernel"].values()) > 0
    assert sum(on_disk["backends"]["low_rank_fusion"].values()) > 0


def test_one_part_only(tmp_path: Path):
    res = run_study(replace(TINY, parts=("lmf",), n_seeds=1), tmp_path, log=lambda _: None)
    assert "mkl" not in res and set(res["verdicts"]) == {"lmf"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lmf_loss.png", "results.json", "results.md"]
    md = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    again = render(tmp_path, log=lambda _: None)  # redraws from results.json alone
    assert (tmp_path / "results.md").read_text() == md and again["verdicts"] == res["verdicts"]


def test_cli_arguments(capsys):
    args = parse_args([])
    assert not args.quick and args.out is None and args.seeds is None and args.only is None
    assert not args.render and parse_args(["--render"]).render
    cfg = study_config(parse_args(["--quick", "--seeds", "2", "--seed", "5", "--only", "mkl"]))
    assert cfg.n_seeds == 2 and cfg.seed == 5 and cfg.parts == ("mkl",) and cfg.mkl.steps == 10
    assert parse_args(["--out", "x"]).out == Path("x")
    assert study_config(parse_args([])).n_seeds == 8 and study_config(parse_args(["--quick"])).n_seeds == 4
    for bad in (
        ["--seeds", "0"],
        ["--seeds", "two"],
        ["--seed", "-1"],
        ["--only", "svm"],
        ["--threads", "-1"],
        ["--nope"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_seeds"):
        StudyConfig(n_seeds=0)
    with pytest.raises(ValueError, match="parts"):
        StudyConfig(parts=("svm",))
