"""Static proof of the Triton kernels without a GPU (issue 17, item 3).

Runs every Triton launcher (``fusionops.triton.*``: forward and backward of every op) on meta
tensors at the benchmark headline shapes (``benchmarks/ops/*.py``, ``HEADLINE["cuda"]``, plus
their fp32 twins), with a stand-in driver that reports a CUDA target (sm_90, and sm_80), so each
launch compiles, at exactly the block sizes and ``num_warps`` the launcher picks, instead of
running. The launcher's device-dependent choices are made as on an H100/H200 (132 SMs:
``_target_programs`` = 264; the MKL config as for ``device.type == "cuda"``).

Per compiled kernel it reads the cubin with triton's bundled ``cuobjdump``/``nvdisasm``:
registers, spill traffic (``STL``/``LDL`` in the SASS, the stack frame), shared memory, the
tensor-core instruction kind of its dots (``HGMMA`` = wgmma, ``HMMA`` = mma.sync, ``none``) and
the blocks per SM the registers, shared memory and warps allow. It writes a CSV (with triton's
version, the date and the commit) and fails (exit 1) on a compile error, a spill, shared memory
over the limit, or a bf16/fp16 dot without tensor-core instructions; issue 17's targets that
do not hold yet (wgmma for the headline tiles) are reported as ``target`` lines, not failures,
unless ``--strict-targets``.

    python tools/triton_static.py                    # full run, sm_90 and sm_80 -> CSV
    python tools/triton_static.py --subset ci --arch 90 --csv /tmp/x.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET"):
    # The interpreter replaces @triton.jit at import: compile needs the real JIT.
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable, *sys.argv])

# Triton 3.9 warns that its FP-fusion default changes in 3.10; keep what the GPU run uses (on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fusionops.triton import bilinear as t_bil  # noqa: E402
from fusionops.triton import low_rank_fusion as t_lmf  # noqa: E402
from fusionops.triton import multiple_kernel as t_mkl  # noqa: E402
from fusionops.triton import product_fusion as t_prod  # noqa: E402
from fusionops.triton import skew_pair as t_skew  # noqa: E402
from fusionops.triton import tensor_fusion as t_tf  # noqa: E402

META = torch.device("meta")
SMS = 132  # H100 SXM / H200
# Per SM: 64K 32-bit registers, 2048 threads, 32 blocks; shared memory per SM / per block.
SMEM = {90: (228 * 1024, 227 * 1024), 80: (164 * 1024, 163 * 1024)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- a stand-in driver: the JIT compiles for a CUDA target, nothing is launched ----------------


class _StandInDriver:
    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return META


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    constexprs: dict[str, object]
    num_warps: int
    compiled: object = None
    error: str = ""


@dataclass
class Recorder:
    launches: list[Launch] = field(default_factory=list)


@contextlib.contextmanager
def compiling_for(arch: int, recorder: Recorder) -> Iterator[None]:
    """Every ``kernel[grid](...)`` compiles for ``arch`` (warmup) and is recorded, not run."""
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = list(self.arg_names)
        constexprs = {
            n: (kwargs[n] if n in kwargs else args[i] if i < len(args) else None)
            for i, n in enumerate(names)
            if i in self.constexprs
        }
        grid_t = tuple(grid) if not callable(grid) else ()
        launch = Launch(self.fn.__name__, grid_t, constexprs, int(kwargs.get("num_warps", 4)))
        recorder.launches.append(launch)
        try:
            launch.compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a compile error is a result
            launch.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        return launch.compiled

    stand_in = _StandInDriver(arch)
    saved = (
        {m: m._target_programs for m in (t_tf, t_lmf, t_skew)},
        t_mkl._config,
    )
    previous = _driver._active
    _driver.set_active(stand_in)
    JITFunction.run = run
    for m in (t_tf, t_lmf, t_skew):  # the launchers fill 2 x 132 SMs, as on an H100/H200
        m._target_programs = lambda device: 2 * SMS
    t_mkl._config = lambda kind, na, nb, dtype, device, _c=saved[1]: _c(
        kind, na, nb, dtype, torch.device("cuda")
    )
    try:
        yield
    finally:
        JITFunction.run = original_run
        _driver._active = previous
        for m, f in saved[0].items():
            m._target_programs = f
        t_mkl._config = saved[1]
        # Each kernel caches its target per device: forget it before another arch.
        for mod in (t_tf, t_lmf, t_skew, t_prod, t_mkl, t_bil):
            for obj in vars(mod).values():
                if isinstance(obj, JITFunction):
                    obj.device_caches.clear()


# --- the headline cases, on meta tensors -------------------------------------------------------


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


def _cases() -> list[tuple[str, str, str, Callable[[], object]]]:
    """(op, case, dtype, call) for every headline case and its fp32 twin, forward + backward."""
    from benchmarks.ops import bilinear as b_bil
    from benchmarks.ops import low_rank_fusion as b_lmf
    from benchmarks.ops import multiple_kernel as b_mkl
    from benchmarks.ops import product_fusion as b_prod
    from benchmarks.ops import skew_pair as b_skew
    from benchmarks.ops import tensor_fusion as b_tf
    from fusionops.base_kernels import kernel_params

    out = []

    def twins(cases):
        seen = []
        for c in cases:
            for dt in (c.dtype, "fp32"):
                if (c.name, dt) not in seen:
                    seen.append((c.name, dt))
                    yield c, dt

    for c, dt in twins(b_tf.HEADLINE["cuda"]):
        dtype = DTYPES[dt]
        k = math.prod(d + 1 for d in c.dims)

        def tf_fwd(c=c, dtype=dtype, k=k):
            xs = [_t(c.n, d, dtype=dtype) for d in c.dims]
            return t_tf.projected_forward(xs, _t(c.out, k, dtype=dtype), _t(c.out, dtype=dtype), None)

        def tf_bwd(c=c, dtype=dtype, k=k):
            xs = [_t(c.n, d, dtype=dtype) for d in c.dims]
            return t_tf.projected_backward(
                _t(c.n, c.out, dtype=dtype), xs, _t(c.out, k, dtype=dtype), None, True, True, True
            )

        out += [
            ("tensor_fusion", c.name, dt, "forward", tf_fwd),
            ("tensor_fusion", c.name, dt, "backward", tf_bwd),
        ]

    for c, dt in twins(b_lmf.HEADLINE["cuda"]):
        dtype = DTYPES[dt]

        def lmf_args(c=c, dtype=dtype):
            xs = [_t(c.n, d, dtype=dtype) for d in c.dims]
            fs = [_t(c.rank, d + 1, c.out, dtype=dtype) for d in c.dims]
            return xs, fs, _t(c.rank, dtype=dtype)

        def lmf_fwd(c=c, dtype=dtype, a=lmf_args):
            xs, fs, w = a()
            return t_lmf.forward(xs, fs, w, _t(c.out, dtype=dtype), None)

        def lmf_bwd(c=c, dtype=dtype, a=lmf_args):
            xs, fs, w = a()
            return t_lmf.backward(_t(c.n, c.out, dtype=dtype), xs, fs, w, None, True, True, True, True)

        out += [
            ("low_rank_fusion", c.name, dt, "forward", lmf_fwd),
            ("low_rank_fusion", c.name, dt, "backward", lmf_bwd),
        ]

    for c, dt in twins(b_prod.HEADLINE["cuda"]):
        dtype = DTYPES[dt]

        def p_fwd(c=c, dtype=dtype):
            return t_prod.forward([_t(c.n, c.d, dtype=dtype) for _ in range(c.m)])

        def p_bwd(c=c, dtype=dtype):
            return t_prod.backward(_t(c.n, c.d, dtype=dtype), [_t(c.n, c.d, dtype=dtype) for _ in range(c.m)])

        out += [
            ("product_fusion", c.name, dt, "forward", p_fwd),
            ("product_fusion", c.name, dt, "backward", p_bwd),
        ]

    for c, dt in twins(b_skew.HEADLINE["cuda"]):
        dtype = DTYPES[dt]
        pairs_list = c.pairs() if hasattr(c, "pairs") and callable(c.pairs) else None
        if pairs_list is None:
            from fusionops.pairs import skew_pairs

            pairs_list = skew_pairs(c.la, c.lb, c.skew, c.density)
        p = len(pairs_list)

        def s_args(c=c, dtype=dtype, p=p, pl=pairs_list):
            ha, hb = _t(c.n, c.la, c.d, dtype=dtype), _t(c.n, c.lb, c.d, dtype=dtype)
            pairs = torch.tensor([list(x) for x in pl], dtype=torch.int64).to(META)
            ws = [_t(c.d, c.d, dtype=dtype) for _ in range(4)]
            bs = [_t(c.d, dtype=dtype) for _ in range(4)]
            return ha, hb, pairs, ws, bs

        def s_fwd(c=c, a=s_args):
            ha, hb, pairs, ws, bs = a()
            return t_skew.forward(ha, hb, pairs, *ws, *bs, c.heads, c.window)

        def s_bwd(c=c, dtype=dtype, p=p, a=s_args):
            ha, hb, pairs, ws, bs = a()
            return t_skew.backward(
                _t(c.n, p, c.d, dtype=dtype), ha, hb, pairs, *ws, *bs[:3], c.heads, c.window, [True] * 10
            )

        out += [
            ("skew_pair_attention", c.name, dt, "forward", s_fwd),
            ("skew_pair_attention", c.name, dt, "backward", s_bwd),
        ]

    for c in b_mkl.HEADLINE["cuda"]:
        dtype = DTYPES[c.dtype]

        def m_args(c=c, dtype=dtype):
            kernels = [b_mkl.BASE[k] for k in c.kernels] if hasattr(b_mkl, "BASE") else None
            if kernels is None:
                kernels = [_mkl_kernel(k) for k in c.kernels]
            xa = [_t(c.n, d, dtype=dtype) for d in c.dims]
            xb = [_t(c.n_b, d, dtype=dtype) for d in c.dims]
            params = kernel_params(kernels, c.dims, xa[0])
            return (
                xa,
                xb,
                _t(len(c.dims), dtype=dtype),
                [k.code for k in kernels],
                params,
                [k.degree for k in kernels],
            )

        def m_fwd(a=m_args):
            xa, xb, beta, kinds, params, degrees = a()
            return t_mkl.forward(xa, xb, beta, kinds, params, degrees)

        def m_bwd(c=c, dtype=dtype, a=m_args):
            xa, xb, beta, kinds, params, degrees = a()
            return t_mkl.backward(
                _t(c.n, c.n_b, dtype=dtype), xa, xb, beta, kinds, params, degrees, [True] * 4
            )

        out += [
            ("multiple_kernel", c.name, c.dtype, "forward", m_fwd),
            ("multiple_kernel", c.name, c.dtype, "backward", m_bwd),
        ]

    out += _bilinear_cases(b_bil, twins)
    return out


# MFH's order (its number of chained MFB blocks) at the static proof's headline: block.bootstrap's
# MFH, and Yu et al.'s best (p = 2).
MFH_ORDER = 2
# The dropout twins of MFB's and MFH's headline (case "<name>-dropout"): every site on (the
# pooling kernels' DROP_IN and DROP_PROD variants, the z site's _drop_kernel for MFB);
# (drop_in, drop_prod, drop_out, seed) as fusionops.triton.bilinear.forward takes them.
BILINEAR_DROPOUT = {"mfb": (0.1, 0.1, 0.1, 1234), "mfh": (0.1, 0.1, 0.0, 1234)}


def _bilinear_cases(b_bil, twins) -> list[tuple[str, str, str, str, Callable[[], object]]]:
    """MFB, MFH and BLOCK through ``fusionops.triton.bilinear`` with the benchmark's arguments
    (MFB: relu, normalised over the row, pooled index j·k + i; MFH: MFB's headline sizes in
    ``MFH_ORDER`` chained blocks, relu, each block normalised (the kernels' chain mode); BLOCK:
    no activation, rank-major, normalised per chunk). Its launcher takes meta tensors for an
    H100 (132 SMs: the GPU row tiles and pooling blocks of
    ``fusionops.triton.bilinear._gpu_config``), so nothing is patched for it."""
    from fusionops.ops import _bilinear

    out = []
    relu = _bilinear.ACTIVATION_CODES["relu"]
    none = _bilinear.ACTIVATION_CODES[None]
    # (op, case, x width, t width, chunks C, rank R, pooled width S per chunk, rank_major, act, norm,
    # chain). MFH's x and t are read whole by each of its C blocks (chain): C·d columns here.
    shapes = [
        ("mfb", c, c.dx, c.dt, 1, c.k, c.o, False, relu, _bilinear.NORM_WHOLE_ROW, False)
        for c in b_bil.MFB_HEADLINE["cuda"]
    ] + [
        ("mfh", c, MFH_ORDER * c.dx, MFH_ORDER * c.dt, MFH_ORDER, c.k, c.o, False, relu,
         _bilinear.NORM_PER_CHUNK, True)
        for c in b_bil.MFB_HEADLINE["cuda"]
    ] + [
        ("block_fusion", c, c.m, c.m, c.chunks, c.rank, c.m // c.chunks, True, none, _bilinear.NORM_PER_CHUNK,
         False)
        for c in b_bil.BLOCK_HEADLINE["cuda"]
    ]  # fmt: skip
    for op, c0, dx, dt_, nc, rank, s, major, act, norm, chain in shapes:
        for c, dt in twins([c0]):
            dtype = DTYPES[dt]

            def b_args(c=c, dtype=dtype, dx=dx, dt_=dt_, nc=nc, rank=rank, s=s, chain=chain):
                p = rank * s
                return (
                    _t(c.n, dx // nc if chain else dx, dtype=dtype),
                    _t(c.n, dt_ // nc if chain else dt_, dtype=dtype),
                    _t(nc, p, dx // nc, dtype=dtype),
                    _t(nc, p, dtype=dtype),
                    _t(nc, p, dt_ // nc, dtype=dtype),
                    _t(nc, p, dtype=dtype),
                    _t(c.out, nc * s, dtype=dtype),
                    _t(c.out, dtype=dtype),
                )

            variants = [(c.name, ())]
            if op in BILINEAR_DROPOUT:
                variants.append((f"{c.name}-dropout", BILINEAR_DROPOUT[op]))
            for name, drops in variants:

                def b_fwd(a=b_args, rank=rank, major=major, act=act, norm=norm, chain=chain, drops=drops):
                    return t_bil.forward(*a(), rank, major, act, norm, chain, *drops)

                def b_bwd(c=c, dtype=dtype, a=b_args, rank=rank, major=major, act=act, norm=norm, chain=chain,
                          drops=drops):  # fmt: skip
                    x, t, wx, bx, wt, bt, wo, _ = a()
                    grad = _t(c.n, c.out, dtype=dtype)
                    return t_bil.backward(
                        grad, x, t, wx, bx, wt, bt, wo, rank, major, act, norm, [True] * 8, chain, *drops
                    )

                out += [(op, name, dt, "forward", b_fwd), (op, name, dt, "backward", b_bwd)]
    return out


def _mkl_kernel(name: str):
    from fusionops.base_kernels import BaseKernel

    return {
        "rbf": BaseKernel("rbf"),
        "poly2": BaseKernel("polynomial", degree=2, offset=1.0),
        "linear": BaseKernel("linear"),
    }[name]


# --- reading the cubin -------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def cubin_facts(cubin: bytes) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True
        )
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    usage = res.stdout

    def grab(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab("REG"),
        "stack_bytes": grab("STACK"),
        "static_smem": grab("SHARED"),
        "local_bytes": grab("LOCAL"),
        "stl": len(re.findall(r"\bSTL(\.\w+)*\b", sass)),
        "ldl": len(re.findall(r"\bLDL(\.\w+)*\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "hmma": len(re.findall(r"\bHMMA\.", sass)),
        "ffma": len(re.findall(r"\bFFMA\b", sass)),
        "dfma": len(re.findall(r"\bDFMA\b", sass)),
    }


def dot_operands(ttir: str) -> set[str]:
    """Element types of the A operand of every tt.dot in the TTIR (e.g. {'bf16', 'f32'})."""
    kinds = set()
    for m in re.finditer(r"tt\.dot\b[^\n]*:\s*tensor<[^>]*?x(bf16|f16|f32|f64|f8\w*)>", ttir):
        kinds.add(m.group(1))
    return kinds


def blocks_per_sm(regs: int, warps: int, smem: int, arch: int) -> int:
    threads = 32 * warps
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = SMEM[arch][0] // smem if smem else 32
    return max(0, min(by_regs, by_smem, 2048 // threads, 32))


# --- the run -----------------------------------------------------------------------------------


def analyse(arch: int, subset: str, only: set[str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for op, case, dt, mode, call in _cases():
        if only and op not in only:
            continue
        if subset == "ci" and (dt == "fp32" or case not in CI_CASES):
            continue
        rec = Recorder()
        t0 = time.time()
        error = ""
        with compiling_for(arch, rec):
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                error = f"launcher: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        seen = set()
        for ln in rec.launches:
            key = (ln.kernel, tuple(sorted((k, str(v)) for k, v in ln.constexprs.items())), ln.num_warps)
            if key in seen:
                continue
            seen.add(key)
            blocks = {
                k: v
                for k, v in ln.constexprs.items()
                if k.startswith("BLOCK") or k in ("NMOD", "HEAD", "HEADS")
            }
            row: dict[str, object] = {
                "arch": f"sm_{arch}",
                "op": op,
                "case": case,
                "dtype": dt,
                "mode": mode,
                "kernel": ln.kernel,
                "blocks": " ".join(f"{k}={v}" for k, v in blocks.items()),
                "num_warps": ln.num_warps,
                "grid_ctas": math.prod(ln.grid) if ln.grid else "",
            }
            if ln.error or ln.compiled is None:
                row.update(status="FAIL", problems=f"compile error: {ln.error or 'nothing compiled'}")
                rows.append(row)
                continue
            k = ln.compiled
            facts = cubin_facts(k.asm["cubin"])
            smem = int(getattr(k.metadata, "shared", 0))
            num_stages = int(getattr(k.metadata, "num_stages", 0))
            dots = dot_operands(k.asm.get("ttir", ""))
            half = bool(dots & {"bf16", "f16"})
            tc = "HGMMA" if facts["hgmma"] else "HMMA" if facts["hmma"] else ("none" if dots else "")
            row.update(
                num_stages=num_stages,
                registers=facts["registers"],
                spill_stores=facts["stl"],
                spill_loads=facts["ldl"],
                stack_bytes=facts["stack_bytes"],
                smem_bytes=smem,
                dot_inputs="+".join(sorted(dots)),
                tensor_core=tc,
                blocks_per_sm=blocks_per_sm(int(facts["registers"]), ln.num_warps, smem, arch),
            )
            problems, targets = [], []
            if facts["stl"] or facts["ldl"] or facts["local_bytes"]:
                problems.append(
                    f"spills: {facts['stl']} STL / {facts['ldl']} LDL, stack {facts['stack_bytes']} B"
                )
            if smem > SMEM[arch][1]:
                problems.append(f"shared memory {smem} B > {SMEM[arch][1]} B")
            if half and not (facts["hgmma"] or facts["hmma"]):
                problems.append("bf16/fp16 dot without tensor-core instructions")
            if row["blocks_per_sm"] == 0:
                problems.append("0 blocks/SM")
            if arch == 90 and half and not facts["hgmma"]:
                targets.append("no wgmma (HGMMA) for a 16-bit dot on sm_90")
            row["status"] = "FAIL" if problems else "target" if targets else "ok"
            row["problems"] = "; ".join(problems + [f"[target] {t}" for t in targets])
            rows.append(row)
        if error:
            rows.append(
                {
                    "arch": f"sm_{arch}",
                    "op": op,
                    "case": case,
                    "dtype": dt,
                    "mode": mode,
                    "kernel": "-",
                    "status": "FAIL",
                    "problems": error,
                }
            )
        print(
            f"  sm_{arch} {op} {case} {dt} {mode}: {len(seen)} kernel(s) in {time.time() - t0:.1f} s",
            flush=True,
        )
    return rows


# The CI subset (about a minute): the 16-bit headline case of each op (the first where there are
# several), forward and backward, on the archs asked for.
CI_CASES = {"headline-gpu", "headline-gpu-m2", "headline-gpu-w0", "headline-gpu-mixed-bf16"}

COLUMNS = [
    "arch",
    "op",
    "case",
    "dtype",
    "mode",
    "kernel",
    "blocks",
    "num_warps",
    "num_stages",
    "grid_ctas",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack_bytes",
    "smem_bytes",
    "dot_inputs",
    "tensor_core",
    "blocks_per_sm",
    "status",
    "problems",
    "triton",
    "date",
    "commit",
]


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "fusionops/triton"], cwd=ROOT
        ).returncode
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch", type=int, action="append", choices=(80, 90), help="repeatable (default: 90 and 80)"
    )
    p.add_argument("--subset", choices=("full", "ci"), default="full")
    p.add_argument("--op", action="append", default=[], help="only these ops (repeatable)")
    p.add_argument(
        "--csv", default=None, help="default: benchmarks/results/triton_static_<triton>_<date>.csv"
    )
    p.add_argument("--strict-targets", action="store_true", help="issue 17's targets (wgmma) fail too")
    args = p.parse_args(argv)
    arches = args.arch or [90, 80]
    date = datetime.date.today().isoformat()
    path = args.csv or os.path.join(
        ROOT, "benchmarks", "results", f"triton_static_{triton.__version__}_{date}.csv"
    )
    meta = {"triton": triton.__version__, "date": date, "commit": _commit()}
    print(
        f"triton {triton.__version__}, torch {torch.__version__}, commit {meta['commit']}: compiling for "
        + ", ".join(f"sm_{a}" for a in arches),
        flush=True,
    )
    rows = []
    for arch in arches:
        rows += analyse(arch, args.subset, set(args.op))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    print(
        f"\n{'arch':6} {'op':20} {'dtype':5} {'mode':8} {'kernel':28} {'regs':>4} {'STL':>4} {'smem':>7} "
        f"{'tc':6} {'b/SM':>4} status"
    )
    for r in rows:
        print(
            f"{r['arch']:6} {r['op'][:20]:20} {r['dtype']:5} {r['mode']:8} {str(r['kernel'])[:28]:28} "
            f"{str(r.get('registers', '')):>4} {str(r.get('spill_stores', '')):>4} "
            f"{str(r.get('smem_bytes', '')):>7} "
            f"{str(r.get('tensor_core', '')):6} {str(r.get('blocks_per_sm', '')):>4} {r['status']}"
            + (f"  {r['problems']}" if r.get("problems") else "")
        )
    failed = [r for r in rows if r["status"] == "FAIL"]
    target = [r for r in rows if r["status"] == "target"]
    print(f"\n{len(rows)} kernel configurations: {len(failed)} FAIL, {len(target)} miss a target, CSV {path}")
    return 1 if failed or (args.strict_targets and target) else 0


if __name__ == "__main__":
    sys.exit(main())
