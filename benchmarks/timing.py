"""Wall-clock timing of several ways side by side: warm-up, then interleaved rounds.

CPU: ``time.perf_counter`` around each call. CUDA: a pair of ``torch.cuda.Event`` per call
(GPU time of the queued kernels, not host launch jitter), waited for after each call. The
untimed part of a call (``setup``: e.g. the forward before a timed backward) runs before the
start mark.

Ways are interleaved: every round times each way once (order reversed every other round),
so a burst of load from another process, or a clock change, hits all ways alike instead of
whichever happened to be running. The reported figure is each way's median over the rounds.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
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


def _summary(times: list[float]) -> Timing:
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times), min(times), q3 - q1, len(times))


def measure(
    setups: Mapping[str, Setup],
    device: str,
    *,
    warmup: int = 2,
    target_s: float = 0.5,
    min_repeats: int = 5,
    max_repeats: int = 100,
) -> dict[str, Timing | Exception]:
    """Time ``setup()()`` for each named setup.

    ``warmup`` untimed calls each (compilation, autotuning, lazy init; a way that raises
    here gets its exception back instead of a Timing), then rounds until about ``target_s``
    seconds per way have been spent, between ``min_repeats`` and ``max_repeats`` rounds.
    The median resists the odd slow call (a page fault, another process).
    """
    cuda = device.startswith("cuda")
    out: dict[str, Timing | Exception] = {}
    last: dict[str, float] = {}
    for name, setup in setups.items():
        try:
            for _ in range(max(warmup, 1)):
                last[name] = _once(setup, cuda)
        except Exception as exc:  # noqa: BLE001 - reported per way, the others go on
            out[name] = exc
            last.pop(name, None)
    if not last:
        return out
    per_round_ms = sum(last.values())
    rounds = math.ceil(target_s * 1e3 * len(last) / max(per_round_ms, 1e-3))
    rounds = min(max_repeats, max(min_repeats, rounds))
    times: dict[str, list[float]] = {name: [] for name in last}
    order = list(last)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise, not the op's cost
    try:
        for r in range(rounds):
            for name in order if r % 2 == 0 else reversed(order):
                times[name].append(_once(setups[name], cuda))
    finally:
        if gc_was_enabled:
            gc.enable()
    out.update((name, _summary(ts)) for name, ts in times.items())
    return out
