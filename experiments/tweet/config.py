"""Configuration of one tweet fusion run: :class:`TweetConfig` and :func:`load_config`.

A config is a YAML file (or a dict) whose keys are the fields of :class:`TweetConfig`; missing
keys take the defaults below. A bare file name such as ``"concat_tweet.yaml"`` is looked up in
``experiments/tweet/configs/``. Unknown keys and unknown fusion names are a ``ValueError``
naming the key and suggesting the closest valid one, raised before any training.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data" / "dataset"
# The paper's four fusions (the study's default and the claims' subject), then the bilinear
# family (issue 20: block.bootstrap's layers, fused), which the same protocol can compare.
PAPER_FUSIONS = ("concat", "product", "tensorfusion", "lowrank")
BILINEAR_FUSIONS = ("mfb", "mfh", "mutan", "block")
FUSIONS = PAPER_FUSIONS + BILINEAR_FUSIONS
LABELS = {
    "concat": "Concatenation",
    "product": "Product",
    "tensorfusion": "Tensor",
    "lowrank": "Low-rank",
    "mfb": "MFB",
    "mfh": "MFH",
    "mutan": "MUTAN",
    "block": "BLOCK",
}


@dataclass
class TweetConfig:
    """One training run.

    Fields:
        fusion: ``"concat"`` | ``"product"`` | ``"tensorfusion"`` | ``"lowrank"``, or a bilinear
            fusion ``"mfb"`` | ``"mfh"`` | ``"mutan"`` | ``"block"`` (block.bootstrap's layers).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: mini-batch size (shuffled every epoch with a seeded generator).
        max_epochs: hard cap on the number of epochs.
        stop_std: early stop once the std of the last ``stop_window`` epoch losses is <= this
            (the paper's rule, 1e-4).
        stop_window: number of epoch losses the stopping rule looks at (the paper's 10).
        hidden: width of the two hidden layers of the head (the paper's 32).
        rank: rank of the low-rank fusion, and of MUTAN and BLOCK (``rank`` there).
        lowrank_dim: output width of the low-rank fusion (its ``fusion_dim``).
        mm_dim: the bilinear fusions' inner width (block.bootstrap's ``mm_dim``).
        factor: MFB's and MFH's pooling factor ``k`` (block.bootstrap's ``factor``).
        chunks: BLOCK's number of chunks (block.bootstrap's ``chunks``).
        seed: seed of the model init, the batch order and the synthetic data.
        paper_faithful: ``False``: cross-entropy on the logits and the per-sample
            :class:`fusionops.ProductFusion`; ``True``: the paper's code exactly, i.e.
            ``CrossEntropyLoss(softmax(logits))`` (a double softmax) and the batch-flipping
            :class:`fusionops.ProductConcat`.
        data_dir: real data: a folder holding the extracted Hugging Face ``datasets`` folder
            (``DatasetDict`` with train/val/test) or a ``.npz`` file (see ``data.load_npz``).
            A relative path in a YAML file is relative to **that file's folder** (the shipped
            configs say ``../data/dataset``: ``experiments/tweet/data/dataset`` from any working
            folder); in a dict, relative to the working folder at load time. Stored absolute.
        synthetic: parameters of :func:`experiments.tweet.synthetic.make_synthetic`
            (``n_train``, ``n_val``, ``n_test``, ``dim``, ``rank``, ``noise``, ``label_noise``);
            the seed is ``seed`` unless given here.
    """

    fusion: str = "concat"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 200
    stop_std: float = 1e-4
    stop_window: int = 10
    hidden: int = 32
    rank: int = 4
    lowrank_dim: int = 32
    mm_dim: int = 64
    factor: int = 2
    chunks: int = 4
    seed: int = 0
    paper_faithful: bool = False
    data_dir: str = str(DEFAULT_DATA_DIR)
    synthetic: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(
                f"unknown fusion {self.fusion!r}{_suggest(self.fusion, FUSIONS)}; valid: {FUSIONS}"
            )
        sizes = ("batch_size", "max_epochs", "stop_window", "hidden", "rank", "lowrank_dim")
        for name in (*sizes, "mm_dim", "factor", "chunks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        if float(self.lr) <= 0:
            raise ValueError(f"config key 'lr' must be > 0, got {self.lr}")
        if not isinstance(self.synthetic, dict):
            raise ValueError(f"config key 'synthetic' must be a mapping, got {type(self.synthetic).__name__}")
        from experiments.tweet.synthetic import SYNTHETIC_KEYS

        for key in self.synthetic:
            if key not in SYNTHETIC_KEYS:
                raise ValueError(
                    f"unknown key 'synthetic.{key}'{_suggest(key, SYNTHETIC_KEYS)}; valid: {SYNTHETIC_KEYS}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain (JSON-serialisable) dict."""
        return asdict(self)


def _suggest(name: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_config_path(config: str | Path) -> Path:
    """A path as given if it exists, else the bare name looked up in :data:`CONFIG_DIR`."""
    path = Path(config)
    if path.exists():
        return path
    candidate = CONFIG_DIR / path.name
    if candidate.exists():
        return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {str(config)!r} not found{_suggest(path.name, known)}; known: {known}")


def load_config(config: str | Path | dict | TweetConfig) -> TweetConfig:
    """A :class:`TweetConfig` from a YAML path, a bare name in ``configs/``, or a dict."""
    if isinstance(config, TweetConfig):
        return config
    if isinstance(config, dict):
        raw = dict(config)
    else:
        with open(resolve_config_path(config)) as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config {config}: expected a mapping at top level, got {type(raw).__name__}")
    valid = [f.name for f in fields(TweetConfig)]
    for key in raw:
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}{_suggest(key, valid)}; valid: {valid}")
    if "data_dir" in raw and raw["data_dir"] is not None:
        base = None if isinstance(config, dict) else resolve_config_path(config).resolve().parent
        raw["data_dir"] = str(resolve_data_dir(raw["data_dir"], base))
    return TweetConfig(**raw)


def resolve_data_dir(data_dir: str | Path, base: Path | None = None) -> Path:
    """``data_dir`` made absolute: relative to ``base`` (a config file's folder) when given,
    else to the working folder. ``~`` is expanded; symlinks are kept as written."""
    path = Path(data_dir).expanduser()
    if path.is_absolute():
        return path
    return Path(os.path.normpath((base if base is not None else Path.cwd()) / path))
