"""What the benchmarks run: the shape grid, the inputs, the ways to compute, the modes.

Shared by the pytest-benchmark suite (``test_tensor_fusion.py``), the report (``report.py``)
and the memory probe (``memory.py``), so all three measure the same thing.

Ways to compute ``y = Z Wᵀ + b``:

* ``fused[<backend>]``: ``fusionops.tensor_fusion`` with the backend forced (``cpu``,
  ``triton``, ``cuda``); only the backends that can serve the device and dtype are offered,
  the others are reported with fusionops' own reasons.
* ``reference``: materialise ``Z`` by chained outer products, then ``F.linear`` (the baseline
  of MultiBench, MMSA and Michaels et al.): ``fusionops.reference.tensor_fusion``.
* ``compile(reference)``: the same under ``torch.compile`` (inductor, static shapes).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import fusionops
from fusionops import reference

# The op's module (the package re-exports the function under the same name).
tf_op = importlib.import_module("fusionops.ops.tensor_fusion")

MODES = ("forward", "backward", "fwd+bwd")
FUSED_BACKENDS = ("cpu", "triton", "cuda")
REFERENCE = "reference"
COMPILED = "compile(reference)"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One tensor fusion problem: ``N`` rows, modality widths ``dims``, ``O`` outputs."""

    name: str
    n: int
    dims: tuple[int, ...]
    out: int
    dtype: str = "fp32"  # a key of _DTYPES, so a Case is printable and JSON-friendly

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def k(self) -> int:
        return math.prod(d + 1 for d in self.dims)

    @property
    def z_bytes(self) -> int:
        """Bytes of the (N, K) tensor Z that the reference materialises."""
        return self.n * self.k * self.torch_dtype.itemsize

    @property
    def out_bytes(self) -> int:
        """Bytes any fwd+bwd must allocate: y, dx_m, dW (O×K) and db."""
        elems = self.n * self.out + self.n * sum(self.dims) + self.out * self.k + self.out
        return elems * self.torch_dtype.itemsize

    def flops(self, mode: str) -> int:
        """Model FLOPs of the projection: fwd ``2NOK``; bwd ``4NOK`` (dW = gᵀZ and dZ = gW).

        The small terms (building Z, reducing dZ to dx_m, the bias) are left out, as in MFU.
        """
        fwd = 2 * self.n * self.out * self.k
        return {"forward": fwd, "backward": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]

    @property
    def sweep(self) -> str:
        """Cases differing only in N share a sweep (a line in the plots)."""
        return f"dims={'x'.join(map(str, self.dims))} O={self.out} {self.dtype}"


def _sweep(prefix: str, ns: tuple[int, ...], dims: tuple[int, ...], out: int,
           dtype: str = "fp32") -> list[Case]:
    return [Case(f"{prefix}-n{n}", n, dims, out, dtype) for n in ns]


# The goals (see report.py's checks): CPU fp32 N=512 dims (40,40,40) O=64, fwd+bwd
# (K = 68921, Z = 141 MB); GPU bf16 N=4096 dims (32,32,128) O=128 (K = 140481, Z = 1.15 GB).
HEADLINE = {
    "cpu": Case("headline-cpu", 512, (40, 40, 40), 64, "fp32"),
    "cuda": Case("headline-gpu", 4096, (32, 32, 128), 128, "bf16"),
}

# Grids sized for a 2-core CPU (default ~1-2 min, quick < 1 min) and for one GPU.
GRIDS: dict[str, dict[str, list[Case]]] = {
    "cpu": {
        "quick": _sweep("tri8", (64, 512), (8, 8, 8), 32),
        "default": _sweep("tri16", (128, 512, 2048), (16, 16, 16), 64)
        + [Case("bi64x128-n512", 512, (64, 128), 64)],
    },
    "cuda": {
        "quick": _sweep("tri32", (1024, 4096), (32, 32, 32), 128, "bf16"),
        "default": _sweep("tri32", (1024, 4096, 16384), (32, 32, 32), 128, "bf16")
        + _sweep("tri32x128", (1024, 4096), (32, 32, 128), 128, "bf16"),
    },
}

# A few small shapes for the pytest-benchmark suite, which must stay quick.
PYTEST_CASES = [Case("tri8-n64", 64, (8, 8, 8), 32), Case("bi16x24-n128", 128, (16, 24), 16)]


def all_cases(device: str) -> list[Case]:
    seen: dict[str, Case] = {}
    for grid in GRIDS[device].values():
        seen.update((c.name, c) for c in grid)
    seen[HEADLINE[device].name] = HEADLINE[device]
    return list(seen.values())


@dataclass
class Inputs:
    xs: list[Tensor]
    weight: Tensor
    bias: Tensor
    grad_out: Tensor  # dL/dy for the backward modes

    @property
    def leaves(self) -> list[Tensor]:
        return [*self.xs, self.weight, self.bias]


