"""The command line of ``python -m experiments.reproduce``: every bad argument is an argparse error
(exit 2, usage, a message naming the option) before any work; ``--out`` is checked writable before
training; a partial run (killed or interrupted) answers neither of the paper's claims."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from experiments import cli_args, reproduce
from experiments.tweet import report, studies
from experiments.tweet.config import PAPER_FUSIONS as FUSIONS
from experiments.tweet.studies import StudyConfig

CPUS = os.cpu_count() or 1
TINY_SYNTH = {"n_train": 48, "n_val": 24, "n_test": 40, "dim": 16}
# Every fusion, so that a run stopped after two blocks has the 2-of-4 results the claims must not use.
TINY = StudyConfig(
    fusions=FUSIONS,
    sizes=(16, None),
    n_seeds=1,
    sigmas=(0.0, 1.0),
    overrides={"max_epochs": 3, "stop_window": 2},
    synthetic=TINY_SYNTH,
)
CLAIM_TEXT = ("does product beat", "does product lose", "YES", "INCONCLUSIVE", "rule:", "not tested")


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started despite a bad argument")

    monkeypatch.setattr(reproduce, "run_study", fail)


def exit_code_and_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        reproduce.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(exc.value.code or 0), err


BAD = [
    (["--sigmas", "nan"], "--sigmas"),
    (["--sigmas", "inf"], "--sigmas"),
    (["--sigmas", "-1"], "--sigmas"),
    (["--sigmas", "0", "x"], "--sigmas"),
    (["--sigmas", "0", "1", "1"], "--sigmas"),
    (["--threads", "-3"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--threads", "1.5"], "--threads"),
    (["--threads", str(CPUS + 1)], "--threads"),
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "-2"], "--seeds"),
    (["--seeds", "two"], "--seeds"),
    (["--seeds", "1_0"], "--seeds"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--seed", str(2**32 - 1), "--seeds", "2"], "--seed"),
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "-5"], "--sizes"),
    (["--sizes", "1.5"], "--sizes"),
    (["--sizes", "32", "32"], "--sizes"),
    (["--sizes", "32", "100000"], "--sizes"),
    (["--max-epochs", "0"], "--max-epochs"),
    (["--max-epochs", "ten"], "--max-epochs"),
    (["--fusions", "svm"], "--fusions"),
    (["--fusions", "concat", "concat"], "--fusions"),
    (["--data-dir", "somewhere"], "--data-dir"),
    (["--real", "--data-dir", "/nonexistent/tweets.npz"], "--data-dir"),
    (["--render", "--seeds", "2"], "--render"),
    (["--render", "--real"], "--render"),
    (["--render", "--threads", "1"], "--render"),
    (["--out", ""], "--out"),
    (["--val-size", "0"], "--val-size"),
    (["--val-size", "-0.5"], "--val-size"),
    (["--val-size", "nan"], "--val-size"),
    (["--val-size", "inf"], "--val-size"),
    (["--val-size", "a quarter"], "--val-size"),
    (["--render", "--val-size", "0.25"], "--render"),
    (["--quick", "--nope"], "--nope"),
]


@pytest.mark.parametrize(("argv", "option"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_an_argparse_error(argv, option, tmp_path, capsys, no_training):
    out = tmp_path / "out"
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    code, err = exit_code_and_error(argv, capsys)
    assert code == 2
    assert err.startswith("usage: python -m experiments.reproduce")
    assert "error:" in err and option in err.split("error:", 1)[1]
    assert not out.exists()  # rejected before anything was written


def test_good_arguments_parse():
    args = cli_args.parse_args(["--quick", "--sigmas", "0", "0.5", "--threads", "1", "--sizes", "16", "all"])
    cfg = cli_args.study_config(args)
    assert cfg.sigmas == (0.0, 0.5) and cfg.threads == 1 and cfg.sizes == (16, None) and cfg.seed == 0
    assert cli_args.study_config(cli_args.parse_args([])).threads == 1
    # still importable from reproduce, where the other tests take them from
    assert reproduce.parse_args is cli_args.parse_args and reproduce.study_config is cli_args.study_config


def test_unwritable_out_fails_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker / "out", blocker):  # parent is a file (fails for root too); out is a file
        code, err = exit_code_and_error(["--quick", "--out", str(out)], capsys)
        assert code == 2 and "--out" in err and str(out) in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_out_fails_before_training(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = exit_code_and_error(["--quick", "--out", str(locked / "out")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and "--out" in err and str(locked / "out") in err


def test_out_is_created_and_checked_before_training(tmp_path, monkeypatch):
    out = tmp_path / "new" / "nested"
    seen: list[bool] = []

    def fake_run(cfg: StudyConfig, where: Path, log: Any) -> dict:
        seen.append(where == out and out.is_dir() and not list(out.iterdir()))  # no probe left
        return {}

    monkeypatch.setattr(reproduce, "run_study", fake_run)
    assert reproduce.main(["--quick", "--out", str(out)]) == 0
    assert seen == [True]


def write_npz(path: Path, n_train: int) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", 6), ("test", 6)):
        arrays[f"{split}_img"] = rng.normal(size=(n, 4)).astype(np.float32)
        arrays[f"{split}_text"] = rng.normal(size=(n, 4)).astype(np.float32)
        arrays[f"{split}_label"] = np.arange(n) % 2
    np.savez(path, **arrays)
    return path


def test_real_sizes_checked_against_the_data(tmp_path, capsys, no_training):
    npz = write_npz(tmp_path / "tweets.npz", n_train=10)
    argv = ["--real", "--data-dir", str(npz), "--sizes", "8", "20", "--out", str(tmp_path / "out")]
    code, err = exit_code_and_error(argv, capsys)
    assert code == 2 and "--sizes 20" in err and "10 training examples" in err


@pytest.mark.parametrize("content", [None, "{not json", '{"status": "partial"}', "[1, 2]"])
def test_render_needs_a_results_file(content, tmp_path, capsys):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    code, err = exit_code_and_error(["--render", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--render" in err and str(tmp_path) in err


# ------------------------------------------------------------------ partial runs: no verdict


def stop_after(blocks: int, exc: type[BaseException] = KeyboardInterrupt):
    """A run_study for main() on the tiny task (main's own study config, tiny data) that raises
    ``exc`` after logging its ``blocks``-th block, as a Ctrl-C (or a kill) between blocks would."""
    real = studies.run_study

    def run(cfg: StudyConfig, out: Path, log: Any) -> dict:
        def log_then_stop(line: str) -> None:
            log(line)
            if line.startswith(f"[{blocks}/"):
                raise exc("stopped")

        return real(replace(cfg, synthetic=TINY_SYNTH), out, log=log_then_stop)

    return run


TINY_ARGV = ["--seeds", "1", "--sizes", "16", "all", "--sigmas", "0", "1", "--max-epochs", "3"]


def assert_no_verdict(text: str) -> None:
    assert "incomplete: no verdict" in text
    assert "missing: tensorfusion seed 0; lowrank seed 0" in text
    for claim in CLAIM_TEXT:
        assert claim not in text


def assert_no_verdict_on_disk(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "partial" and res["completed_blocks"] == 2 and res["total_blocks"] == 4
    s = res["summary"]
    assert s["verdict"].startswith("incomplete: no verdict")
    assert s["missing_blocks"] == {"tensorfusion": [0], "lowrank": [0]}
    for claim in ("claim1_product_wins_small_data", "claim2_product_less_robust"):
        assert s[claim] == {"holds": None, "verdict": "incomplete: no verdict"}
    md = (out / "results.md").read_text()
    assert_no_verdict(md.split("## Summary", 1)[1].split("## Clean", 1)[0])
    assert "| n train | Concatenation | Product |" in md  # the finished blocks' numbers stay
    return res


def test_interrupted_run_gives_no_verdict(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce, "run_study", stop_after(2))
    assert reproduce.main([*TINY_ARGV, "--out", str(tmp_path)]) == 130
    printed = capsys.readouterr().out
    assert "interrupted" in printed
    assert_no_verdict(printed.split("interrupted", 1)[1])
    assert_no_verdict_on_disk(tmp_path)


class Killed(BaseException):  # nothing catches it, as nothing runs after a SIGKILL
    pass


def test_killed_run_leaves_no_verdict_on_disk(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce, "run_study", stop_after(2, Killed))
    with pytest.raises(Killed):
        reproduce.main([*TINY_ARGV, "--out", str(tmp_path)])
    assert_no_verdict_on_disk(tmp_path)


def test_study_per_block_saves_hold_no_verdict(tmp_path, monkeypatch):
    # The study alone (no reproduce.py around it), killed after 2 of 4 blocks: every results.json
    # it wrote, not only the last, answers neither claim, so a SIGKILL at any moment leaves none.
    written: list[dict] = []
    real_write = studies.write_json_atomic

    def spy(path: Path, obj: Any) -> None:
        real_write(path, obj)
        written.append(json.loads(Path(path).read_text()))

    def log(line: str) -> None:
        if line.startswith("[2/"):
            raise Killed

    monkeypatch.setattr(studies, "write_json_atomic", spy)
    with pytest.raises(Killed):
        studies.run_study(TINY, tmp_path, log=log, plots=False)
    assert [r["completed_blocks"] for r in written] == [1, 2]
    first = written[0]["summary"]
    assert first["verdict"].startswith("incomplete: no verdict")
    assert first["missing_blocks"] == {"product": [0], "tensorfusion": [0], "lowrank": [0]}
    for claim in ("claim1_product_wins_small_data", "claim2_product_less_robust"):
        assert first[claim] == {"holds": None, "verdict": "incomplete: no verdict"}
    assert written[1] == assert_no_verdict_on_disk(tmp_path)


def test_render_of_a_partial_results_file_gives_no_verdict(tmp_path, capsys):
    # results.json exactly as studies.run_study leaves it when stopped after 2 of 4 blocks
    def log(line: str) -> None:
        if line.startswith("[2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        studies.run_study(TINY, tmp_path, log=log)
    assert reproduce.main(["--render", "--out", str(tmp_path)]) == 0
    assert_no_verdict(capsys.readouterr().out)
    assert_no_verdict_on_disk(tmp_path)
    assert (tmp_path / "accuracy_vs_size.png").exists()  # the finished blocks are still drawn


def test_complete_run_keeps_its_verdict(tmp_path, capsys):
    res = studies.run_study(TINY, tmp_path, log=lambda _: None, plots=False)
    assert report.incomplete_reason(res) is None and report.missing_blocks(res) == {}
    assert res["summary"] == report.summarize(res)  # the full claims, untouched
    claims = {"claim1_product_wins_small_data", "claim2_product_less_robust"}
    assert set(res["summary"]) == {"rule", "n_seeds", *claims}
    for name in claims:  # answered (one seed: INCONCLUSIVE, not "incomplete")
        assert res["summary"][name]["verdict"] in ("YES", "NO", "INCONCLUSIVE")
    assert reproduce.main(["--render", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "does product beat" in printed and "does product lose" in printed
    assert "incomplete" not in printed
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["summary"]) == {"rule", "n_seeds", *claims}
