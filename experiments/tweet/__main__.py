"""``python -m experiments.tweet --config concat_tweet.yaml [--synth|--real] [--out DIR] [--seed N]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.tweet.train import main_train


def main(argv: list[str] | None = None) -> int:
    """Train one model with :func:`main_train` and print its test metrics."""
    parser = argparse.ArgumentParser(prog="python -m experiments.tweet", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML path or a name in experiments/tweet/configs/")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--synth", dest="synth", action="store_true", default=True, help="synthetic data (default)"
    )
    group.add_argument(
        "--real", dest="synth", action="store_false", help="the paper's data (config data_dir)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder (or .json file) for the result JSON")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--train-size", type=int, default=None, help="train on this many training samples")
    args = parser.parse_args(argv)
    result = main_train(args.config, args.synth, seed=args.seed, out=args.out, train_size=args.train_size)
    cfg = result.config
    kind = "synthetic" if result.synth else "real"
    print(
        f"{cfg.fusion} ({kind}, paper_faithful={cfg.paper_faithful}, seed={result.seed}, "
        f"n_train={result.train_size}): {result.epochs} epochs, best epoch {result.best_epoch}"
    )
    for key, value in result.test_metrics.items():
        print(f"  test {key}: {value:.4f}")
    if result.out_path:
        print(f"  wrote {result.out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
