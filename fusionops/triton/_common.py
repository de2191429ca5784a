"""Helpers shared by the Triton kernels of every operator (dtypes, block sizes, packing)."""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


def _tf32_allowed() -> bool:
    """torch's own float32 matmul setting: ``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision("high" | "medium")`` or the newer
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (one state in torch; each reader
    is asked in turn, since torch raises when the legacy and new APIs were mixed)."""
    matmul = torch.backends.cuda.matmul
    readers = (
        lambda: bool(matmul.allow_tf32),
        lambda: getattr(matmul, "fp32_precision", None) == "tf32",
        lambda: torch.get_float32_matmul_precision() in ("high", "medium"),
    )
    for read in readers:
        try:
            if read():
                return True
        except RuntimeError:
            continue
    return False


def _input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of the float32 ``tl.dot``s, as torch's float32 matmuls would do it:
    ``"tf32"`` (tensor cores, about 1e-3 relative error per product) on CUDA when torch allows
    TF32 for float32 matmuls, else ``"ieee"`` (exact float32 products, FMA units). Always
    ``"ieee"`` on CPU (the interpreter) and for other dtypes (16-bit dots use tensor cores
    anyway; float64 has no TF32). Read at every launch, so a setting changed at run time counts."""
    if dtype == torch.float32 and device.type == "cuda" and _tf32_allowed():
        return "tf32"
    return "ieee"


@dataclass(frozen=True)
class _Packed:
    """``zcat (N, Σ D_m)`` and each modality's width ``D_m`` and column offset in it."""

    zcat: Tensor
    dims: tuple[int, ...]
    widths: Tensor
    offsets: Tensor


@functools.lru_cache(maxsize=64)
def _layout(dims: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """int32 device arrays of the widths and offsets (cached: no host-to-device copy per call)."""
    offsets = [0, *itertools.accumulate(dims)][:-1]
    return (
        torch.tensor(dims, dtype=torch.int32, device=device),
        torch.tensor(offsets, dtype=torch.int32, device=device),
    )


def _pack(xs: list[Tensor], mask: Tensor | None) -> _Packed:
    """Pack the ``z_m`` into one small buffer. Any strides of xs and mask are read as they
    are; masked rows are selected away (never multiplied), so their NaN cannot leak."""
    x0 = xs[0]
    dims = tuple(int(x.shape[1]) + 1 for x in xs)
    zcat = torch.empty(x0.shape[0], sum(dims), dtype=x0.dtype, device=x0.device)
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    start = 0
    for m, x in enumerate(xs):
        zcat[:, start] = 1
        zcat[:, start + 1 : start + dims[m]] = x if mask is None else torch.where(mask[:, m, None], x, zero)
        start += dims[m]
    return _Packed(zcat, dims, *_layout(dims, x0.device))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
_HALF = (torch.float16, torch.bfloat16)


def _dot_dtype(dtype: torch.dtype, device: torch.device) -> tl.dtype:
    """Operand dtype of tl.dot: the input's (tensor cores for 16-bit), except bfloat16 under
    the interpreter, whose tl.dot multiplies the raw bits (triton-lang/triton#11584). float32
    holds bfloat16 values and their products exactly, so the result is the same."""
    return tl.float32 if dtype == torch.bfloat16 and device.type == "cpu" else _TL[dtype]


def _block(n: int, lo: int, hi: int) -> int:
    """A power of two covering ``n`` clamped to ``[lo, hi]`` (lo = 16 where tl.dot uses it)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _reduce_hi(dtype: torch.dtype) -> int:
    """Largest block along a tl.dot reduction: 16-bit dots run on tensor cores; ieee float32
    and float64 ones on FMA units with their operands in registers, which spill beyond 16."""
    return 32 if dtype in _HALF else 16


def _row_block(n: int, other_blocks: int, hi: int, programs: int) -> int:
    """The largest row block up to ``hi`` (more reuse of each W tile) that still gives
    ``programs`` programs with ``other_blocks`` blocks per row block."""
    b = _block(n, 16, hi)
    while b > 16 and triton.cdiv(n, b) * other_blocks < programs:
        b //= 2
    return b


@functools.cache
def _target_programs(device: torch.device) -> int:
    """How many programs fill the device; reductions are split across programs up to this."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: small, so that small test shapes take the split paths too.
    return 4


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _zeros_like_inputs(xs: list[Tensor]) -> list[Tensor]:
    return [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in xs]