def make_inputs(case: Case, device: str, requires_grad: bool, seed: int = 0) -> Inputs:
    """Random inputs with a fixed seed; weight and bias as ``nn.Linear(K, O)`` draws them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype

    def rand(*shape: int, scale: float = 1.0, uniform: bool = False) -> Tensor:
        t = torch.empty(shape, device=device, dtype=torch.float32)
        t = t.uniform_(-scale, scale, generator=gen) if uniform else t.normal_(generator=gen)
        return t.to(dt).requires_grad_(requires_grad)

    bound = 1.0 / math.sqrt(case.k)
    xs = [rand(case.n, d) for d in case.dims]
    weight = rand(case.out, case.k, scale=bound, uniform=True)
    bias = rand(case.out, scale=bound, uniform=True)
    grad_out = rand(case.n, case.out).detach()
    return Inputs(xs, weight, bias, grad_out)


Fn = Callable[[list[Tensor], Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Way:
    name: str
    fn: Fn
    backend: str | None = None  # the fusionops backend forced, None for the baselines

    @property
    def fused(self) -> bool:
        return self.backend is not None


def _fused_fn(backend: str) -> Fn:
    def fn(xs: list[Tensor], weight: Tensor, bias: Tensor) -> Tensor:
        # The op records its backend at call time, so backward needs no context of its own.
        with fusionops.backend(backend):
            return fusionops.tensor_fusion(xs, weight, bias)

    return fn


@functools.cache
def _compiled_reference() -> Fn:
    # One compiled callable per process; static shapes so every case gets its own kernels,
    # and a recompile limit high enough for the grid (failing loudly beats timing eager).
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
    cfg.fail_on_recompile_limit_hit = True
    return torch.compile(reference.tensor_fusion, dynamic=False)


def _probe(fn: Fn, device: str, dtype: str) -> str | None:
    """Run one tiny fwd+bwd; a kernel that is declared but broken or missing says why here."""
    try:
        inp = make_inputs(Case("probe", 3, (2, 3), 2, dtype), device, requires_grad=True)
        y = fn(inp.xs, inp.weight, inp.bias)
        torch.autograd.grad(y, inp.leaves, inp.grad_out)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot serve"
        return f"a probe call failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def fused_reasons(backend: str, device: str, dtype: str) -> list[str]:
    """Why ``fused[backend]`` cannot be benchmarked here (empty: it can)."""
    dev = torch.device(device)
    reasons = tf_op._reasons(backend, dev, _DTYPES[dtype])
    if not reasons and backend == "triton" and dev.type == "cpu":
        # Served, but by the interpreter: correct and far too slow to be worth timing.
        reasons.append("on CPU Triton runs only in the interpreter (TRITON_INTERPRET=1), "
                       "too slow to benchmark; run on a CUDA device")
    if not reasons:
        why = _probe(_fused_fn(backend), device, dtype)
        reasons += [why] if why else []
    return reasons


@functools.cache
def available_ways(device: str, dtype: str) -> tuple[tuple[Way, ...], tuple[tuple[str, str], ...]]:
    """The ways that can run on ``device``/``dtype``, and ``(way, reason)`` for the others.

    Fused ways come first, then the two baselines.
    """
    ways: list[Way] = []
    skipped: list[tuple[str, str]] = []
    for backend in FUSED_BACKENDS:
        why = fused_reasons(backend, device, dtype)
        if why:
            skipped.append((f"fused[{backend}]", "; ".join(why)))
        else:
            ways.append(way_by_name(f"fused[{backend}]"))
    ways.append(way_by_name(REFERENCE))
    if os.environ.get("TORCH_COMPILE_DISABLE") == "1":  # torch.compile would run eager
        skipped.append((COMPILED, "TORCH_COMPILE_DISABLE=1 is set"))
    else:
        ways.append(way_by_name(COMPILED))
    return tuple(ways), tuple(skipped)


def all_way_names() -> list[str]:
    return [f"fused[{b}]" for b in FUSED_BACKENDS] + [REFERENCE, COMPILED]


def way_by_name(name: str) -> Way:
    """The way called ``name`` (see :func:`all_way_names`), without checking it can serve."""
    if name == REFERENCE:
        return Way(REFERENCE, reference.tensor_fusion)
    if name == COMPILED:
        return Way(COMPILED, _compiled_reference())
    backend = name.removeprefix("fused[").removesuffix("]")
    if name != f"fused[{backend}]" or backend not in FUSED_BACKENDS:
        raise ValueError(f"unknown way {name!r}; expected one of {all_way_names()}")
    return Way(name, _fused_fn(backend), backend)


def make_step(way: Way, inp: Inputs, mode: str) -> Callable[[], Callable[[], object]]:
    """``setup`` for one timed repeat: ``setup()`` does the untimed part and returns the thunk
    to time. ``forward`` runs under ``no_grad`` (inference); ``backward`` runs the forward in
    ``setup`` and times ``autograd.grad`` alone; ``fwd+bwd`` times both. Gradients are taken
    for every input (xs, weight, bias) and returned, not accumulated into ``.grad``.
    """
    fn, leaves = way.fn, inp.leaves
    if mode == "forward":
        def forward() -> object:
            with torch.no_grad():
                return fn(inp.xs, inp.weight, inp.bias)

        return lambda: forward
    if mode == "backward":
        def setup_backward() -> Callable[[], object]:
            y = fn(inp.xs, inp.weight, inp.bias)
            return lambda: torch.autograd.grad(y, leaves, inp.grad_out)

        return setup_backward
    if mode == "fwd+bwd":
        def fwd_bwd() -> object:
            y = fn(inp.xs, inp.weight, inp.bias)
            return torch.autograd.grad(y, leaves, inp.grad_out)

        return lambda: fwd_bwd
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
