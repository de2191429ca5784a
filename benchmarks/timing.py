"""Timing of several ways side by side, by ``torch.utils.benchmark``.

Each way is a ``torch.utils.benchmark.Timer`` (statement ``thunk()``, setup ``thunk =
setup()``: the untimed part, e.g. the forward before a timed backward, runs outside the timed
loop). ``blocked_autorange`` does the warm-up (its block-size estimate calls the statement
first, untimed: compilation, autotuning, lazy init), picks how many calls a timed block holds,
times blocks with garbage collection off, and its ``Measurement`` gives the statistics.
Its clock is ``timeit.default_timer`` (``time.perf_counter``), after synchronizing the
accelerator when one is present, so a CUDA block's time is the host time of its queued kernels.

The one thing added here is the interleaving: the time per way is split into ``rounds``
``blocked_autorange`` calls, every round measures each way once (order reversed every other
round), and ``Measurement.merge`` joins a way's rounds. A burst of load from another process
thus hits all ways alike instead of whichever happened to be running.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

import torch
from torch.utils.benchmark import Measurement, Timer

Setup = Callable[[], Callable[[], object]]  # setup() does the untimed part, returns the thunk to time


def measure(
    setups: Mapping[str, Setup],
    *,
    seconds: float,
    rounds: int = 3,
    label: str = "",
    sub_label: str = "",
    contexts: Mapping[str, Callable[[], AbstractContextManager[object]]] | None = None,
) -> dict[str, Measurement | Exception]:
    """Time ``setup()()`` for each named setup: about ``seconds`` per way over ``rounds``
    interleaved ``blocked_autorange`` calls, each taking at least one block.

    A way that raises gets its exception back instead of a Measurement; the others go on.
    ``contexts[name]()`` is entered around each of that way's ``blocked_autorange`` calls
    (e.g. ``fusionops.backend``), so its own cost is not counted per call. The Measurements
    carry ``label`` / ``sub_label`` / the way's name as description, for
    ``torch.utils.benchmark.Compare``.
    """
    if rounds < 1 or not seconds > 0:
        raise ValueError(f"measure: rounds >= 1 and seconds > 0 expected, got {rounds=}, {seconds=}")
    timers = {
        name: Timer(
            "thunk()",
            setup="thunk = setup()",
            globals={"setup": setup},
            # Timer's default is 1 thread; time with the threads the process runs with.
            num_threads=torch.get_num_threads(),
            label=label,
            sub_label=sub_label,
            description=name,
        )
        for name, setup in setups.items()
    }
    parts: dict[str, list[Measurement]] = {name: [] for name in timers}
    failed: dict[str, Exception] = {}
    for r in range(rounds):
        alive = [name for name in timers if name not in failed]
        for name in alive if r % 2 == 0 else reversed(alive):
            try:
                with (contexts or {}).get(name, contextlib.nullcontext)():
                    parts[name].append(timers[name].blocked_autorange(min_run_time=seconds / rounds))
            except Exception as exc:  # noqa: BLE001 - reported per way, the others go on
                failed[name] = exc
    out: dict[str, Measurement | Exception] = {}
    for name in timers:
        out[name] = failed[name] if name in failed else Measurement.merge(parts[name])[0]
    return out
