"""The fixed cost of a fused call: public op vs raw kernel vs nn.Linear on Z vs reference.

    python -m benchmarks.fixed_cost [--op NAME ...] [--out DIR] [--rounds R]

At research batch sizes (and below) what a call costs before and after its kernels matters as
much as the kernels. Per op, a tiny case and a research-size case, fp32 on CPU, timed in one
run with the ways interleaved round by round (``benchmarks.timing``: torch.utils.benchmark's
``blocked_autorange``, median of the timed blocks, microseconds per call; the tables are
``torch.utils.benchmark.Compare``'s):

* ``public`` (the automatic choice) and ``public[cpu]`` (the C++ kernels forced, the
  ``fusionops.backend`` block entered once around each timed batch): the fusionops function,
  checks, backend choice and autograd included;
* ``raw kernel``: the compiled forward kernel called directly (``torch.ops.fusionops._*_fwd``,
  inputs not requiring grad): the floor a wrapper can reach, forward only;
* ``linear on Z`` (tensor fusion only): ``F.linear`` on a materialised Z, what the fused call
  replaces in a model that has Z already;
* ``reference``: ``fusionops.reference``.

Modes: ``forward`` (inputs require grad, the training forward: the graph is recorded),
``inference`` (under ``no_grad``) and ``fwd+bwd`` (``autograd.grad`` of a fixed upstream
gradient). Writes ``fixed_cost_cpu_<date>.csv`` (device, versions and commit in every row)
and prints the issue's targets as PASS/FAIL lines.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.benchmark import Compare, Measurement

import fusionops
from benchmarks import csvfile, env, timing
from fusionops.registry import OPS

MODES = ("forward", "inference", "fwd+bwd")


@dataclass
class Case:
    op: str
    name: str
    leaves: list[Tensor]  # what gradients are taken for
    public: Callable[[], Tensor]  # the fusionops function on the inputs
    reference: Callable[[], Tensor]
    raw: Callable[[], Tensor]  # the compiled forward kernel on detached inputs
    linear_on_z: Callable[[], Tensor] | None = None


def _rand(*shape: int, grad: bool = True) -> Tensor:
    return torch.randn(*shape).requires_grad_(grad)


def _tensor_fusion(name: str, n: int, dims: tuple[int, ...], o: int) -> Case:
    xs = [_rand(n, d) for d in dims]
    k = 1
    for d in dims:
        k *= d + 1
    w, b = _rand(o, k, grad=True) * 0.05, _rand(o)
    w = w.detach().requires_grad_()
    z = fusionops.reference.tensor_fusion([x.detach() for x in xs]).requires_grad_()
    det = [x.detach() for x in xs]
    wd, bd = w.detach(), b.detach()
    return Case(
        "tensor_fusion",
        name,
        [*xs, w, b],
        lambda: fusionops.tensor_fusion(xs, w, b),
        lambda: fusionops.reference.tensor_fusion(xs, w, b),
        lambda: torch.ops.fusionops._tf_projected_fwd.default(det, wd, bd, None),
        lambda: F.linear(z, w, b),
    )


def _low_rank(name: str, n: int, dims: tuple[int, ...], r: int, o: int) -> Case:
    xs = [_rand(n, d) for d in dims]
    fs = [(torch.randn(r, d + 1, o) * 0.3).requires_grad_() for d in dims]
    w, b = _rand(r), _rand(o)
    det, fd = [x.detach() for x in xs], [f.detach() for f in fs]
    return Case(
        "low_rank_fusion",
        name,
        [*xs, *fs, w, b],
        lambda: fusionops.low_rank_fusion(xs, fs, w, b),
        lambda: fusionops.reference.low_rank_fusion(xs, fs, w, b),
        lambda: torch.ops.fusionops._lmf_fwd.default(det, fd, w.detach(), b.detach(), None),
    )


def _product(name: str, n: int, d: int, m: int) -> Case:
    xs = [_rand(n, d) for _ in range(m)]
    det = [x.detach() for x in xs]
    return Case(
        "product_fusion",
        name,
        xs,
        lambda: fusionops.product_fusion(xs),
        lambda: fusionops.reference.product_fusion(xs),
        lambda: torch.ops.fusionops._product_fwd.default(det),
    )


def _skew(name: str, n: int, layers: int, d: int, pairs: list[tuple[int, int]]) -> Case:
    ha, hb = _rand(n, layers, d), _rand(n, layers, d)
    ws = [(torch.randn(d, d) / d**0.5).requires_grad_() for _ in range(4)]
    bs = [_rand(d) for _ in range(4)]
    index = torch.tensor(pairs)
    det = [t.detach() for t in (ha, hb)]
    wd, bd = [w.detach() for w in ws], [b.detach() for b in bs]
    return Case(
        "skew_pair_attention",
        name,
        [ha, hb, *ws, *bs],
        lambda: fusionops.skew_pair_attention(ha, hb, pairs, *ws, *bs, heads=2),
        lambda: fusionops.reference.skew_pair_attention(ha, hb, pairs, *ws, *bs, heads=2),
        lambda: torch.ops.fusionops._skew_pair_fwd.default(*det, index, *wd, *bd, 2, 0),
    )


def _mkl(name: str, n: int, dims: tuple[int, ...]) -> Case:
    xs = [_rand(n, d) for d in dims]
    beta = torch.rand(len(dims)).requires_grad_()
    kinds = ["rbf", "linear", "polynomial"][: len(dims)]
    det = [x.detach() for x in xs]
    params = torch.tensor([1.0 / dims[0], 0.0, 1.0][: len(dims)])
    codes = [1, 0, 2][: len(dims)]
    degrees = [0, 0, 3][: len(dims)]
    return Case(
        "multiple_kernel",
        name,
        [*xs, beta],
        lambda: fusionops.multiple_kernel(xs, None, beta, kinds),
        lambda: fusionops.reference.multiple_kernel(
            xs, xs, beta, fusionops.base_kernels.as_base_kernels("x", kinds)
        ),
        lambda: torch.ops.fusionops._mkl_fwd.default(det, det, beta.detach(), codes, params, degrees),
    )


def cases() -> list[Case]:
    torch.manual_seed(0)
    return [
        _tensor_fusion("tiny N=8 dims(4,4) O=8", 8, (4, 4), 8),
        _tensor_fusion("MultiBench N=32 dims(4,19,79) O=64", 32, (4, 19, 79), 64),
        _low_rank("tiny N=8 dims(4,4) R=4 O=8", 8, (4, 4), 4, 8),
        _low_rank("MultiBench N=32 dims(4,19,79) R=4 O=64", 32, (4, 19, 79), 4, 64),
        _product("tiny N=8 d=8 M=3", 8, 8, 3),
        _product("research N=64 d=128 M=2", 64, 128, 2),
        _product("research N=64 d=128 M=3", 64, 128, 3),
        _skew("tiny N=8 L=4 D=16 P=2", 8, 4, 16, [(1, 0), (2, 1)]),
        _skew("research N=32 L=12 D=64 P=5", 32, 12, 64, [(7 + i, i) for i in range(5)]),
        _mkl("tiny N=8 dims(4,4)", 8, (4, 4)),
        _mkl("research N=128 dims(16,8,32)", 128, (16, 8, 32)),
    ]


def _ways(case: Case) -> dict[str, tuple[Callable[[], Tensor], str | None]]:
    """Way name -> (function, the backend forced around its timing: the block is entered once
    around each timed batch, so its own cost is not counted per call)."""
    ways = {
        "public": (case.public, None),
        "public[cpu]": (case.public, "cpu"),
        "raw kernel": (case.raw, None),  # timed under no_grad in every mode: the floor
    }
    if case.linear_on_z is not None:
        ways["linear on Z"] = (case.linear_on_z, None)
    ways["reference"] = (case.reference, None)
    return ways


def _step(fn: Callable[[], Tensor], mode: str, leaves: list[Tensor], grad: Tensor) -> Callable[[], object]:
    if mode == "inference":

        def inference() -> object:
            with torch.no_grad():
                return fn()

        return inference
    if mode == "forward":
        return fn
    live = [t for t in leaves if t.requires_grad]

    def fwd_bwd() -> object:
        return torch.autograd.grad(fn(), live, grad, allow_unused=True)

    return fwd_bwd


def measure(case: Case, rounds: int, budget_s: float) -> dict[tuple[str, str], Measurement]:
    """Per mode, every way timed side by side (``benchmarks.timing``: ``rounds`` interleaved
    rounds of about ``budget_s`` each), by (way, mode)."""
    grad = torch.randn_like(case.reference().detach())
    out: dict[tuple[str, str], Measurement] = {}
    for mode in MODES:
        steps: dict[str, timing.Setup] = {}
        contexts = {}
        for name, (fn, backend) in _ways(case).items():
            way_mode = "inference" if name == "raw kernel" else mode
            steps[name] = functools.partial(_step, fn, way_mode, case.leaves, grad)
            contexts[name] = functools.partial(fusionops.backend, backend)
        timed = timing.measure(
            steps,
            seconds=rounds * budget_s,
            rounds=rounds,
            label=f"{case.op}: {case.name}",
            sub_label=mode,
            contexts=contexts,
        )
        for name, m in timed.items():
            if isinstance(m, Exception):
                raise RuntimeError(f"{case.op} {case.name} {name} {mode}: {m}") from m
            out[(name, mode)] = m
    return out


def goal_lines(results: dict[tuple[str, str], dict[tuple[str, str], float]]) -> list[str]:
    """The issue's targets (tensor fusion), from one run's medians."""
    lines = []
    tiny = results.get(("tensor_fusion", "tiny N=8 dims(4,4) O=8"))
    research = results.get(("tensor_fusion", "MultiBench N=32 dims(4,19,79) O=64"))

    def line(ok: bool, text: str) -> str:
        return f"{'PASS' if ok else 'FAIL'}  {text}"

    if tiny:
        r = tiny[("public[cpu]", "fwd+bwd")] / tiny[("linear on Z", "fwd+bwd")]
        lines.append(
            line(r <= 1.5, f"tensor_fusion tiny fwd+bwd, cpu: {r:.2f}x nn.Linear on Z (goal <= 1.5x)")
        )
        for mode in ("inference", "forward"):
            r = tiny[("public[cpu]", mode)] / tiny[("raw kernel", mode)]
            lines.append(
                line(r <= 2.0, f"tensor_fusion tiny {mode}, cpu: {r:.2f}x the raw kernel (goal <= 2x)")
            )
    if research:
        for mode in MODES:
            r = research[("public", mode)] / research[("reference", mode)]
            lines.append(
                line(
                    r <= 1.0,
                    f"tensor_fusion MultiBench {mode}, automatic: {r:.2f}x the reference (goal <= 1x)",
                )
            )
    # Item 4: the automatic choice never loses to the reference, at any size of any op.
    for (op, case), ways in results.items():
        for mode in MODES:
            if ("public", mode) in ways and ("reference", mode) in ways:
                r = ways[("public", mode)] / ways[("reference", mode)]
                lines.append(
                    line(r <= 1.0, f"{op} {case} {mode}, automatic: {r:.2f}x the reference (goal <= 1x)")
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fixed_cost", description=__doc__.splitlines()[0])
    p.add_argument("--op", action="append", metavar="NAME", help=f"ops (default: all of {', '.join(OPS)})")
    p.add_argument("--out", type=Path, default=csvfile.RESULTS)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per mode")
    p.add_argument("--budget", type=float, default=0.05, help="seconds per (way, mode) per round")
    args = p.parse_args(argv)
    wanted = set(args.op or OPS)
    if unknown := wanted - set(OPS):
        p.error(f"--op: unknown {sorted(unknown)}; expected some of {list(OPS)}")
    info = env.describe("cpu")
    rows, results, measured = [], {}, []
    for case in cases():
        if case.op not in wanted:
            continue
        timed = measure(case, args.rounds, args.budget)
        measured += timed.values()
        res = {key: m.median * 1e6 for key, m in timed.items()}  # µs per call
        results[(case.op, case.name)] = res
        for way, mode in res:
            rows.append(
                {
                    **info,
                    "op": case.op,
                    "case": case.name,
                    "mode": mode,
                    "way": way,
                    "us_per_call": round(res[(way, mode)], 2),
                    "vs_reference": round(res[(way, mode)] / res[("reference", mode)], 3),
                }
            )
    # One table per case: modes down, ways across (medians of the interleaved rounds).
    Compare(measured).print()
    path = csvfile.result_path(args.out, "fixed_cost", "cpu", "")
    csvfile.write_csv(rows, path)
    print(f"\nCSV: {path}")
    for line in goal_lines(results):
        print(line)


if __name__ == "__main__":
    main()
