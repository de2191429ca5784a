"""Tweet data: :class:`Split`, :class:`TweetData` and the loaders (real, offline ``.npz``, synthetic).

Real data is the paper's ``dataset.zip`` (:data:`PAPER_DATASET_URL`, fetched by
:func:`download_dataset`): a Hugging Face ``datasets`` folder with splits ``train``, ``val``
(``validation`` is accepted too) and ``test``, each with columns ``img`` and ``text`` (768-d
embeddings), ``label`` (one-hot, 2 classes) and ``value`` (unused here).

Offline format (:func:`load_npz`): one ``.npz`` holding, for each split ``s`` in train/val/test,
``s_img (N, d_img)``, ``s_text (N, d_text)`` (floats) and ``s_label`` as 0/1 ints ``(N,)`` or
one-hot ``(N, 2)``. Both loaders run the same checks and raise :class:`DataFormatError` (a
``ValueError``) naming the split and column at fault; a missing file/folder is a
``FileNotFoundError``.
"""

from __future__ import annotations

import io
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from experiments.tweet.config import TweetConfig

PAPER_DATASET_URL = (
    "https://dl.dropboxusercontent.com/scl/fi/bk0gcvfy2ytni5eeu4gah/dataset.zip"
    "?rlkey=da701q1fc3xas3s1et76h5f7a&st=ft5099v2&dl=0"
)
SPLITS = ("train", "val", "test")
COLUMNS = ("img", "text", "label")


class DataFormatError(ValueError):
    """The data on disk does not have the expected schema."""


@dataclass
class Split:
    """One split: ``img (N, d_img)`` and ``text (N, d_text)`` float32, ``label (N,)`` int64 in {0, 1}."""

    img: Tensor
    text: Tensor
    label: Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def select(self, indices: Sequence[int] | Tensor) -> Split:
        """The samples at ``indices`` (as ``datasets.Dataset.select``)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Split(img=self.img[idx], text=self.text[idx], label=self.label[idx])


@dataclass
class TweetData:
    """The three splits."""

    train: Split
    val: Split
    test: Split


def download_dataset(dest_dir: str | Path, url: str = PAPER_DATASET_URL) -> Path:
    """Download the paper's ``dataset.zip`` and extract it into ``dest_dir``.

    As their README: ``?dl=0`` is rewritten to ``?dl=1`` (a direct download). Needs the network.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    download_url = url.replace("?dl=0", "?dl=1").replace("&dl=0", "&dl=1")
    with urllib.request.urlopen(download_url) as response:  # noqa: S310 (a fixed https URL)
        payload = response.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        zf.extractall(dest)
    return dest


def _labels(raw: Any, where: str) -> Tensor:
    arr = np.asarray(raw)
    if arr.dtype == object:
        try:
            arr = np.stack([np.asarray(r) for r in arr])
        except ValueError as err:
            raise DataFormatError(f"{where}: labels have ragged rows ({err})") from None
    if arr.ndim == 2:
        if arr.shape[1] != 2:
            raise DataFormatError(
                f"{where}: labels must be one-hot with 2 classes (N, 2) or 0/1 ints (N,), "
                f"got shape {tuple(arr.shape)}"
            )
        if not np.all(np.isin(arr, (0, 1))) or not np.all(arr.sum(1) == 1):
            raise DataFormatError(
                f"{where}: labels of shape (N, 2) are not one-hot (each row one 1 and one 0)"
            )
        return torch.as_tensor(arr.argmax(1), dtype=torch.int64)
    if arr.ndim != 1:
        raise DataFormatError(f"{where}: labels must be (N,) or one-hot (N, 2), got shape {tuple(arr.shape)}")
    if arr.size and (np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any()):
        raise DataFormatError(f"{where}: labels contain NaN")
    if not np.all(np.isin(arr, (0, 1))):
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5].tolist()
        raise DataFormatError(f"{where}: labels must be in {{0, 1}}, found {bad}")
    return torch.as_tensor(arr.astype(np.int64))


