"""The benchmarks' one timer (benchmarks/timing.py, on torch.utils.benchmark): what it measures,
the interleaving, failures, contexts and threads; the steps it times can repeat (a timed block
calls its thunk many times after one setup); the report's rows carry its statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from itertools import groupby

import pytest
import torch
from torch.utils.benchmark import Measurement

from benchmarks import ops, runner, timing, ways
from benchmarks.spec import MODES


def test_each_way_is_measured_and_a_slower_way_reads_slower():
    out = timing.measure(
        {"fast": lambda: lambda: None, "slow": lambda: lambda: time.sleep(0.002)}, seconds=0.06, rounds=2
    )
    fast, slow = out["fast"], out["slow"]
    assert isinstance(fast, Measurement) and isinstance(slow, Measurement)
    assert 0.002 <= slow.median < 0.02, slow
    assert fast.median < slow.median / 20
    assert len(slow.times) >= 2  # at least one block per round
    assert (fast.description, slow.description) == ("fast", "slow")


def test_rounds_interleave_the_ways_in_alternating_order():
    calls: list[str] = []

    def setup(name: str) -> timing.Setup:
        def make():
            calls.append(name)
            return lambda: None

        return make

    timing.measure({"a": setup("a"), "b": setup("b")}, seconds=0.003, rounds=3)
    # Round 0 a then b, round 1 b then a, round 2 a then b (each round several setups per way).
    assert [name for name, _ in groupby(calls)] == ["a", "b", "a", "b"]


def test_a_failing_way_gets_its_exception_and_is_not_retried():
    tried = []

    def boom() -> None:
        tried.append(1)
        raise RuntimeError("boom")

    out = timing.measure({"bad": lambda: boom, "good": lambda: lambda: None}, seconds=0.003, rounds=3)
    assert isinstance(out["bad"], RuntimeError) and str(out["bad"]) == "boom"
    assert isinstance(out["good"], Measurement)
    assert len(tried) == 1


def test_contexts_wrap_only_their_way_and_the_process_threads_are_used():
    state = {"inside": False}
    seen: dict[str, set] = {"with": set(), "without": set()}

    @contextlib.contextmanager
    def flag():
        state["inside"] = True
        try:
            yield
        finally:
            state["inside"] = False

    def record(name: str) -> timing.Setup:
        return lambda: lambda: seen[name].add((state["inside"], torch.get_num_threads()))

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # Timer's own default is 1 thread
    try:
        timing.measure(
            {"with": record("with"), "without": record("without")},
            seconds=0.003,
            rounds=2,
            contexts={"with": flag},
        )
    finally:
        torch.set_num_threads(threads)
    assert seen == {"with": {(True, 2)}, "without": {(False, 2)}}


@pytest.mark.parametrize("rounds, seconds", [(0, 0.1), (1, 0.0)])
def test_bad_knobs_are_refused(rounds, seconds):
    with pytest.raises(ValueError, match="rounds >= 1 and seconds > 0 expected"):
        timing.measure({"a": lambda: lambda: None}, seconds=seconds, rounds=rounds)


@pytest.mark.parametrize("op", list(ops.OPS))
def test_backward_steps_repeat_on_one_graph(op):
    """The timed backward thunk runs many times after one forward: every uncompiled way that
    can run here gives the same gradients each time, and those of a fresh fwd+bwd."""
    spec = ops.OPS[op]
    inp = spec.make_inputs(spec.probe_case("fp32"), "cpu", True)
    available, _ = ways.available_ways(spec, "cpu", "fp32")
    checked = 0
    for way in available:
        base = spec.baseline(way.name)
        if (base is not None and base.compiled) or not way.serves("backward"):
            continue  # compiling is slow; forward-only ways have no backward step
        thunk = ways.make_step(way, inp, "backward")()
        first, second = thunk(), thunk()
        fresh = ways.make_step(way, inp, "fwd+bwd")()()
        for a, b, c in zip(first, second, fresh, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=way.name)
            torch.testing.assert_close(a, c, rtol=0, atol=0, msg=way.name)
        checked += 1
    assert checked >= 1


def test_a_backward_step_runs_its_forward_once():
    """timeit runs the setup before every block (and five more times to estimate its cost):
    the forward must not run each time."""
    spec = ops.OPS["product_fusion"]
    calls = []

    def counted(*args):
        calls.append(1)
        return spec.fused(*args)

    inp = spec.make_inputs(spec.probe_case("fp32"), "cpu", True)
    setup = ways.make_step(ways.Way("counted", counted), inp, "backward")
    thunks = [setup() for _ in range(3)]
    assert len(calls) == 1
    for t in thunks:
        torch.testing.assert_close(t(), thunks[0](), rtol=0, atol=0)


def test_rotating_setup_gives_the_next_input_set_at_every_call():
    made = []

    def setup(tag: str) -> timing.Setup:
        def make():
            made.append(tag)
            return lambda: tag

        return make

    thunk = runner.rotating([setup("a"), setup("b"), setup("c")])()
    assert made == ["a", "b", "c"]  # every set's untimed part once per block
    assert [thunk() for _ in range(5)] == ["a", "b", "c", "a", "b"]


def test_report_rows_carry_the_timer_statistics():
    spec = ops.OPS["product_fusion"]
    spec = dataclasses.replace(spec, baselines=tuple(b for b in spec.baselines if not b.compiled))
    case = spec.pytest_cases[0]
    rows = runner.time_case(spec, case, "cpu", MODES, {"seconds": 0.006, "rounds": 2}, {"device_name": "t"})
    assert rows and not [r for r in rows if r["error"]]
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"], r
        assert r["iqr_ms"] >= 0 and r["repeats"] >= 2, r
        assert r["gbps"] > 0, r
