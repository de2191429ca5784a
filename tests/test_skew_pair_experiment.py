"""The skew-pair study (experiments/skew_pair): task generator properties and a tiny end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.skew_pair import encoders, task
from experiments.skew_pair.__main__ import main, parse_args
from experiments.skew_pair.study import StudyConfig, run_study
from experiments.skew_pair.sweep import TrainConfig

SMALL = task.TaskConfig(depth_a=2, depth_b=1, radius_a=1, radius_b=2, signal_len=3, tail_len=2)


@pytest.mark.parametrize("cfg", [task.TaskConfig(), SMALL], ids=["default", "small"])
def test_task_layout(cfg):
    """CLS, constant filler up to the signal, signal tokens from the bit vocabularies, noise tail."""
    data = task.make_task(cfg, 103, seed=1)
    start = {m: cfg.signal_start(m) for m in "ab"}
    for m, tokens in (("a", data.tokens_a), ("b", data.tokens_b)):
        assert tokens.shape == (103, cfg.length(m)) and tokens.dtype == torch.int64
        assert cfg.length(m) == start[m] + cfg.signal_len + cfg.tail_len
        assert (tokens[:, 0] == task.CLS).all()
        assert (tokens[:, 1 : start[m]] == task.FILL).all()
        signal = tokens[:, start[m] : start[m] + cfg.signal_len]
        first_noise = task.FIRST_CLASS_TOKEN + 2 * cfg.class_vocab
        assert ((signal >= task.FIRST_CLASS_TOKEN) & (signal < first_noise)).all()
        tail = tokens[:, start[m] + cfg.signal_len :]
        assert ((tail >= first_noise) & (tail < cfg.vocab_size)).all()
        assert cfg.arrival(m) == (cfg.depth_a if m == "a" else cfg.depth_b)
    for t in (data.bit_a, data.bit_b, data.label):
        assert t.shape == (103,) and t.dtype == torch.int64


@pytest.mark.parametrize("n", [100, 101, 7])
def test_task_labels_are_balanced_xor(n):
    data = task.make_task(SMALL, n, seed=3)
    assert torch.equal(data.label, data.bit_a ^ data.bit_b)
    combos = torch.bincount(2 * data.bit_a + data.bit_b, minlength=4)
    assert combos.min() >= n // 4 and combos.max() <= n // 4 + 1
    # Neither bit alone says anything about the label (balanced given either bit).
    for bit in (data.bit_a, data.bit_b):
        for v in (0, 1):
            assert abs(data.label[bit == v].double().mean().item() - 0.5) <= 1 / (n // 4 + 1)


def test_task_is_deterministic_under_seed():
    a, b, c = (task.make_task(SMALL, 64, seed=s) for s in (5, 5, 6))
    for name in ("tokens_a", "tokens_b", "bit_a", "bit_b", "label"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.tokens_a, c.tokens_a)


def test_task_bits_and_bayes_accuracy():
    pure = replace(SMALL, purity=1.0)
    data = task.make_task(pure, 200, seed=0)
    assert torch.equal(task.bit_readout(pure, data.tokens_a, "a"), data.bit_a)
    assert torch.equal(task.bit_readout(pure, data.tokens_b, "b"), data.bit_b)
    assert task.bayes_accuracy(pure) == 1.0
    assert task.bayes_accuracy(replace(SMALL, purity=0.5)) == pytest.approx(0.5)
    cfg = task.TaskConfig()  # purity 0.9, 4 signal tokens
    data = task.make_task(cfg, 8000, seed=0)
    guess = task.bit_readout(cfg, data.tokens_a, "a") ^ task.bit_readout(cfg, data.tokens_b, "b")
    # the majority-vote oracle reaches the documented Bayes accuracy (ties count half)
    assert (guess == data.label).double().mean().item() == pytest.approx(task.bayes_accuracy(cfg), abs=0.02)


def test_task_reaches():
    cfg = task.TaskConfig()  # depth_a 6, depth_b 0
    assert task.reaches(cfg, [(6, 0)]) and task.reaches(cfg, [(2, 0), (6, 4)])
    assert not task.reaches(cfg, [(5, 0)]) and not task.reaches(cfg, [(0, 4), (4, 8)])


def test_task_rejects_bad_config():
    with pytest.raises(ValueError, match="purity"):
        task.TaskConfig(purity=0.3)
    with pytest.raises(ValueError, match="radius_a"):
        task.TaskConfig(radius_a=0)


TINY_ENCODERS = encoders.EncoderConfig(
    layers_a=4, width_a=8, heads_a=2, layers_b=4, width_b=12, embedding_b=8, heads_b=2, batch_size=64
)


def test_bit_reaches_the_summary_at_its_depth():
    """The planted-depth property through real encoders: changing only the signal tokens leaves
    the CLS summaries of the layers below ``depth`` unchanged and changes the one at ``depth``."""
    cfg = SMALL
    data = task.make_task(cfg, 32, seed=0)
    model_a, model_b = encoders.build_encoders(
        TINY_ENCODERS, cfg.vocab_size, max(cfg.length("a"), cfg.length("b")), seed=0
    )
    for m, model, tokens, radius in (
        ("a", model_a, data.tokens_a, cfg.radius_a),
        ("b", model_b, data.tokens_b, cfg.radius_b),
    ):
        other = tokens.clone()
        s = cfg.signal_start(m)
        shifted = other[:, s : s + cfg.signal_len] - task.FIRST_CLASS_TOKEN + cfg.class_vocab
        # every signal token swapped into the other bit's vocabulary
        other[:, s : s + cfg.signal_len] = task.FIRST_CLASS_TOKEN + shifted % (2 * cfg.class_vocab)
        h1 = encoders.summaries(model, tokens, radius, 64)
        h2 = encoders.summaries(model, other, radius, 64)
        depth = cfg.arrival(m)
        assert h1.shape == (32, 4, model.config.hidden_size)
        assert torch.equal(h1[:, :depth], h2[:, :depth])
        assert (h1[:, depth] - h2[:, depth]).abs().amax() > 1e-6


def test_standardize_uses_training_rows():
    x = torch.randn(50, 3, 4) * 5 + 2
    z = encoders.standardize(x, torch.arange(40))
    assert torch.allclose(z[:40].mean(0), torch.zeros(3, 4), atol=1e-5)
    assert torch.allclose(z[:40].std(0), torch.ones(3, 4), atol=1e-5)
    const = encoders.standardize(torch.ones(10, 2, 3), torch.arange(10))
    assert torch.equal(const, torch.zeros(10, 2, 3))


def tiny_study(workers: int) -> StudyConfig:
    return StudyConfig(
        task=replace(SMALL, depth_b=0),
        encoders=TINY_ENCODERS,
        train=TrainConfig(dim=8, heads=2, hidden=8, epochs=2, batch_size=32),
        n_train=64,
        n_val=32,
        n_test=32,
        skews=(0, 2),
        densities=(0.25,),
        n_seeds=1,
        n_boot=50,
        n_compare_seeds=2,
        dense_reference=False,
        workers=workers,
    )


def test_tiny_end_to_end(tmp_path: Path):
    res = run_study(tiny_study(workers=1), tmp_path, log=lambda _: None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["results.json", "results.md", "sweep.png"]  # no temp file left behind
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    rows = on_disk["sweep"]
    assert [(r["skew"], r["n_pairs"]) for r in rows] == [(0, 1), (2, 1)]
    for r in rows:
        for split in ("train", "val", "test"):
            assert 0 <= r[f"{split}_acc"] <= 1 and len(r[f"{split}_acc_seeds"]) == 1
    assert rows[0]["pairs"] == [[0, 0]] and rows[1]["pairs"] == [[2, 0]]
    assert [r["reaches"] for r in rows] == [False, True]
    sel = on_disk["selection"]
    assert sel["skew"] in (0, 2) and sel["density"] == 0.25 and sel["n_examples"] == 32
    assert len(sel["table"]) == 2 and sum(r["chosen"] for r in sel["table"]) == 1
    assert sel["val_low"] <= sel["val_mean"] <= sel["val_high"]
    assert len(on_disk["probes"]["bit a from A"]) == 4
    md = (tmp_path / "results.md").read_text()
    assert "| skew | η = 1/4 |" in md and "| +2 |" in md and "chosen" in md
    assert "± 0.000" not in md  # one seed: no sd is printed
    # the paper's comparison: the selected pairs against late and pairwise fusion, same seeds
    cmp = on_disk["comparison"]
    assert cmp["seeds"] == [100, 101] and set(cmp["models"]) == {"ssfn", "late", "pairwise"}
    assert cmp["models"]["ssfn"]["pairs"] == sel["pairs"] and cmp["models"]["late"]["pairs"] == []
    assert cmp["models"]["pairwise"]["pairs"] == [[i, i] for i in range(4)]  # every aligned pair
    # the sweep's run of the chosen pairs (seed 100) is reused, not retrained differently
    chosen_row = next(r for r in rows if r["skew"] == sel["skew"])
    assert cmp["models"]["ssfn"]["test_acc_seeds"][0] == chosen_row["test_acc_seeds"][0]
    for name in ("late", "pairwise"):
        iv = cmp["ssfn_minus"][name]
        diffs = [
            a - b
            for a, b in zip(
                cmp["models"]["ssfn"]["test_acc_seeds"], cmp["models"][name]["test_acc_seeds"], strict=True
            )
        ]
        assert (
            iv["n"] == 2
            and iv["diffs"] == pytest.approx(diffs)
            and iv["verdict"] in ("YES", "NO", "INCONCLUSIVE")
        )
    assert cmp["verdict"] in ("YES", "NO", "INCONCLUSIVE") and "SSFN against late and pairwise fusion" in md
    # provenance, and the backend calls of every run (worker processes included)
    env = on_disk["environment"]
    assert env["versions"]["transformers"] and "sha" in env["commit"] and env["device"]["type"] == "cpu"
    assert sum(on_disk["backends"]["skew_pair_attention"].values()) > 0
    # --render redraws the figure and results.md from results.json alone, identically
    (tmp_path / "sweep.png").unlink()
    (tmp_path / "results.md").unlink()
    assert main(["--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == md and (tmp_path / "sweep.png").exists()


def test_workers_do_not_change_results(tmp_path: Path):
    one = run_study(tiny_study(workers=1), tmp_path / "one", log=lambda _: None)
    two = run_study(tiny_study(workers=2), tmp_path / "two", log=lambda _: None)
    keys = ("skew", "density", "pairs", "val_acc_seeds", "test_acc_seeds", "train_acc_seeds")
    assert [{k: r[k] for k in keys} for r in one["sweep"]] == [{k: r[k] for k in keys} for r in two["sweep"]]
    assert one["selection"]["table"] == two["selection"]["table"]
    assert one["comparison"]["models"] == two["comparison"]["models"]
    assert one["backends"] == two["backends"]  # forked workers' calls are counted too


def test_cli_defaults():
    args = parse_args([])
    assert not args.quick and args.out is None and args.seed == 0 and args.backend is None
    args = parse_args(["--quick", "--out", "x", "--seed", "3", "--backend", "reference"])
    assert args.quick and args.out == Path("x") and args.seed == 3 and args.backend == "reference"
    assert parse_args(["--compare-seeds", "5"]).compare_seeds == 5
    for bad in (["--seeds", "0"], ["--compare-seeds", "0"], ["--seed", "-1"], ["--workers", "x"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
