"""``python -m fusionops.info``: what is built and usable on this machine, and why not."""

from __future__ import annotations

import importlib.util
import os
import platform

import torch

import fusionops.ops  # noqa: F401  (registers every op)
from fusionops import _extension
from fusionops._backend import BACKENDS, DEFAULT_ORDER, forced_backend, reasons
from fusionops.registry import OPS


def version_of(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    return getattr(__import__(module), "__version__", "unknown")


def report() -> str:
    lines = [
        f"fusionops {__import__('fusionops').__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {version_of('triton')}",
        f"torch CUDA: {torch.version.cuda or 'none (CPU build)'}; "
        f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}",
        "compiled extension fusionops._C: "
        + ("loaded" if _extension.extension_loaded() else f"missing ({_extension.extension_error()})")
        + (" with CUDA kernels" if _extension.extension_built_with_cuda() else ""),
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}; "
        f"forced backend: {forced_backend() or 'none (automatic)'}",
        "",
    ]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op in OPS.values():
        for device in devices:
            lines.append(
                f"{op.name} on {device.type} (float32); automatic order {DEFAULT_ORDER[device.type]}:"
            )
            for name in BACKENDS:
                why = reasons(op, name, device, torch.float32)
                lines.append(f"  {name:<10} " + ("usable" if not why else "unusable: " + "; ".join(why)))
    for op in OPS.values():
        lines.append(f"{op.name} on cpu, automatic choice: {op.size_rule()} (python -m benchmarks.crossover)")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
