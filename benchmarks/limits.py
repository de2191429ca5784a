"""The machine's limits, measured (not taken from a data sheet), that achieved rates are read
against: a large dense matmul's rate (bf16 on GPU, fp32 on CPU) and a large copy's bandwidth.

A FLOP-bound op's row reports ``frac_matmul`` (its model TFLOP/s over the matmul rate), a
memory-bound one's ``frac_bandwidth`` (its GB/s over the copy's); both are measured in the
same run, on the same device and threads, as the rows they scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from benchmarks import timing


@dataclass(frozen=True)
class Limits:
    matmul_tflops: float  # 2·n³ / time of an (n, n) @ (n, n) matmul
    matmul_dtype: str
    bandwidth_gbps: float  # (bytes read + bytes written) / time of a large copy

    def columns(self) -> dict[str, str]:
        """The CSV columns every row of the run carries."""
        return {
            "matmul_tflops": f"{self.matmul_tflops:.4g}",
            "matmul_dtype": self.matmul_dtype,
            "bandwidth_gbps": f"{self.bandwidth_gbps:.4g}",
        }


def measure(device: str, *, matmul_n: int | None = None, copy_mb: int | None = None) -> Limits:
    """Median time of each probe (``benchmarks.timing``, i.e. ``torch.utils.benchmark``).

    Defaults: GPU an 8192² bf16 matmul and a 2 GiB copy (far beyond L2); CPU a 1024² fp32
    matmul (the size the ops' block GEMMs reach) and a 256 MiB copy (beyond the caches).
    """
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = matmul_n or (8192 if cuda else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
    elems = (copy_mb or (2048 if cuda else 256)) * 2**20 // 4
    src = torch.randn(elems, device=device, generator=gen)
    dst = torch.empty_like(src)
    probes = {"matmul": lambda: lambda: torch.mm(a, b), "copy": lambda: lambda: dst.copy_(src)}
    t = timing.measure(probes, seconds=0.3, rounds=1)
    median = {}
    for name, m in t.items():
        if isinstance(m, Exception):
            raise RuntimeError(f"measuring the {name} limit on {device} failed: {m}") from m
        median[name] = m.median
    return Limits(
        matmul_tflops=2 * n**3 / median["matmul"] / 1e12,
        matmul_dtype=str(dtype).removeprefix("torch."),
        bandwidth_gbps=2 * elems * 4 / median["copy"] / 1e9,
    )


def fractions(row: dict[str, object], info: dict[str, str]) -> dict[str, float]:
    """``frac_matmul`` / ``frac_bandwidth`` of a timed row, where the run measured its limits."""
    out = {}
    for rate, limit, name, scale in (
        ("tflops", "matmul_tflops", "frac_matmul", 1.0),
        ("gbps", "bandwidth_gbps", "frac_bandwidth", 1.0),
    ):
        if row.get(rate, "") != "" and info.get(limit):
            out[name] = round(float(row[rate]) * scale / float(info[limit]), 4)  # type: ignore[arg-type]
    return out


def rotation_copies(input_bytes: int, l2_bytes: int, most: int = 8) -> int:
    """How many copies of a case's inputs GPU timing cycles through so that each call finds its
    inputs outside L2 (as in a model, where other work evicts them): enough to span twice the L2
    size, at most ``most``; 1 when one set is already that large."""
    if input_bytes <= 0 or l2_bytes <= 0:
        return 1
    return max(1, min(most, math.ceil(2 * l2_bytes / input_bytes)))
