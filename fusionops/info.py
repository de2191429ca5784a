"""``python -m fusionops.info``: what is built and usable on this machine, and why not."""

from __future__ import annotations

import importlib.util
import os
import platform

import torch

from fusionops import _extension
from fusionops._backend import BACKENDS, DEFAULT_ORDER, forced_backend
from fusionops.ops.low_rank_fusion import CPU_FUSED_MIN_ELEMENTS as LMF_MIN
from fusionops.ops.low_rank_fusion import _reasons as lmf_reasons
from fusionops.ops.multiple_kernel import CPU_FUSED_MIN_ELEMENTS as MKL_MIN
from fusionops.ops.multiple_kernel import _reasons as mkl_reasons
from fusionops.ops.product_fusion import CPU_FUSED_MIN_ELEMENTS as PRODUCT_MIN
from fusionops.ops.product_fusion import _reasons as product_reasons
from fusionops.ops.skew_pair import CPU_FUSED_MIN_ELEMENTS as SKEW_MIN
from fusionops.ops.skew_pair import _reasons as skew_reasons
from fusionops.ops.tensor_fusion import CPU_FUSED_MIN_ELEMENTS as TF_MIN
from fusionops.ops.tensor_fusion import _reasons as tf_reasons

# Every op: its reason function and its CPU size rule (what is counted, the threshold).
OPS = {
    "tensor_fusion": (tf_reasons, "N*K", TF_MIN),
    "low_rank_fusion": (lmf_reasons, "N*R*O*M", LMF_MIN),
    "product_fusion": (product_reasons, "N*d (and all calls with M = 2)", PRODUCT_MIN),
    "skew_pair_attention": (skew_reasons, "N*P*D", SKEW_MIN),
    "multiple_kernel": (mkl_reasons, "N_a*N_b", MKL_MIN),
}


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    return getattr(__import__(module), "__version__", "unknown")


def report() -> str:
    lines = [
        f"fusionops {__import__('fusionops').__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}",
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
    for op, (reasons_fn, _, _) in OPS.items():
        for device in devices:
            lines.append(f"{op} on {device.type} (float32); automatic order {DEFAULT_ORDER[device.type]}:")
            for name in BACKENDS:
                why = reasons_fn(name, device, torch.float32)
                lines.append(f"  {name:<10} " + ("usable" if not why else "unusable: " + "; ".join(why)))
    for op, (_, size, threshold) in OPS.items():
        lines.append(
            f"{op} on cpu: calls with {size} < {threshold} go to the reference unless a backend "
            "is forced (measured faster there: python -m benchmarks.crossover)"
        )
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
