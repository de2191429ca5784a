"""A training step of the bilinear layers with dropout: fused (hashed masks inside the kernels)
against the materialising reference (``F.dropout``, as block.bootstrap), CPU, fp32.

    python -m benchmarks.bilinear_dropout [--out DIR] [--seconds S] [--rounds R]

The layers in train mode at the issue-20 headline shapes (N = 512, both modalities 512-d,
output 256; MFB k = 5 with o = 256, MFH two such blocks, BLOCK 15 chunks rank 15 with
m = 480) with block.bootstrap's VQA-style dropouts (0.1 on the inputs, 0.1 inside the op). Ways:

* ``fused``: the layer as it is (in training its op runs the fused kernels, dropouts included);
* ``reference``: the same layer's parameters through ``fusionops.reference`` with ``F.dropout``
  (``training=True``, no seed), what the layers ran in training before the dropouts were fused.

Mode ``fwd+bwd`` (``autograd.grad`` of a fixed upstream gradient w.r.t. the inputs and every
parameter), timed interleaved by ``benchmarks.timing``; writes ``bilinear_dropout_cpu_<date>.csv``
with the device, versions and commit in every row.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusionops
from benchmarks import csvfile, env, timing
from fusionops import reference

N, D, OUT = 512, 512, 256
P_IN, P_INNER = 0.1, 0.1


def _mfb() -> tuple[nn.Module, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    m = fusionops.MFB([D, D], OUT, mm_dim=256, factor=5, dropout_input=P_IN, dropout_pre_norm=P_INNER)

    def ref(m, x, t):
        z = reference.mfb(
            x, t, m.linear0.weight, m.linear0.bias, m.linear1.weight, m.linear1.bias, m.linear_out.weight,
            m.linear_out.bias, 5, "relu", False, dropout_input=P_IN, dropout_pre_norm=P_INNER, training=True,
        )  # fmt: skip
        return F.relu(z)

    return m, ref


def _mfh() -> tuple[nn.Module, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    m = fusionops.MFH([D, D], OUT, mm_dim=256, factor=5, dropout_input=P_IN, dropout_pre_lin=P_INNER)

    def ref(m, x, t):
        ws = [[getattr(m, f"linear{s}_{i}") for i in range(m.order)] for s in (0, 1)]
        z = reference.mfh(
            x, t, [l.weight for l in ws[0]], [l.bias for l in ws[0]], [l.weight for l in ws[1]],
            [l.bias for l in ws[1]], m.linear_out.weight, m.linear_out.bias, 5, "relu", False,
            dropout_input=P_IN, dropout_pre_lin=P_INNER, training=True,
        )  # fmt: skip
        return F.relu(z)

    return m, ref


def _block() -> tuple[nn.Module, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    m = fusionops.Block(
        [D, D], OUT, mm_dim=480, chunks=15, rank=15, dropout_input=P_IN, dropout_pre_lin=P_INNER
    )

    def ref(m, x, t):
        x0 = F.dropout(m.linear0(x), P_IN, training=True)
        x1 = F.dropout(m.linear1(t), P_IN, training=True)
        return reference.block_fusion(
            x0, x1, *m._merge(), m.linear_out.weight, m.linear_out.bias, 15, "before_cat",
            dropout_pre_lin=P_INNER, training=True,
        )  # fmt: skip

    return m, ref


LAYERS = {"MFB": _mfb, "MFH": _mfh, "Block": _block}


def _step(m: nn.Module, f: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, g: Tensor):
    leaves = [x, t, *m.parameters()]
    return lambda: torch.autograd.grad(f(x, t), leaves, g)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=csvfile.RESULTS)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per way")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    info = env.describe("cpu")
    print(f"bilinear layers, a training step with dropout, on {info['device_name']}")
    rows = []
    for name, make in LAYERS.items():
        torch.manual_seed(0)
        m, ref = make()
        m.train()
        x = torch.randn(N, D, requires_grad=True)
        t = torch.randn(N, D, requires_grad=True)
        g = torch.randn(N, OUT)
        inputs = (x, t, g)
        ways = {
            "fused": lambda m=m, i=inputs: _step(m, lambda a, b: m([a, b]), *i),
            "reference": lambda m=m, ref=ref, i=inputs: _step(m, lambda a, b: ref(m, a, b), *i),
        }
        got = timing.measure(ways, seconds=args.seconds, rounds=args.rounds, label=name)
        ms = {}
        for way, res in got.items():
            if isinstance(res, Exception):
                raise res
            ms[way] = res.median * 1e3
            rows.append({"layer": name, "way": way, "mode": "fwd+bwd", "n": N, "median_ms": round(ms[way], 3),
                         "iqr_ms": round(res.iqr * 1e3, 3), **info})  # fmt: skip
        print(f"  {name:5s} fused {ms['fused']:8.2f} ms  reference {ms['reference']:8.2f} ms  "
              f"speed-up {ms['reference'] / ms['fused']:.2f}x")  # fmt: skip
    path = csvfile.result_path(args.out, "bilinear_dropout", "cpu", "")
    csvfile.write_csv(rows, path)
    print(f"CSV: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
