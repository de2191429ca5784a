"""The command line of ``python -m experiments.reproduce``: parse it and check every argument
before any work, so that a bad one is an argparse error (usage + message naming the option, exit
code 2, no traceback) and not a failure after the first training block.

Checked: types and ranges (:func:`build_parser`'s types), combinations and the files only read
(:func:`check_args`: the real data's presence, ``--render``'s ``results.json``), that ``--out`` is a
writable folder (:func:`check_out`) and that the real data holds every size
(:func:`check_real_sizes`). :func:`parse` runs them all in that order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments.tweet.config import FUSIONS, resolve_data_dir
from experiments.tweet.data import DataFormatError, find_real_data, load_data
from experiments.tweet.studies import RESULTS, StudyConfig, fusion_config
from experiments.tweet.synthetic import SYNTHETIC_DEFAULTS

# Seeds reach torch.manual_seed and the noise draws seed with 1000 × seed + …: 32 bits keeps
# both inside torch's 64-bit seed range (2**64 overflows with a traceback).
MAX_SEED = 2**32 - 1
# Options that only shape training: --render redraws from results.json and would ignore them.
TRAINING_OPTIONS = (
    "seeds",
    "seed",
    "fusions",
    "sizes",
    "sigmas",
    "max_epochs",
    "real",
    "data_dir",
    "paper_faithful",
    "threads",
    "val_size",
)
# What run_study writes into results.json and --render reads back.
RESULT_KEYS = (
    "status",
    "completed_blocks",
    "total_blocks",
    "seconds",
    "config",
    "runs",
    "robustness_runs",
    "accuracy_vs_size",
    "robustness",
    "robustness_size",
    "roc",
)
CONFIG_KEYS = ("fusions", "sizes", "n_seeds", "seed", "sigmas")
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() also takes "1_0" and "٣"


# ------------------------------------------------------------------ argument types


def _integer(text: str, expected: str) -> int:
    if not _INTEGER.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    try:
        return int(text)
    except ValueError:  # more digits than Python converts
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _first_seed(text: str) -> int:
    expected = f"an integer in [0, {MAX_SEED}]"
    value = _integer(text, expected)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _threads(text: str) -> int:
    # More torch threads than logical CPUs only wait on each other (see the README).
    cpus = os.cpu_count() or 1
    expected = f"an integer in [1, {cpus}] (this machine's logical CPUs)"
    value = _integer(text, expected)
    if not 1 <= value <= cpus:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _size(text: str) -> int | None:
    if text == "all":
        return None
    expected = "a positive integer or 'all'"
    value = _integer(text, expected)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _sigma(text: str) -> float:
    expected = "a finite number >= 0 (σ as a multiple of the modality's std)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _fraction(text: str) -> float:
    expected = "a finite number > 0 (validation examples per training example)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _path(text: str) -> Path:
    if not text.strip():  # Path("") is the current folder: never what an empty value meant
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return Path(text)


# ------------------------------------------------------------------ parsing and checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce",
        description="Tweet fusion comparison (clean accuracy vs training-set size, ROC) and robustness "
        "to test-time noise, for concat / product / tensor / low-rank fusion.",
    )
    quick = StudyConfig.quick()
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"about a minute: sizes {', '.join(str(s) for s in quick.sizes)}, {quick.n_seeds} seeds, "
        f"{len(quick.sigmas)} σ, ≤ {quick.overrides['max_epochs']} epochs",
    )
    parser.add_argument(
        "--out",
        type=_path,
        default=None,
        help=f"output folder, created if needed and checked writable (default {RESULTS}, "
        f"with --quick {RESULTS}/quick)",
    )
    # Training options default to None so that --render can tell which were given.
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help=f"seeds per (fusion, size) (default {StudyConfig().n_seeds}, quick {quick.n_seeds}; "
        "the verdicts' t-intervals need at least 2)",
    )
    parser.add_argument("--seed", type=_first_seed, default=None, help="first seed (default 0)")
    parser.add_argument(
        "--fusions",
        nargs="+",
        choices=FUSIONS,
        default=None,
        help="fusions to compare (default: the paper's four; the bilinear family mfb, mfh, mutan, "
        "block runs under the same protocol)",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=_size,
        default=None,
        help="training-set sizes, positive and at most the training split ('all' = every)",
    )
    parser.add_argument(
        "--sigmas", nargs="+", type=_sigma, default=None, help="noise σ grid (× modality std), finite ≥ 0"
    )
    parser.add_argument(
        "--max-epochs", type=_positive_int, default=None, help="cap on training epochs per run"
    )
    parser.add_argument(
        "--val-size",
        type=_fraction,
        default=None,
        metavar="F",
        help="pick the best epoch on max(1, round(F × n)) validation examples for training size n "
        "(a seeded subset, at most the split) instead of the whole validation split",
    )
    parser.add_argument(
        "--real", action="store_true", help="the paper's tweet data instead of the synthetic task"
    )
    parser.add_argument(
        "--data-dir",
        type=_path,
        default=None,
        help="real data: dataset folder or .npz (with --real); relative to the working folder "
        "(the configs' data_dir is relative to the config file)",
    )
    parser.add_argument(
        "--paper-faithful", action="store_true", help="the paper's double softmax and batch-flipping product"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only redraw results.md, the PNGs and the summary from results.json (no training options)",
    )
    parser.add_argument(
        "--threads", type=_threads, default=None, help="torch threads (default 1: fastest here)"
    )
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    """The folder the results go to (``--out`` or the default for ``--quick`` / a full run)."""
    if args.out is not None:
        return args.out
    return RESULTS / "quick" if args.quick else RESULTS


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations, and the files that are only read (the real data, --render's results.json):
    ``parser.error`` (usage, message, exit 2) on the first problem. Writes nothing."""
    if args.render:
        given = [_flag(dest) for dest in TRAINING_OPTIONS if getattr(args, dest) not in (None, False)]
        if given:
            parser.error(
                f"--render redraws from results.json; it takes no training options: {', '.join(given)}"
            )
        read_results(parser, output_dir(args))
        return
    if args.data_dir is not None and not args.real:
        parser.error("--data-dir names the real data: it needs --real")
    for dest in ("fusions", "sizes", "sigmas"):
        values = getattr(args, dest) or []
        repeated = sorted({_label(v) for v in values if values.count(v) > 1})
        if repeated:
            parser.error(f"{_flag(dest)}: repeated value(s) {', '.join(repeated)}")
    cfg = study_config(args)
    last = cfg.seed + cfg.n_seeds - 1
    if last > MAX_SEED:
        parser.error(f"--seed {cfg.seed} with --seeds {cfg.n_seeds} runs up to seed {last}, above {MAX_SEED}")
    if cfg.real:
        data_dir = fusion_config(cfg.fusions[0], cfg).data_dir
        source = "--data-dir" if args.data_dir is not None else f"data_dir of {cfg.fusions[0]}_tweet.yaml"
        try:
            find_real_data(data_dir)
        except (OSError, DataFormatError) as err:
            parser.error(f"--real: no usable data at {data_dir} ({source}; set --data-dir): {err}")
    else:
        # make_data's parameters: the generator's defaults, then the first fusion's config
        synth = {**SYNTHETIC_DEFAULTS, **fusion_config(cfg.fusions[0], cfg).synthetic, **cfg.synthetic}
        _check_sizes(parser, cfg, int(synth["n_train"]), "the synthetic task")


