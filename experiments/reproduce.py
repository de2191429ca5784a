"""``python -m experiments.reproduce [--quick] [--out DIR] [--seeds N]``: the tweet fusion comparison
and robustness studies (Michaels, Zhang & Fiterau, MOSS@ICML 2025) with the fusionops layers.

Runs on the built-in synthetic task by default (``--real`` uses the paper's tweet embeddings in
``--data-dir``); writes ``results.json``, ``results.md``, ``accuracy_vs_size.png``,
``robustness.png`` and ``roc.png`` and prints the summary answering the paper's two claims.

Every argument is checked before any work (argparse usage + message, exit code 2): types and
ranges, combinations, the real data's presence, and that ``--out`` is a writable folder (see
:mod:`experiments.cli_args`). A run that has not finished every (seed, fusion) block answers
neither claim: its ``results.json``, ``results.md``, printed summary and ``--render`` say
``incomplete: no verdict`` and which blocks are missing (see :mod:`experiments.tweet.report`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from experiments.cli_args import parse, parse_args, study_config
from experiments.tweet import report
from experiments.tweet.studies import render, run_study

# parse_args and study_config stay importable from here (tests and notebooks use them).
__all__ = ["main", "parse_args", "study_config"]


def _print(line: str) -> None:
    print(line, flush=True)


def _version(path: Path) -> tuple[int, int] | None:
    """Tells one version of ``path`` from the next (every save replaces the file: a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def main(argv: list[str] | None = None) -> int:
    args, out = parse(argv)  # exits with code 2 on a bad argument, before any work
    if args.render:
        render(out)
        return 0
    results = out / "results.json"
    before = _version(results)  # an older run's file: not this run's results
    t0 = time.perf_counter()
    try:
        run_study(study_config(args), out, log=_print)
    except KeyboardInterrupt:
        # Ctrl-C between blocks: the study has saved the finished blocks, with no verdict
        _print(f"interrupted after {time.perf_counter() - t0:.0f} s")
        if _version(results) == before:
            _print("no (seed, fusion) block had finished: nothing written")
        else:
            for line in report.summary_lines(json.loads(results.read_text())):
                _print(line)
        return 130
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
