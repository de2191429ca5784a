"""Peak extra memory of ONE forward+backward call, each measured in a fresh child process.

A fresh process per (case, way) keeps one measurement from inheriting another's allocator
state, compiled kernels or thread pools. The parent runs ``python -m benchmarks.memory
--child SPEC`` and reads one JSON line back.

CPU (Linux), in the child:

1. build the inputs (``requires_grad``) and run one fwd+bwd as a warm-up, discarded: the
   first call pays one-off costs (torch.compile, OpenMP threads, BLAS/oneDNN buffers, lazy
   init) that are not the op's memory;
2. ``gc.collect()`` and glibc ``malloc_trim(0)``: freed heap pages go back to the OS, so the
   measured call cannot silently reuse pages the warm-up left resident (that would hide part
   of its peak);
3. reset the resident-set high-water mark by writing ``5`` to ``/proc/self/clear_refs``
   (Linux >= 4.0: VmHWM := current RSS). A high-water mark never goes down on its own, so
   without the reset it would still hold the warm-up's peak, and a baseline read after the
   warm-up would sit under a mark the measured call may never pass;
4. baseline = VmRSS (``/proc/self/statm``), run the measured fwd+bwd, keep its results,
   read VmHWM (``/proc/self/status``): extra = VmHWM - baseline.

Why VmHWM and not ``ru_maxrss``: on Linux ``ru_maxrss`` is max(VmHWM, the peak carried over
from before ``exec``), and a child started by fork/vfork + exec carries the *parent's* peak
RSS. After the report process has grown (a compiled model, a big case), every child's
``ru_maxrss`` would read the parent's size: we saw +204 MB charged to a 0.2 MB case. VmHWM
belongs to the child's own address space and is what ``clear_refs`` resets.

If ``clear_refs`` cannot be written, the child skips the warm-up and reports
VmHWM - baseline for the first call (method ``hwm-first-call``): an upper bound that
includes first-call overhead (about 45 MB of library pages for the reference here).

What it counts: every page the call touches above the baseline: Z and whatever autograd
saves, temporaries, the output y and the gradients (dx_m, dW of O×K, db). Gradients count
because the call makes them; the report's ``out_mb`` column says how much any
implementation must allocate. Resolution is a page; allocator noise is about 1 MB.

CUDA: after the warm-up, ``synchronize``, ``empty_cache``, ``reset_peak_memory_stats``;
extra = ``max_memory_allocated()`` after the call minus ``memory_allocated()`` before it.
Exact for everything allocated through PyTorch's caching allocator (Triton kernels' outputs
included); the CUDA context and cuBLAS workspace, made during the warm-up, are not counted.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Peak:
    extra_bytes: int  # peak during the call minus the baseline before it
    baseline_bytes: int  # RSS (CPU) or allocated bytes (CUDA) before the call
    method: str


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _hwm_bytes() -> int:
    """VmHWM of this process (the peak RSS since start or since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, the count may be low
        pass


def _child(spec: dict) -> Peak:
    import torch

    from benchmarks import cases

    case = cases.Case(**{**spec["case"], "dims": tuple(spec["case"]["dims"])})
    way = cases.way_by_name(spec["way"])
    device = spec["device"]
    inp = cases.make_inputs(case, device, requires_grad=True)

    def call() -> object:
        y = way.fn(inp.xs, inp.weight, inp.bias)
        return y, torch.autograd.grad(y, inp.leaves, inp.grad_out)

    if device.startswith("cuda"):
        call()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        kept = call()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        del kept
        return Peak(extra, before, "cuda-max_memory_allocated")

    if _reset_high_water_mark():
        call()
        method = "rss-hwm-reset-after-warmup"
    else:
        method = "hwm-first-call"
    gc.collect()
    _malloc_trim()
    _reset_high_water_mark()
    before = _rss_bytes()
    kept = call()
    peak = _hwm_bytes()
    del kept
    return Peak(max(peak - before, 0), before, method)


def peak_extra(case: object, way: str, device: str, timeout_s: float = 900) -> Peak:
    """Measure one fwd+bwd of ``way`` on ``case`` in a fresh child; raises on failure."""
    spec = {"case": asdict(case), "way": way, "device": device}  # type: ignore[call-overload]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines() or ["(no output)"]
        tail = next((ln for ln in reversed(err) if "Error" in ln), err[-1]).strip()
        raise RuntimeError(f"memory child failed (exit {proc.returncode}): {tail}")
    return Peak(**json.loads(lines[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", required=True, help="JSON: {case, way, device}")
    args = parser.parse_args()
    print(json.dumps(asdict(_child(json.loads(args.child)))))


if __name__ == "__main__":
    main()
