"""The tweet fusion experiment (experiments/tweet): config, data loaders, synthetic task, model,
training (paper-faithful switches, early stopping, JSON output) and evaluation. Tiny data only."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

import fusionops
from experiments.atomic import write_json as write_json_atomic
from experiments.tweet.config import FUSIONS, TweetConfig, load_config
from experiments.tweet.data import (
    DataFormatError,
    Split,
    TweetData,
    load_data,
    load_hf_dataset,
    load_npz,
)
from experiments.tweet.model import FusionClassifier
from experiments.tweet.synthetic import make_synthetic
from experiments.tweet.train import evaluate, loss_fn, main_train, roc_auc

TINY = {"n_train": 600, "n_val": 200, "n_test": 400, "dim": 16, "rank": 2, "noise": 0.05}


def tiny_config(fusion: str = "concat", **overrides) -> TweetConfig:
    base = {
        "fusion": fusion,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "batch_size": 64,
        "max_epochs": 15,
        "stop_std": 0.0,
        "synthetic": dict(TINY),
    }
    return load_config({**base, **overrides})


@pytest.fixture(scope="module")
def tiny_data() -> TweetData:
    return make_synthetic(**TINY, seed=0)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("fusion", FUSIONS)
def test_shipped_configs_load(fusion):
    cfg = load_config(f"{fusion}_tweet.yaml")
    assert cfg.fusion == fusion
    assert cfg.stop_std == 1e-4 and cfg.stop_window == 10 and cfg.hidden == 32
    assert cfg.paper_faithful is False


def test_config_from_dict_defaults():
    cfg = load_config({"fusion": "product", "lr": 0.5})
    assert cfg.lr == 0.5 and cfg.batch_size == TweetConfig().batch_size


def test_misspelt_key_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown config key 'weight_decy'.*did you mean 'weight_decay'"):
        load_config({"fusion": "concat", "weight_decy": 0.1})


def test_unknown_fusion_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown fusion 'tensor_fusion'.*did you mean 'tensorfusion'"):
        load_config({"fusion": "tensor_fusion"})


def test_misspelt_synthetic_key():
    with pytest.raises(ValueError, match=r"synthetic.nosie'.*did you mean 'noise'"):
        load_config({"synthetic": {"nosie": 0.1}})


def test_misspelt_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("fusion: concat\nbatchsize: 8\n")
    with pytest.raises(ValueError, match=r"'batchsize'.*did you mean 'batch_size'"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="concat_tweet.yaml"):
        load_config("concat_twet.yaml")


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_balance_determinism():
    a = make_synthetic(101, 50, 60, dim=12, rank=3, noise=0.1, seed=3)
    b = make_synthetic(101, 50, 60, dim=12, rank=3, noise=0.1, seed=3)
    c = make_synthetic(101, 50, 60, dim=12, rank=3, noise=0.1, seed=4)
    for split, n in ((a.train, 101), (a.val, 50), (a.test, 60)):
        assert split.img.shape == (n, 12) and split.text.shape == (n, 12)
        assert split.img.dtype == torch.float32 and split.label.dtype == torch.int64
        assert int(split.label.sum()) == n // 2
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert (
            torch.equal(sa.img, sb.img) and torch.equal(sa.text, sb.text) and torch.equal(sa.label, sb.label)
        )
    assert not torch.equal(a.train.img, c.train.img)


def _logistic_accuracy(x_train, y_train, x_test, y_test) -> float:
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    lin = torch.nn.Linear(xtr.shape[1], 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(xtr).squeeze(1), y_train.float())
        loss = loss + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((lin(xte).squeeze(1) > 0).long() == y_test).float().mean())


def test_synthetic_label_is_a_multiplicative_interaction():
    data = make_synthetic(2000, 10, 1000, dim=16, rank=2, noise=0.05, seed=1)
    tr, te = data.train, data.test
    concat = _logistic_accuracy(
        torch.cat([tr.img, tr.text], 1), tr.label, torch.cat([te.img, te.text], 1), te.label
    )
    product = _logistic_accuracy(tr.img * tr.text, tr.label, te.img * te.text, te.label)
    assert concat < 0.58, concat
    assert product > 0.9, product


# ---------------------------------------------------------------- npz / HF loaders


def _arrays(n=8, d=6, one_hot=False, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val", "test"):
        labels = rng.integers(0, 2, n)
        out[f"{split}_img"] = rng.normal(size=(n, d)).astype(np.float32)
        out[f"{split}_text"] = rng.normal(size=(n, d)).astype(np.float32)
        out[f"{split}_label"] = np.eye(2, dtype=np.int64)[labels] if one_hot else labels
    return out


@pytest.mark.parametrize("one_hot", [False, True])
def test_load_npz_round_trip(tmp_path, one_hot):
    arrays = _arrays(one_hot=one_hot)
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_npz(tmp_path / "d.npz", expect_dim=6)
    for split in ("train", "val", "test"):
        s = getattr(data, split)
        np.testing.assert_array_equal(s.img.numpy(), arrays[f"{split}_img"])
        np.testing.assert_array_equal(s.text.numpy(), arrays[f"{split}_text"])
        want = arrays[f"{split}_label"].argmax(1) if one_hot else arrays[f"{split}_label"]
        np.testing.assert_array_equal(s.label.numpy(), want)
        assert s.label.dtype == torch.int64 and s.img.dtype == torch.float32
    sub = data.train.select([1, 3])
    assert len(sub) == 2 and torch.equal(sub.img[1], data.train.img[3])


def _bad(arrays, key, value):
    arrays = dict(arrays)
    if value is None:
        del arrays[key]
    else:
        arrays[key] = value
    return arrays


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("val_img", np.zeros((8, 5), np.float32), r"\[val.img\]: embedding width 5, expected 6"),
        (
            "train_label",
            np.array([0, 1, 2, 0, 1, 0, 1, 0]),
            r"\[train.label\]: labels must be in \{0, 1\}, found \[2\]",
        ),
        (
            "test_label",
            np.ones((8, 2), np.int64),
            r"\[test.label\]: labels of shape \(N, 2\) are not one-hot",
        ),
        ("test_label", np.zeros((8, 3), np.int64), r"one-hot with 2 classes .* got shape \(8, 3\)"),
        ("train_text", np.full((8, 6), np.nan, np.float32), r"\[train.text\]: embeddings contain NaN"),
        ("test_text", None, r"split 'test' has no array test_text"),
    ],
)
def test_load_npz_malformed(tmp_path, key, value, match):
    np.savez(tmp_path / "d.npz", **_bad(_arrays(), key, value))
    with pytest.raises(DataFormatError, match=match):
        load_npz(tmp_path / "d.npz", expect_dim=6)


def test_load_npz_missing_split_and_file(tmp_path):
    arrays = {k: v for k, v in _arrays().items() if not k.startswith("val_")}
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataFormatError, match=r"missing split 'val'"):
        load_npz(tmp_path / "d.npz")
    with pytest.raises(FileNotFoundError, match="no .npz file"):
        load_npz(tmp_path / "nope.npz")


def test_load_data_real_from_npz_dir(tmp_path):
    np.savez(tmp_path / "tweets.npz", **_arrays())
    data = load_data(load_config({"data_dir": str(tmp_path)}), synth=False)
    assert len(data.test) == 8
    with pytest.raises(FileNotFoundError, match="real data not found"):
        load_data(load_config({"data_dir": str(tmp_path / "missing")}), synth=False)


def _write_hf(folder, d=6, n=5, drop=None, width=None):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "val", "test"):
        labels = rng.integers(0, 2, n)
        cols = {
            "img": rng.normal(size=(n, width or d)).astype(np.float32).tolist(),
            "text": rng.normal(size=(n, d)).astype(np.float32).tolist(),
            "label": np.eye(2, dtype=np.int64)[labels].tolist(),
            "value": rng.normal(size=n).tolist(),
        }
        if drop and drop[0] == split:
            del cols[drop[1]]
        splits[split] = datasets.Dataset.from_dict(cols)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return splits


def test_load_hf_dataset_round_trip(tmp_path):
    splits = _write_hf(tmp_path / "dataset")
    data = load_hf_dataset(tmp_path / "dataset", expect_dim=6)
    for name in ("train", "val", "test"):
        s, ref = getattr(data, name), splits[name]
        np.testing.assert_allclose(s.img.numpy(), np.asarray(ref["img"], np.float32))
        np.testing.assert_array_equal(s.label.numpy(), np.asarray(ref["label"]).argmax(1))
    # load_data finds the folder (or data_dir/dataset) as the config's data_dir
    for data_dir in (tmp_path, tmp_path / "dataset"):
        with pytest.raises(DataFormatError, match="expected 768"):
            load_data(load_config({"data_dir": str(data_dir)}), synth=False)
    with pytest.raises(DataFormatError, match=r"embedding width 6, expected 768"):
        load_hf_dataset(tmp_path / "dataset")


def test_load_hf_dataset_malformed(tmp_path):
    _write_hf(tmp_path / "a", drop=("val", "text"))
    with pytest.raises(DataFormatError, match=r"split 'val' has no column 'text'"):
        load_hf_dataset(tmp_path / "a", expect_dim=6)
    _write_hf(tmp_path / "b", width=7)
    with pytest.raises(DataFormatError, match=r"\[train.img\]: embedding width 7, expected 6"):
        load_hf_dataset(tmp_path / "b", expect_dim=6)
    with pytest.raises(FileNotFoundError, match="no dataset folder"):
        load_hf_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="not a Hugging Face datasets folder"):
        load_hf_dataset(tmp_path / "empty")


def test_load_hf_dataset_missing_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    cols = {"img": [[0.0, 1.0]], "text": [[1.0, 0.0]], "label": [[0, 1]]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(cols), "test": datasets.Dataset.from_dict(cols)}
    ).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataFormatError, match=r"missing split 'val' \(has \['test', 'train'\]\)"):
        load_hf_dataset(tmp_path / "d", expect_dim=2)


def test_load_hf_dataset_without_datasets(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_dataset(tmp_path / "d")


# ---------------------------------------------------------------- model


def test_model_widths_and_errors():
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    widths = {"concat": 16, "product": 8, "tensorfusion": 81, "lowrank": 32}
    for fusion, width in widths.items():
        m = FusionClassifier(fusion, 8, 8)
        assert m.fusion_dim == width and m(x, y).shape == (5, 2)
    assert FusionClassifier("product", 8, 8, paper_faithful=True).fusion_dim == 16
    with pytest.raises(ValueError, match="product fusion needs equal modality widths.*img_dim=8, text_dim=6"):
        FusionClassifier("product", 8, 6)
    assert FusionClassifier("concat", 8, 6)(x, torch.randn(5, 6)).shape == (5, 2)


def test_projected_tensor_fusion_equals_features_then_linear():
    torch.manual_seed(0)
    m = FusionClassifier("tensorfusion", 4, 3, hidden=5)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    z = fusionops.TensorFusion()([x, y])
    assert z.shape[1] == m.fusion_dim == 20
    want = z @ m.fusion.weight.T + m.fusion.bias
    torch.testing.assert_close(m.project(m.fusion([x, y])), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- metrics


def test_roc_auc_hand_example():
    # positives 0.8, 0.4, 0.35(tie with a negative); negatives 0.1, 0.35, 0.5:
    # pairs (pos > neg) = 0.8: 3; 0.4: 2 (0.1, 0.35); 0.35: 1 (0.1) + 0.5 tie -> 6.5 / 9
    scores = [0.8, 0.4, 0.35, 0.1, 0.35, 0.5]
    labels = [1, 1, 1, 0, 0, 0]
    assert roc_auc(scores, labels) == pytest.approx(6.5 / 9)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0 and roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert roc_auc([0.5] * 4, [0, 1, 0, 1]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_evaluate_hand_metrics_and_noise(tiny_data):
    class Fixed(torch.nn.Module):
        def forward(self, img, text):
            return torch.stack([torch.zeros(len(img)), img[:, 0]], 1)

    split = Split(
        img=torch.tensor([[2.0], [-1.0], [0.5]]), text=torch.zeros(3, 1), label=torch.tensor([1, 0, 0])
    )
    got = evaluate(Fixed(), split)
    p = torch.sigmoid(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["log_loss"] == pytest.approx(float(-(p[0].log() + (1 - p[1]).log() + (1 - p[2]).log()) / 3))
    assert got["roc_auc"] == 1.0
    np.testing.assert_allclose(got["probs"], p.numpy())
    # noise: only the named modality, seeded
    a = evaluate(Fixed(), split, noise_sigma=1.0, noisy=("text",), seed=1)
    np.testing.assert_allclose(a["probs"], got["probs"])
    b = evaluate(Fixed(), split, noise_sigma=1.0, noisy=("img",), seed=1)
    c = evaluate(Fixed(), split, noise_sigma=1.0, noisy=("img",), seed=1)
    np.testing.assert_array_equal(b["probs"], c["probs"])
    assert not np.allclose(b["probs"], got["probs"])
    with pytest.raises(ValueError, match="unknown modalities"):
        evaluate(Fixed(), split, noise_sigma=1.0, noisy=("audio",))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_beats_chance(fusion, tiny_data):
    result = main_train(tiny_config(fusion), synth=True, data=tiny_data, seed=0)
    assert result.epochs == 15 and len(result.epoch_losses) == 15 and len(result.val_accuracies) == 15
    assert result.test_metrics["accuracy"] > 0.7, result.test_metrics
    assert result.test_metrics["roc_auc"] > 0.75
    assert result.val_accuracies[result.best_epoch] == max(result.val_accuracies)
    # the loaded checkpoint is the best one: re-evaluating val gives the best accuracy
    assert evaluate(result.model, tiny_data.val)["accuracy"] == pytest.approx(max(result.val_accuracies))
    assert evaluate(result.model, tiny_data.test)["accuracy"] == pytest.approx(
        result.test_metrics["accuracy"]
    )


def test_training_is_seeded(tiny_data):
    cfg = tiny_config("lowrank", max_epochs=3)
    a = main_train(cfg, synth=True, data=tiny_data, seed=5, train_size=200)
    b = main_train(cfg, synth=True, data=tiny_data, seed=5, train_size=200)
    assert a.epoch_losses == b.epoch_losses and a.train_size == 200


def test_paper_faithful_double_softmax_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(7, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    p = torch.softmax(logits, 1)
    q = torch.exp(p) / torch.exp(p).sum(1, keepdim=True)  # softmax applied again inside CE
    want = float(-q[torch.arange(7), labels].log().mean())
    assert float(loss_fn(logits, labels, True)) == pytest.approx(want)
    want_plain = float(-torch.log_softmax(logits, 1)[torch.arange(7), labels].mean())
    assert float(loss_fn(logits, labels, False)) == pytest.approx(want_plain)


def test_paper_faithful_training_uses_double_softmax_and_batch_flip(tiny_data, monkeypatch):
    import experiments.tweet.train as train_mod

    seen = []
    real = train_mod.loss_fn

    def spy(logits, labels, paper_faithful):
        seen.append(paper_faithful)
        return real(logits, labels, paper_faithful)

    monkeypatch.setattr(train_mod, "loss_fn", spy)
    result = main_train(tiny_config("product", paper_faithful=True, max_epochs=2), synth=True, data=tiny_data)
    assert seen and all(seen)
    # double-softmax cross-entropy on 2 classes lies in [log(1 + e^-1), log(1 + e)]
    assert all(
        math.log(1 + math.e**-1) - 1e-6 <= x <= math.log(1 + math.e) + 1e-6 for x in result.epoch_losses
    )
    model = result.model
    assert isinstance(model.fusion, fusionops.ProductConcat)
    # batch flip: a sample's logits depend on the rest of its batch
    img, text = tiny_data.test.img[:4], tiny_data.test.text[:4]
    full = model(img, text)
    rolled = model(img[[0, 1, 3, 2]], text[[0, 1, 3, 2]])
    assert not torch.allclose(full[0], rolled[0])
    plain = main_train(tiny_config("product", max_epochs=1), synth=True, data=tiny_data).model
    assert isinstance(plain.fusion, fusionops.ProductFusion)
    torch.testing.assert_close(plain(img, text)[0], plain(img[[0, 1, 3, 2]], text[[0, 1, 3, 2]])[0])


def test_early_stopping(tiny_data):
    stop = main_train(
        tiny_config("concat", stop_std=10.0, stop_window=3, max_epochs=50), synth=True, data=tiny_data
    )
    assert stop.epochs == 3
    late = main_train(
        tiny_config("concat", stop_std=0.0, stop_window=3, max_epochs=4), synth=True, data=tiny_data
    )
    assert late.epochs == 4


def test_results_json_written(tmp_path, tiny_data):
    result = main_train(
        tiny_config("product", max_epochs=2), synth=True, data=tiny_data, seed=3, out=tmp_path
    )
    path = tmp_path / "product_synth_n600_seed3.json"
    assert result.out_path == str(path)
    got = json.loads(path.read_text())
    assert got["seed"] == 3 and got["epochs"] == 2 and got["config"]["fusion"] == "product"
    assert set(got["test_metrics"]) == {"accuracy", "log_loss", "roc_auc"}
    assert "model" not in got
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_write_json_atomic_replaces(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "x.json", {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert len(list(path.parent.iterdir())) == 1


def test_evaluate_noise_changes_trained_accuracy(tiny_data):
    model = main_train(tiny_config("lowrank"), synth=True, data=tiny_data).model
    clean = evaluate(model, tiny_data.test)
    zero = evaluate(model, tiny_data.test, noise_sigma=0.0, seed=7)
    assert zero["accuracy"] == clean["accuracy"]
    np.testing.assert_array_equal(zero["probs"], clean["probs"])
    noisy = evaluate(model, tiny_data.test, noise_sigma=3.0, seed=7)
    assert noisy["accuracy"] < clean["accuracy"] - 0.1


def test_cli_smoke(tmp_path, capsys, monkeypatch):
    from experiments.tweet.__main__ import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "fusion: concat\nmax_epochs: 2\nsynthetic: {n_train: 64, n_val: 32, n_test: 32, dim: 8, rank: 2}\n"
    )
    assert main(["--config", str(cfg), "--synth", "--out", str(tmp_path / "out"), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and (tmp_path / "out" / "concat_synth_n64_seed1.json").exists()
