"""Peak extra memory of ONE forward+backward call, each measured in a fresh child process.

A fresh process per (op, case, way) keeps one measurement from inheriting another's allocator
state, compiled kernels or thread pools. The report starts ``python -m benchmarks.memory
--server`` processes (``--memory-jobs`` of them); each imports torch, ``torch._dynamo`` and
fusionops once, runs no torch op itself, and forks one child per measurement, which measures
and exits. A child thus starts as a new interpreter would after those imports, without
paying ~2-3 s for them. Children side by side do not disturb one another's numbers: each
reads its own counters. On CUDA each measurement gets a new interpreter instead
(``python -m benchmarks.memory --child JSON``; on CPU that gives the same numbers, within the
allocator noise, only slower): a child forked after anything touched the CUDA driver could
not use CUDA.

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

What it counts: every page the call touches above the baseline: what the way materialises
and autograd saves (tensor fusion's Z, LMF's projections), temporaries, the output and every
gradient. Gradients count because the call makes them; the report's ``out_mb`` column says how
much any implementation must allocate. Resolution is a page; allocator noise is about 1 MB.

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
import queue
import select
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.spec import CaseBase

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

    from benchmarks import ops, ways

    op = ops.get(spec["op"])
    case = op.case_type.from_dict(spec["case"])
    way = ways.way_by_name(op, spec["way"])
    if not way.serves("fwd+bwd"):  # the report never asks: a forward-only way has no fwd+bwd row
        raise ValueError(f"{way.name} serves only {', '.join(way.modes)}: no fwd+bwd to measure")
    device = spec["device"]
    inp = op.make_inputs(case, device, True)

    def call() -> object:
        y = way.fn(*inp.args)
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


def _job_spec(op: str, case: CaseBase, way: str, device: str) -> dict:
    return {"op": op, "case": case.to_dict(), "way": way, "device": device}


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _fork_one(spec: dict) -> dict:
    """Fork a child that measures ``spec`` and exits; its result as ``{"ok": Peak}`` or ``{"error"}``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, write the result, exit without running any cleanup
        os.close(r)
        os.dup2(2, 1)  # stdout is the server's reply channel; the child's prints go to stderr
        try:
            result = {"ok": asdict(_child(spec))}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"error": _first_line(exc)}
        data = json.dumps(result).encode()
        while data:
            data = data[os.write(w, data) :]
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        code = os.waitstatus_to_exitcode(status)
        return {"error": f"memory child died ({f'signal {-code}' if code < 0 else f'exit {code}'})"}
    return json.loads(b"".join(chunks))


def _serve() -> None:
    """``--server``: import once, then for each JSON job on stdin fork a fresh child to measure
    it, and answer one JSON line on stdout. The server itself never runs a torch op, so a
    child starts as a new process does after these imports: no threads pools, no CUDA
    context, no allocator state of an earlier call (each child measures one job only)."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401 - the first custom-op call imports it (~1 s)

    import fusionops  # noqa: F401
    from benchmarks import ops, ways  # noqa: F401

    for line in sys.stdin:
        print(json.dumps(_fork_one(json.loads(line))), flush=True)


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _tail(stderr: str) -> str:
    err = [ln for ln in stderr.strip().splitlines() if ln.strip()] or ["(no output)"]
    return next((ln for ln in reversed(err) if "Error" in ln), err[-1]).strip()


class _Exec:
    """One new interpreter per measurement (``python -m benchmarks.memory --child``).

    Used on CUDA: there a child forked from a process that has touched the CUDA driver
    (``torch.cuda.is_available()`` in some import) could not use CUDA, and start-up time
    matters less on a GPU machine.
    """

    alive = True

    def measure(self, spec: dict, timeout_s: float) -> Peak:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(spec)],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory child failed (exit {proc.returncode}): {_tail(proc.stderr)}")
        return Peak(**json.loads(lines[-1]))

    def close(self, kill: bool = False) -> None:
        pass


class _Server:
    """A ``python -m benchmarks.memory --server`` process, as seen from the report."""

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.memory", "--server"],
            cwd=REPO,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            start_new_session=True,  # its own process group, so a timeout can end it with its child
        )

    def measure(self, spec: dict, timeout_s: float) -> Peak:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        reply = self.proc.stdout.readline() if ready else ""
        if not reply:
            self.close(kill=True)
            why = f"timed out after {timeout_s:.0f} s" if not ready else f"exit {self.proc.returncode}"
            self.stderr.seek(0)
            raise RuntimeError(f"memory server failed ({why}): {_tail(self.stderr.read())}")
        result = json.loads(reply)
        if "error" in result:
            raise RuntimeError(f"memory child failed: {result['error']}")
        return Peak(**result["ok"])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, kill: bool = False) -> None:
        if kill and self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()


Job = tuple[str, CaseBase, str]  # (op, case, way)


def peak_extra_many(
    jobs: list[Job], device: str, workers: int, timeout_s: float = 900
) -> dict[Job, Peak | Exception]:
    """Peak extra memory of one fwd+bwd for each ``(op, case, way)``, each in a fresh child.

    ``workers`` measure side by side. That is only for speed: each child reads its own VmHWM
    (or its own CUDA caching allocator's counters), so one child's pages never count in
    another's peak. CPU: forked by ``--server`` processes; CUDA: one interpreter each.
    """
    make = _Exec if device.startswith("cuda") else _Server
    pool: queue.Queue[_Server | _Exec] = queue.Queue()

    def one(job: Job) -> Peak | Exception:
        server = pool.get()
        try:
            if not server.alive:
                server = make()
            return server.measure(_job_spec(*job, device), timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported per job, the others go on
            return exc
        finally:
            pool.put(server)

    n = max(1, min(workers, len(jobs)))
    for _ in range(n):
        pool.put(make())
    try:
        with ThreadPoolExecutor(max_workers=n) as threads:
            return dict(zip(jobs, threads.map(one, jobs), strict=True))
    finally:
        while not pool.empty():
            pool.get().close()


def peak_extra(op: str, case: CaseBase, way: str, device: str, timeout_s: float = 900) -> Peak:
    """Measure one fwd+bwd of ``way`` on ``case`` of ``op`` in a fresh child; raises on failure."""
    result = peak_extra_many([(op, case, way)], device, 1, timeout_s)[(op, case, way)]
    if isinstance(result, Exception):
        raise result
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--child", metavar="JSON", help="measure {op, case, way, device} in this process")
    mode.add_argument("--server", action="store_true", help="fork a child per JSON line on stdin")
    args = parser.parse_args()
    if args.server:
        _serve()
    else:
        print(json.dumps(asdict(_child(json.loads(args.child)))))


if __name__ == "__main__":
    main()