def _label(value: Any) -> str:
    return "all" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _check_sizes(parser: argparse.ArgumentParser, cfg: StudyConfig, n_train: int, what: str) -> None:
    too_big = [s for s in cfg.sizes if s is not None and s > n_train]
    if too_big:
        parser.error(
            f"--sizes {' '.join(map(str, too_big))}: more than the {n_train} training examples of {what}"
        )


def check_real_sizes(parser: argparse.ArgumentParser, cfg: StudyConfig) -> None:
    """Load the real data once to check that it loads and holds every size (the study loads it
    again: a second read costs seconds, a failure after the first block costs a traceback)."""
    data_dir = fusion_config(cfg.fusions[0], cfg).data_dir
    try:
        data = load_data(fusion_config(cfg.fusions[0], cfg), False)
    except (OSError, ImportError, ValueError) as err:  # DataFormatError is a ValueError
        parser.error(f"--real: cannot load the data at {data_dir}: {err}")
    _check_sizes(parser, cfg, len(data.train.label), f"the real data at {data_dir}")


def check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """``--out`` must be a folder we can write into: create it and a temp file in it now, so an
    unwritable one fails here and not after the first training block."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        parser.error(f"--out: cannot write to the folder {out}: {err.strerror or err}")


def read_results(parser: argparse.ArgumentParser, out: Path) -> dict[str, Any]:
    """``out/results.json`` as written by the study, or ``parser.error`` naming the file."""
    path = out / "results.json"
    try:
        res = json.loads(path.read_text())
    except FileNotFoundError:
        parser.error(f"--render: no results.json in {out} (run the study with this --out first)")
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        parser.error(f"--render: cannot read {path}: {err}")
    if not isinstance(res, dict) or not isinstance(res.get("config"), dict):
        parser.error(f"--render: {path} is not a results.json of this study")
    lost = [k for k in RESULT_KEYS if k not in res]
    lost += [f"config.{k}" for k in CONFIG_KEYS if k not in res["config"]]
    if lost:
        parser.error(f"--render: {path} is not a results.json of this study (missing {', '.join(lost)})")
    return res


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` the arguments ask for."""
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    changes: dict[str, Any] = {
        "seed": 0 if args.seed is None else args.seed,
        "real": args.real,
        "threads": 1 if args.threads is None else args.threads,
    }
    overrides = dict(cfg.overrides)
    if args.seeds is not None:
        changes["n_seeds"] = args.seeds
    if args.fusions is not None:
        changes["fusions"] = tuple(args.fusions)
    if args.sizes is not None:
        sizes = tuple(args.sizes)
        changes["sizes"] = sizes

        def key(s: int | None) -> float:
            return float("inf") if s is None else s

        if cfg.robust_size not in sizes:
            changes["robust_size"] = max(sizes, key=key)
    if args.val_size is not None:
        changes["val_size"] = args.val_size
    if args.sigmas is not None:
        changes["sigmas"] = tuple(args.sigmas)
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    if args.paper_faithful:
        overrides["paper_faithful"] = True
    if args.data_dir is not None:  # relative to the working folder, fixed now
        changes["data_dir"] = str(resolve_data_dir(args.data_dir))
    changes["overrides"] = overrides
    return replace(cfg, **changes)


# ------------------------------------------------------------------ entry points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments (types, ranges, combinations, files read) without writing
    anything; exits with code 2 and argparse's usage + message on a bad one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Path]:
    """Every check, cheapest first, and the output folder: those of :func:`parse_args`, then
    ``--out`` (created: the only check that writes) and, with ``--real``, the sizes against the
    loaded data. Exits with code 2 and argparse's usage + message on the first problem."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    out = output_dir(args)
    check_out(parser, out)
    if args.real:  # check_args rejects --render --real, so this is a training run
        check_real_sizes(parser, study_config(args))
    return args, out
