"""Wall-clock timing of one step: warm-up, then the median of adaptive repeats.

CPU: ``time.perf_counter`` around each repeat. CUDA: a pair of ``torch.cuda.Event`` per
repeat (GPU time of the queued kernels, not host launch jitter), waited for after each
repeat. The untimed part of a repeat (``setup``: e.g. the forward before a timed
backward) runs before the start mark.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Setup = Callable[[], Callable[[], object]]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    iqr_ms: float  # spread: 75th minus 25th percentile
    repeats: int


def _once(setup: Setup, cuda: bool) -> float:
    thunk = setup()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        thunk()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    thunk()
    return (time.perf_counter() - t0) * 1e3


def measure(setup: Setup, device: str, *, warmup: int = 2, target_s: float = 0.5,
            min_repeats: int = 5, max_repeats: int = 100) -> Timing:
    """Time ``setup()()``: ``warmup`` untimed calls (compilation, autotuning, caches), then
    enough repeats to fill about ``target_s`` seconds, between ``min_repeats`` and
    ``max_repeats``; the median resists the odd slow repeat (a page fault, another process).
    """
    cuda = device.startswith("cuda")
    last = 0.0
    for _ in range(max(warmup, 1)):
        last = _once(setup, cuda)
    repeats = min(max_repeats, max(min_repeats, math.ceil(target_s * 1e3 / max(last, 1e-3))))
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed repeat is noise, not the op's cost
    try:
        times = [_once(setup, cuda) for _ in range(repeats)]
    finally:
        if gc_was_enabled:
            gc.enable()
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times), min(times), q3 - q1, repeats)
