"""``python -m experiments.reproduce --real`` end to end, on tiny data sets that the tests write in
the documented layouts (the paper's Hugging Face ``dataset/`` folder and the offline ``.npz``), and
where ``data_dir`` is looked for: ``--data-dir`` relative to the working folder, a config's
``data_dir`` relative to the config file, and errors that name the absolute path they looked at."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import reproduce
from experiments.tweet.config import DEFAULT_DATA_DIR, load_config
from experiments.tweet.train import main_train

SPLITS = {"train": 40, "val": 12, "test": 20}
DIM = 6
HF_DIM = 768  # the paper's embeddings; load_hf_dataset checks the width


def tiny_arrays(dim: int = DIM, seed: int = 0) -> dict[str, np.ndarray]:
    """Two equal-width modalities whose label is the sign of a product (learnable, balanced)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SPLITS.items():
        img = rng.normal(size=(n, dim)).astype(np.float32)
        text = rng.normal(size=(n, dim)).astype(np.float32)
        out[f"{split}_img"], out[f"{split}_text"] = img, text
        out[f"{split}_label"] = (img[:, 0] * text[:, 0] > 0).astype(np.int64)
        out[f"{split}_label"][:2] = (0, 1)  # both classes in every split
    return out


def write_npz(folder: Path) -> Path:
    """The offline layout: one .npz with s_img, s_text, s_label for s in train/val/test."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "tweets.npz", **tiny_arrays())
    return folder


def write_hf(folder: Path) -> Path:
    """The paper's layout: ``folder/dataset`` is a Hugging Face DatasetDict (train/val/test) with
    ``img``, ``text`` embeddings (768-d, as the loader checks) and a one-hot ``label``."""
    datasets = pytest.importorskip("datasets")
    arrays = tiny_arrays(HF_DIM)
    splits = {}
    for split in SPLITS:
        label = arrays[f"{split}_label"]
        splits[split] = datasets.Dataset.from_dict(
            {
                "img": arrays[f"{split}_img"].tolist(),
                "text": arrays[f"{split}_text"].tolist(),
                "label": np.eye(2, dtype=np.int64)[label].tolist(),
            }
        )
    datasets.DatasetDict(splits).save_to_disk(str(folder / "dataset"))
    return folder


ARGV = ["--sizes", "16", "all", "--seeds", "2", "--sigmas", "0", "1", "--max-epochs", "3"]


@pytest.mark.parametrize("layout", ["npz", "hf"])
def test_real_run_end_to_end(layout, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (write_npz if layout == "npz" else write_hf)(work / "mydata")
    monkeypatch.chdir(work)  # --data-dir and --out relative to the working folder
    # at 768-d, tensor fusion's weight is 32 × 769² (76 MB): the HF run leaves it out
    fusions = ["--fusions", "concat", "product", "lowrank"] if layout == "hf" else []
    assert reproduce.main(["--real", "--data-dir", "mydata", *ARGV, *fusions, "--out", "out"]) == 0
    printed = capsys.readouterr().out
    assert "tweet studies (real tweets)" in printed and "does product beat" in printed
    res = json.loads((work / "out" / "results.json").read_text())
    assert res["status"] == "complete" and res["config"]["real"] is True
    assert res["config"]["data_dir"] == str(work / "mydata")  # made absolute from the working folder
    assert {d["n_train"] for d in res["data"].values()} == {SPLITS["train"]}
    assert {d["img_dim"] for d in res["data"].values()} == {DIM if layout == "npz" else HF_DIM}
    assert {r["n_train"] for r in res["runs"]} == {16, SPLITS["train"]}
    assert len(res["runs"]) == (4 if layout == "npz" else 3) * 2 * 2  # fusions × sizes × seeds
    for claim in ("claim1_product_wins_small_data", "claim2_product_less_robust"):
        assert res["summary"][claim]["verdict"] in ("YES", "NO", "INCONCLUSIVE")
    md = (work / "out" / "results.md").read_text()
    assert "Data: real data (the paper's tweet embeddings)" in md
    for png in ("accuracy_vs_size.png", "robustness.png", "roc.png"):
        assert (work / "out" / png).read_bytes()[:4] == b"\x89PNG"


def test_config_data_dir_is_relative_to_the_config_file(tmp_path, monkeypatch):
    write_npz(tmp_path / "data")
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "mine.yaml").write_text("fusion: product\nmax_epochs: 2\ndata_dir: ../data/tweets.npz\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(cfg_dir / "mine.yaml")
    assert cfg.data_dir == str(tmp_path / "data" / "tweets.npz")
    result = main_train(cfg, synth=False, train_size=16)
    assert result.train_size == 16 and 0 <= result.test_metrics["accuracy"] <= 1
    # a dict has no file: relative to the working folder at load time
    assert load_config({"data_dir": "d"}).data_dir == str(elsewhere / "d")
    # the shipped configs name experiments/tweet/data/dataset from any working folder
    assert load_config("concat_tweet.yaml").data_dir == str(DEFAULT_DATA_DIR)


def test_missing_real_data_names_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--real", "--data-dir", "nowhere", "--out", "out"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--real: no usable data at" in err
    assert str(tmp_path / "nowhere") in err and "--data-dir" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        reproduce.main(["--real", "--data-dir", "empty", "--out", "out"])
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "looked for" in err and ".npz" in err
    if not DEFAULT_DATA_DIR.exists():  # the configs' default (nothing downloaded here)
        with pytest.raises(SystemExit):
            reproduce.main(["--real", "--out", "out"])
        err = capsys.readouterr().err
        assert str(DEFAULT_DATA_DIR) in err and "data_dir of concat_tweet.yaml" in err
    assert not (tmp_path / "out" / "results.json").exists()
