"""Where a report's CSV goes and how it is written."""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

from benchmarks.spec import Row

RESULTS = Path(__file__).resolve().parent / "results"


def result_path(out: Path, op: str, device: str, label: str) -> Path:
    """``<out>/<op>_<device>_<date>[_<label>].csv``, e.g. ``low_rank_fusion_cpu_2026-11-23_full.csv``."""
    date = datetime.date.today().isoformat()
    return out / f"{op}_{device}_{date}{'_' + label if label else ''}.csv"


def write_csv(rows: list[Row], path: Path) -> None:
    """One row per dict; the columns are every key in order of first appearance (missing: empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
