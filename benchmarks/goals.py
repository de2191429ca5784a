"""The issue's headline goals, checked on the rows of a report run.

CPU (fp32, N=512, dims (40,40,40), O=64, fwd+bwd): the fused path's extra peak memory is at
most 1/4 of the bytes of Z, and its median time is no worse than materialise-then-Linear,
both measured in the same run.
GPU (bf16, N=4096, dims (32,32,128), O=128, fwd+bwd): Triton is >= 3x faster and uses
>= 10x less peak memory than materialise-then-Linear.
"""

from __future__ import annotations

from benchmarks.cases import HEADLINE, REFERENCE

Row = dict[str, object]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _find(rows: list[Row], case: str, way: str) -> Row | None:
    return next((r for r in rows if r["case"] == case and r["way"] == way
                 and r["mode"] == "fwd+bwd" and not r["error"]), None)


def check(rows: list[Row], device: str, skipped: dict[str, str]) -> list[str]:
    """Summary lines for the headline goal of ``device``; empty if its case did not run."""
    case = HEADLINE["cuda" if device.startswith("cuda") else "cpu"]
    if not any(r["case"] == case.name for r in rows):
        return [f"headline goal: case {case.name} not run (python -m benchmarks.report "
                "--case headline)"]
    ref = _find(rows, case.name, REFERENCE)
    if ref is None:
        return [f"headline goal ({case.name}): reference fwd+bwd did not run; no verdict"]
    wanted = ["fused[triton]"] if case.name == "headline-gpu" else ["fused[cpu]"]
    fused = next((r for w in wanted if (r := _find(rows, case.name, w))), None)
    if fused is None:
        why = "; ".join(f"{w}: {skipped.get(w, 'failed or not run')}" for w in wanted)
        return [f"headline goal ({case.name}): FAIL: no fused way ran ({why})"]

    t_f, t_r = float(fused["median_ms"]), float(ref["median_ms"])  # type: ignore[arg-type]
    name = fused["way"]
    if fused["peak_extra_mb"] == "" or ref["peak_extra_mb"] == "":
        mem_line = "memory: not measured (run without --no-memory)"
    elif case.name == "headline-cpu":
        m_f, z = float(fused["peak_extra_mb"]), case.z_bytes / 1e6  # type: ignore[arg-type]
        mem_line = (f"memory {_verdict(m_f <= z / 4)}: {name} peak extra {m_f:.1f} MB "
                    f"<= Z/4 = {z / 4:.1f} MB (Z = {z:.1f} MB; reference "
                    f"{float(ref['peak_extra_mb']):.1f} MB)")  # type: ignore[arg-type]
    else:
        m_f, m_r = float(fused["peak_extra_mb"]), float(ref["peak_extra_mb"])  # type: ignore[arg-type]
        ratio = m_r / max(m_f, 1e-9)
        mem_line = (f"memory {_verdict(ratio >= 10)}: reference/{name} peak = "
                    f"{m_r:.1f}/{m_f:.1f} MB = {ratio:.1f}x >= 10x")
    if case.name == "headline-cpu":
        time_line = (f"time {_verdict(t_f <= t_r)}: {name} {t_f:.1f} ms <= reference "
                     f"{t_r:.1f} ms (speed-up {t_r / t_f:.2f}x)")
    else:
        time_line = (f"time {_verdict(t_r / t_f >= 3)}: speed-up {t_r / t_f:.2f}x >= 3x "
                     f"({name} {t_f:.2f} ms, reference {t_r:.2f} ms)")
    return [f"headline goal ({case.name}, fwd+bwd):", "  " + mem_line, "  " + time_line]
