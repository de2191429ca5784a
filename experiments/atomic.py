"""Atomic result files for every study: a temp file in the target folder, then ``os.replace``,
so a reader (or an interrupted run) never sees a partial file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_bytes(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then move it into place (mode 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; a result file is for everyone to read
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    return write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