def _embedding(raw: Any, where: str, expect_dim: int | None, n: int) -> Tensor:
    arr = np.asarray(raw)
    if arr.dtype == object:
        try:
            arr = np.stack([np.asarray(r, dtype=np.float32) for r in arr])
        except ValueError as err:
            raise DataFormatError(f"{where}: embeddings have ragged rows ({err})") from None
    if arr.ndim != 2:
        raise DataFormatError(f"{where}: embeddings must be 2-D (N, d), got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise DataFormatError(f"{where}: {arr.shape[0]} rows but {n} labels")
    if expect_dim is not None and arr.shape[1] != expect_dim:
        raise DataFormatError(f"{where}: embedding width {arr.shape[1]}, expected {expect_dim}")
    if not np.issubdtype(arr.dtype, np.number):
        raise DataFormatError(f"{where}: embeddings must be numeric, got dtype {arr.dtype}")
    out = torch.as_tensor(arr.astype(np.float32))
    if not torch.isfinite(out).all():
        raise DataFormatError(f"{where}: embeddings contain NaN or inf")
    return out


def _make_split(columns: dict[str, Any], source: str, split: str, expect_dim: int | None) -> Split:
    for col in COLUMNS:
        if col not in columns:
            raise DataFormatError(f"{source}: split {split!r} has no column {col!r} (has {sorted(columns)})")
    label = _labels(columns["label"], f"{source} [{split}.label]")
    img = _embedding(columns["img"], f"{source} [{split}.img]", expect_dim, len(label))
    text = _embedding(columns["text"], f"{source} [{split}.text]", expect_dim, len(label))
    return Split(img=img, text=text, label=label)


def load_npz(path: str | Path, *, expect_dim: int | None = None) -> TweetData:
    """Load the offline format (module docstring); ``expect_dim`` checks the embedding widths."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npz file at {path}")
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        splits = {}
        for split in SPLITS:
            present = {c: f"{split}_{c}" for c in COLUMNS if f"{split}_{c}" in keys}
            if not present:
                raise DataFormatError(f"{path}: missing split {split!r} (no {split}_img/_text/_label arrays)")
            columns = {c: npz[k] for c, k in present.items()}
            for c in COLUMNS:
                if c not in columns:
                    raise DataFormatError(f"{path}: split {split!r} has no array {split}_{c!s}")
            splits[split] = _make_split(columns, str(path), split, expect_dim)
    return TweetData(**splits)


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "loading the paper's Hugging Face dataset needs the 'datasets' package: pip install datasets"
        ) from err
    return datasets


def _is_hf_dict(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file()


def _is_hf_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_info.json").is_file()


def load_hf_dataset(folder: str | Path, *, expect_dim: int | None = 768) -> TweetData:
    """Load the paper's extracted Hugging Face folder (``DatasetDict``, or one saved Dataset per split)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no dataset folder at {folder} (download it with experiments.tweet.data.download_dataset)"
        )
    datasets = _require_datasets()
    if _is_hf_dict(folder):
        dd = datasets.load_from_disk(str(folder))
        available = dict(dd.items())
    else:
        available = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and _is_hf_dataset(p)}
        if not available:
            raise DataFormatError(
                f"{folder}: not a Hugging Face datasets folder (no dataset_dict.json, no saved splits)"
            )
    splits = {}
    for split in SPLITS:
        name = split if split in available else ("validation" if split == "val" else None)
        if name not in available:
            raise DataFormatError(f"{folder}: missing split {split!r} (has {sorted(available)})")
        ds = available[name]
        if isinstance(ds, Path):
            ds = datasets.load_from_disk(str(ds))
        missing = [c for c in COLUMNS if c not in ds.column_names]
        if missing:
            raise DataFormatError(
                f"{folder}: split {split!r} has no column {missing[0]!r} (has {sorted(ds.column_names)})"
            )
        npds = ds.with_format("numpy")
        columns = {c: npds[c] for c in COLUMNS}
        splits[split] = _make_split(columns, str(folder), split, expect_dim)
    return TweetData(**splits)


def find_real_data(data_dir: str | Path) -> Path:
    """The HF folder or ``.npz`` file inside (or at) ``data_dir``: ``data_dir`` itself if it is a
    ``.npz`` file or a Hugging Face datasets folder, else ``data_dir/dataset`` (the paper's zip
    extracts there), else the one ``.npz`` file in ``data_dir``. The errors name the absolute
    path looked at and what was looked for."""
    path = Path(data_dir).expanduser()
    where = path.absolute()
    wanted = (
        "a .npz file, a Hugging Face datasets folder (dataset_dict.json or saved splits), "
        "a 'dataset' subfolder holding one, or a folder with one .npz file"
    )
    if path.is_file() and path.suffix == ".npz":
        return path
    if not path.exists():
        raise FileNotFoundError(
            f"real data not found: nothing at {where} (looked for {wanted}); download it "
            "(experiments.tweet.data.download_dataset) or point data_dir / --data-dir at it"
        )
    if path.is_dir():
        if _is_hf_dict(path) or any(_is_hf_dataset(p) for p in path.iterdir() if p.is_dir()):
            return path
        sub = path / "dataset"
        if sub.is_dir() and _is_hf_dict(sub):
            return sub
        npzs = sorted(path.glob("*.npz"))
        if len(npzs) == 1:
            return npzs[0]
        if len(npzs) > 1:
            raise DataFormatError(
                f"{where}: several .npz files ({[p.name for p in npzs]}); name one in data_dir"
            )
    raise DataFormatError(f"{where}: not usable real data (looked for {wanted})")


def load_data(config: TweetConfig, synth: bool) -> TweetData:
    """Synthetic data (``config.synthetic``, seeded by ``config.seed``) or the real data
    in ``config.data_dir`` (a Hugging Face folder, a folder holding one, or a ``.npz``)."""
    if synth:
        from experiments.tweet.synthetic import SYNTHETIC_DEFAULTS, make_synthetic

        params: dict[str, Any] = {**SYNTHETIC_DEFAULTS, "seed": config.seed, **config.synthetic}
        return make_synthetic(**params)
    path = find_real_data(config.data_dir)
    if path.suffix == ".npz":
        return load_npz(path)
    return load_hf_dataset(path)
