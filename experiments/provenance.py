"""What every study records in ``results.json`` about where its numbers came from: package
versions, the git commit of the checkout (and whether it had local changes), the device, and
which fusionops backend served each op (``fusionops.dispatch_counts()``: calls per op and
backend; counted for eager calls)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def package_version(name: str) -> str | None:
    """The installed version of ``name`` (distribution name), or ``None``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path = REPO) -> dict[str, Any]:
    """``{"sha", "dirty"}`` of the checkout (``dirty``: tracked files differ from the commit);
    ``{"sha": None, "error": …}`` outside a git checkout or without git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError) as err:
        return {"sha": None, "error": type(err).__name__}
    return {"sha": sha, "dirty": bool(changed)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device(name: str = "cpu") -> dict[str, Any]:
    """The device the study ran on (``"cpu"`` for every study here) and the machine's CPU/GPU."""
    out: dict[str, Any] = {
        "type": name,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def environment(packages: Iterable[str] = (), device_type: str = "cpu") -> dict[str, Any]:
    """Versions (python, torch, numpy, fusionops, triton and ``packages``), the fusionops
    extension's state and forced backend, the commit, the device and the load average."""
    import fusionops
    from fusionops import _backend, _extension

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusionops": fusionops.__version__,
        "numpy": package_version("numpy"),
        "triton": package_version("triton"),
    }
    for name in packages:
        versions[name] = package_version(name)
    return {
        "versions": versions,
        "commit": git_commit(),
        "device": device(device_type),
        "platform": platform.platform(),
        "fusionops_extension": "loaded" if _extension.extension_loaded() else _extension.extension_error(),
        "forced_backend": _backend.forced_backend() or os.environ.get("FUSIONOPS_BACKEND"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def add_counts(total: dict[str, dict[str, int]], more: Mapping[str, Mapping[str, int]]) -> None:
    """Add one dispatch-count dict (op → backend → calls) into ``total``."""
    for op, per in more.items():
        into = total.setdefault(op, {})
        for backend, n in per.items():
            into[backend] = into.get(backend, 0) + int(n)


def count_delta(
    before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    """``after − before`` of two ``fusionops.dispatch_counts()`` snapshots (zero entries dropped)."""
    out: dict[str, dict[str, int]] = {}
    for op, per in after.items():
        for backend, n in per.items():
            d = int(n) - int(before.get(op, {}).get(backend, 0))
            if d:
                out.setdefault(op, {})[backend] = d
    return out


def backends_line(counts: Mapping[str, Mapping[str, int]]) -> str:
    """``tensor_fusion: cpu 1200; low_rank_fusion: reference 30, cpu 1170`` (or ``none recorded``)."""
    return (
        "; ".join(
            f"{op}: " + ", ".join(f"{b} {n:,}" for b, n in sorted(per.items()))
            for op, per in sorted(counts.items())
        )
        or "none recorded"
    )


def summary_line(env: Mapping[str, Any]) -> str:
    """One line for a results.md: versions, commit and device."""
    v = env.get("versions", {})
    c = env.get("commit", {})
    d = env.get("device", {})
    sha = c.get("sha")
    commit = f"{sha[:12]}{' + local changes' if c.get('dirty') else ''}" if sha else "unknown commit"
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    where = f"{d.get('cpu', '?')}, {d.get('cpu_count', '?')} CPUs"
    return f"{vers}; commit {commit}; device {d.get('type', '?')} ({where})"
