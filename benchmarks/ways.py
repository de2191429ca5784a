"""The ways to compute an op, which of them can run here, and the step each mode times.

Ways of every op (``spec.baselines`` adds the op's own unfused ones):

* ``fused[<backend>]``: the public fusionops function with the backend forced (``cpu``,
  ``triton``, ``cuda``); offered only where the op registry's ``reasons(op, backend, device, dtype)``
  is empty and a tiny fwd+bwd probe works, otherwise reported as skipped with the reasons.
* the baselines, e.g. ``reference`` (``fusionops.reference``) and ``compile(reference)``
  (``torch.compile`` of it, inductor, static shapes). A baseline may serve only some modes
  (``Baseline.modes``, e.g. a forward-only library): every enumeration of (way, mode) goes
  through :meth:`Way.serves` / :func:`way_modes`, so it gets no step, row or test in the others.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import fusionops
from benchmarks.spec import DTYPES, MODES, Fn, Inputs, OpSpec

FUSED_BACKENDS = ("cpu", "triton", "cuda")


@dataclass(frozen=True)
class Way:
    name: str
    fn: Fn
    backend: str | None = None  # the fusionops backend forced, None for the baselines
    modes: tuple[str, ...] = MODES  # the modes it serves (fused ways: all)

    @property
    def fused(self) -> bool:
        return self.backend is not None

    def serves(self, mode: str) -> bool:
        return mode in self.modes


def fused_fn(spec: OpSpec, backend: str) -> Fn:
    def fn(*args: object) -> Tensor:
        # The op records its backend at call time, so backward needs no context of its own.
        with fusionops.backend(backend):
            return spec.fused(*args)

    return fn


@functools.cache
def compiled(fn: Fn) -> Fn:
    """``torch.compile(fn, dynamic=False)``, one per function and process.

    Static shapes so every case gets its own kernels, and a recompile limit high enough for
    the grids (failing loudly beats silently timing eager code).
    """
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
    cfg.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False)


def _probe(spec: OpSpec, fn: Fn, device: str, dtype: str) -> str | None:
    """Run one tiny fwd+bwd; a kernel that is declared but broken or missing says why here."""
    try:
        inp = spec.make_inputs(spec.probe_case(dtype), device, True)
        y = fn(*inp.args)
        torch.autograd.grad(y, inp.leaves, inp.grad_out)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot serve"
        return f"a probe call failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def fused_reasons(spec: OpSpec, backend: str, device: str, dtype: str) -> list[str]:
    """Why ``fused[backend]`` cannot be benchmarked here (empty: it can)."""
    dev = torch.device(device)
    reasons = list(spec.reasons(backend, dev, DTYPES[dtype]))
    if not reasons and backend == "triton" and dev.type == "cpu":
        # Served, but by the interpreter: correct and far too slow to be worth timing.
        reasons.append(
            "on CPU Triton runs only in the interpreter (TRITON_INTERPRET=1), "
            "too slow to benchmark; run on a CUDA device"
        )
    if not reasons:
        why = _probe(spec, fused_fn(spec, backend), device, dtype)
        reasons += [why] if why else []
    return reasons


@functools.cache
def available_ways(
    spec: OpSpec, device: str, dtype: str
) -> tuple[tuple[Way, ...], tuple[tuple[str, str], ...]]:
    """The ways that can run on ``device``/``dtype``, and ``(way, reason)`` for the others.

    Fused ways come first, then the op's baselines in their order.
    """
    ways: list[Way] = []
    skipped: list[tuple[str, str]] = []
    for backend in FUSED_BACKENDS:
        why = fused_reasons(spec, backend, device, dtype)
        if why:
            skipped.append((f"fused[{backend}]", "; ".join(why)))
        else:
            ways.append(way_by_name(spec, f"fused[{backend}]"))
    for base in spec.baselines:
        if base.compiled and os.environ.get("TORCH_COMPILE_DISABLE") == "1":
            skipped.append((base.name, "TORCH_COMPILE_DISABLE=1 is set (torch.compile would run eager)"))
        elif why := base.reasons(device, dtype):
            skipped.append((base.name, "; ".join(why)))
        else:
            ways.append(way_by_name(spec, base.name))
    return tuple(ways), tuple(skipped)


def all_way_names(spec: OpSpec) -> list[str]:
    return [f"fused[{b}]" for b in FUSED_BACKENDS] + [b.name for b in spec.baselines]


def way_modes(spec: OpSpec, name: str) -> tuple[str, ...]:
    """The modes the way called ``name`` serves (fused ways: every mode), without making it."""
    base = spec.baseline(name)
    return base.modes if base is not None else MODES


def way_by_name(spec: OpSpec, name: str) -> Way:
    """The way called ``name`` (see :func:`all_way_names`), without checking it can serve."""
    for base in spec.baselines:
        if base.name == name:
            return Way(name, base.make(), modes=base.modes)
    backend = name.removeprefix("fused[").removesuffix("]")
    if name != f"fused[{backend}]" or backend not in FUSED_BACKENDS:
        raise ValueError(f"{spec.name}: unknown way {name!r}; expected one of {all_way_names(spec)}")
    return Way(name, fused_fn(spec, backend), backend)


def make_step(way: Way, inp: Inputs, mode: str) -> Callable[[], Callable[[], object]]:
    """``setup`` for one timed block: ``setup()`` does the untimed part and returns the thunk
    to time, which may be called many times. ``forward`` runs under ``no_grad`` (inference);
    ``backward`` runs the forward once, in the first ``setup``, and times ``autograd.grad``
    alone, with ``retain_graph=True`` so every timed call can repeat it on that one graph (the
    saved tensors are then kept, not freed as a training step's backward frees them);
    ``fwd+bwd`` times both.
    Gradients are taken for every floating input and returned, not accumulated into ``.grad``.
    A mode the way does not serve (``way.modes``) is a ValueError: callers enumerate only the
    modes it serves.
    """
    if mode in MODES and not way.serves(mode):
        raise ValueError(f"way {way.name} serves only {', '.join(way.modes)}, not {mode}")
    fn, args, leaves = way.fn, inp.args, inp.leaves
    if mode == "forward":

        def forward() -> object:
            with torch.no_grad():
                return fn(*args)

        return lambda: forward
    if mode == "backward":
        graph: list[Tensor] = []

        def setup_backward() -> Callable[[], object]:
            if not graph:  # one forward per step: timeit runs setup before every block
                graph.append(fn(*args))
            y = graph[0]
            return lambda: torch.autograd.grad(y, leaves, inp.grad_out, retain_graph=True)

        return setup_backward
    if mode == "fwd+bwd":

        def fwd_bwd() -> object:
            y = fn(*args)
            return torch.autograd.grad(y, leaves, inp.grad_out)

        return lambda: fwd_bwd
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
