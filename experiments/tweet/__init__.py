"""Tweet fusion comparison and robustness study (Michaels, Zhang & Fiterau, MOSS@ICML 2025) on
``fusionops`` layers. Train one model with ``python -m experiments.tweet --config concat_tweet.yaml``.
"""

from experiments.tweet.config import TweetConfig, load_config
from experiments.tweet.data import Split, TweetData, load_data
from experiments.tweet.model import FusionClassifier
from experiments.tweet.synthetic import make_synthetic
from experiments.tweet.train import TrainResult, evaluate, main_train, roc_auc

__all__ = [
    "FusionClassifier",
    "Split",
    "TrainResult",
    "TweetConfig",
    "TweetData",
    "evaluate",
    "load_config",
    "load_data",
    "main_train",
    "make_synthetic",
    "roc_auc",
]
