"""What one op's benchmark definition provides (:class:`OpSpec`), and the pieces all ops share.

Each op is described once, in ``benchmarks/ops/<op>.py``: its ``Case`` type (a frozen
dataclass using :class:`CaseBase`), how to draw its inputs, its baselines, its FLOPs or bytes
moved, its grids, headline cases and goals. Everything else (timing, the memory children, the
report, CSV, plots, the crossover sweep, the pytest-benchmark suites) works from an
:class:`OpSpec` and knows nothing about any one op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

MODES = ("forward", "backward", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

Fn = Callable[..., Tensor]  # every way is called as fn(*inputs.args)
Row = dict[str, object]


def per_mode(forward: int) -> dict[str, int]:
    """Forward, backward (twice the forward: two GEMMs per forward GEMM) and their sum."""
    return {"forward": forward, "backward": 2 * forward, "fwd+bwd": 3 * forward}


def mb(nbytes: float) -> float:
    return round(nbytes / 1e6, 3)


class CaseBase:
    """Shared behaviour of every op's ``Case`` (a frozen dataclass with at least ``name``,
    ``n`` (rows) and ``dtype`` (a key of :data:`DTYPES`, so a case is printable and JSON-friendly)).
    """

    name: str
    n: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    def flops(self, mode: str) -> int | None:
        """Model FLOPs of ``mode`` (None: the op is memory-bound, see :meth:`bytes_moved`)."""
        return None

    def bytes_moved(self, mode: str) -> int | None:
        """Bytes an ideal kernel reads and writes in ``mode`` (None: not a memory-bound op)."""
        return None

    @property
    def sweep(self) -> str:
        """Cases differing only in N share a sweep (a line in the plots)."""
        raise NotImplementedError

    def columns(self) -> dict[str, object]:
        """The op's problem columns of a CSV row (after ``op``, ``case``, ``sweep``, ``n``)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the report's progress output."""
        raise NotImplementedError

    @property
    def crossover_elements(self) -> int:
        """The size the op's automatic CPU choice compares with its registry thresholds."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CaseBase:
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass
class Inputs:
    args: tuple[object, ...]  # the positional arguments of every way
    leaves: list[Tensor]  # what gradients are taken for (every floating input)
    grad_out: Tensor  # dL/dy for the backward modes


class Draw:
    """Random tensors from one seeded generator: drawn in float32, cast to the case's dtype."""

    def __init__(self, device: str, dtype: torch.dtype, requires_grad: bool, seed: int = 0) -> None:
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device, self.dtype, self.requires_grad = device, dtype, requires_grad

    def _cast(self, t: Tensor, leaf: bool) -> Tensor:
        t = t.to(self.dtype)
        return t.requires_grad_(self.requires_grad) if leaf else t

    def normal(self, *shape: int, std: float = 1.0, leaf: bool = True) -> Tensor:
        t = torch.empty(shape, device=self.device, dtype=torch.float32)
        return self._cast(t.normal_(0.0, std, generator=self.gen), leaf)

    def uniform(self, *shape: int, bound: float, leaf: bool = True) -> Tensor:
        t = torch.empty(shape, device=self.device, dtype=torch.float32)
        return self._cast(t.uniform_(-bound, bound, generator=self.gen), leaf)


@dataclass(frozen=True)
class Baseline:
    """An unfused way to compute the op, timed beside the fused ones.

    ``modes`` are the modes it serves: a forward-only way (e.g. scikit-learn on numpy arrays,
    no autograd) gets ``("forward",)`` and is then timed, parametrized and tabled in forward
    only; it has no fwd+bwd row, so no memory child and no ``mem_vs_<column>`` column.
    ``unavailable(device, dtype)`` says why it cannot run there (empty: it can), e.g. a CPU-only
    library on CUDA or a package that is not installed; the way is then skipped with that reason.
    """

    name: str  # the way's name, e.g. "reference"
    column: str  # CSV ratio columns speedup_vs_<column>, mem_vs_<column>
    make: Callable[[], Fn]  # called when first needed (torch.compile is lazy and per process)
    compiled: bool = False  # uses torch.compile (skipped under TORCH_COMPILE_DISABLE=1)
    modes: tuple[str, ...] = MODES  # the modes it serves, a subset of MODES
    unavailable: Callable[[str, str], list[str]] | None = None  # (device, dtype) -> reasons

    def __post_init__(self) -> None:
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(
                f"baseline {self.name}: modes {self.modes!r} must be a non-empty subset of {MODES}"
            )

    def serves(self, mode: str) -> bool:
        return mode in self.modes

    def reasons(self, device: str, dtype: str) -> list[str]:
        """Why this baseline cannot run on ``device``/``dtype`` (empty: it can)."""
        return list(self.unavailable(device, dtype)) if self.unavailable else []


Goals = Callable[[list[Row], str, Mapping[str, str]], list[str]]


@dataclass(frozen=True, eq=False)  # hashed by identity: one spec object per op
class OpSpec:
    name: str  # "low_rank_fusion": CSV and file names, --op
    title: str  # "low-rank fusion": headings and plot titles
    case_type: type[CaseBase]
    fused: Fn  # the public fusionops function, called inside fusionops.backend(name)
    baselines: tuple[Baseline, ...]  # the first is "the reference" of the ratios and plots
    make_inputs: Callable[[Any, str, bool], Inputs]  # (case, device, requires_grad)
    probe_case: Callable[[str], CaseBase]  # a tiny case of a dtype, for the probe call
    grids: Mapping[str, Mapping[str, Sequence[CaseBase]]]  # device -> "quick"/"default" -> cases
    headline: Mapping[str, Sequence[CaseBase]]  # device -> the goal's cases
    pytest_cases: Sequence[CaseBase]  # small shapes for the pytest-benchmark suite
    goals: Goals  # summary lines (PASS/FAIL) from a run's rows
    crossover_cases: Sequence[CaseBase] = ()  # CPU fp32, small to medium
    crossover_metric: str = "N"  # what crossover_elements counts, e.g. "N*K"
    # (table header, row key, plot label) of what the reference materialises, if it is worth a column
    table_column: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        # The reference is the denominator of every ratio and plot: it must serve every mode.
        if not self.baselines or set(self.baselines[0].modes) != set(MODES):
            raise ValueError(f"{self.name}: the first baseline (the reference) must serve every mode {MODES}")

    @property
    def reference(self) -> str:
        return self.baselines[0].name

    def reasons(self, backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Why ``backend`` cannot serve this op on ``device``/``dtype``: the op registry's answer."""
        import fusionops.ops  # noqa: F401  (registers every op)
        from fusionops._backend import reasons
        from fusionops.registry import get

        return reasons(get(self.name), backend, device, dtype)

    @property
    def cpu_min_size(self) -> int:
        """The op's automatic CPU threshold (on ``crossover_metric``), from the registry."""
        from fusionops.registry import get

        return get(self.name).cpu_min_size

    def baseline(self, name: str) -> Baseline | None:
        return next((b for b in self.baselines if b.name == name), None)

    def all_cases(self, device: str) -> list[CaseBase]:
        seen: dict[str, CaseBase] = {}
        for grid in self.grids[device].values():
            seen.update((c.name, c) for c in grid)
        seen.update((c.name, c) for c in self.headline[device])
        return list(seen.values())
