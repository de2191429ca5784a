"""The top-level README's performance tables, generated from the committed benchmark CSVs.

Each table sits in README.md between ``<!-- generated: NAME ... -->`` and
``<!-- end generated: NAME -->`` (the convention of ``experiments/readme_tables.py``) and is
written here from ``benchmarks/results/*.csv``, so the README cannot drift from the runs it
quotes. ``python -m benchmarks.readme_tables`` rewrites the blocks; ``--check`` exits with 1
naming the stale ones (``tests/test_benchmarks_readme_tables.py`` runs it). The prose around a
table quotes its numbers by hand: regenerate, then reread it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) .*?-->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)", re.S
)
FUSED = "fused[cpu]"

Row = dict[str, str]
Get = Callable[[str, str], Row]  # (way, mode) -> the CSV row of one case


@functools.cache
def _csv(name: str) -> dict[tuple[str, str, str], Row]:
    with open(RESULTS / name, newline="") as f:
        return {(r["case"], r["way"], r["mode"]): r for r in csv.DictReader(f)}


def _case(name: str, case: str) -> Get:
    rows = _csv(name)

    def get(way: str, mode: str) -> Row:
        try:
            return rows[(case, way, mode)]
        except KeyError:
            raise KeyError(f"{name}: no row for case {case!r}, way {way!r}, mode {mode!r}") from None

    return get


def _x(row: Row, baseline: str) -> str:
    return f"{float(row[f'speedup_vs_{baseline}']):.2f}×"


def _ms(row: Row) -> str:
    return f"{float(row['median_ms']):.1f} ms"


def _peaks(get: Get, ways: list[str]) -> str:
    return " / ".join(f"{float(get(w, 'fwd+bwd')['peak_extra_mb']):.1f}" for w in ways) + " MB"


def _dims(row: Row) -> str:
    return "(" + ", ".join(row["dims"].split("x")) + ")"


def _table(header: list[str], cells: Callable[[Get], list[str]], cases: list[tuple[str, str, str]]) -> str:
    """``cases``: (CSV file, case, label suffix); ``cells(get)`` gives a row after its label."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, case, suffix in cases:
        get = _case(name, case)
        label, *rest = cells(get)
        lines.append("| " + " | ".join([label + suffix, *rest]) + " |")
    return "\n".join(lines) + "\n"


def tensor_fusion() -> str:
    def cells(get: Get) -> list[str]:
        fwd, both = get(FUSED, "forward"), get(FUSED, "fwd+bwd")
        return [
            f"{both['n']}, {_dims(both)}, {both['out']}",
            f"{float(both['z_mb']):.1f} MB",
            f"{_ms(fwd)} ({_x(fwd, 'reference')})",
            _ms(both),
            _x(both, "reference"),
            _x(both, "compile"),
            _peaks(get, [FUSED, "reference", "compile(reference)"]),
        ]

    name = "tensor_fusion_cpu_2026-11-23_full.csv"
    cases = ["tri16-n128", "tri16-n512", "tri16-n2048", "bi64x128-n512", "headline-cpu"]
    header = [
        "case (N, dims, O)",
        "Z",
        "fused forward (speed-up vs materialise+Linear)",
        "fused fwd+bwd",
        "fwd+bwd vs materialise+Linear",
        "fwd+bwd vs `torch.compile` of it",
        "peak: fused / materialise / compiled",
    ]
    return _table(header, cells, [(name, c, " (issue goal)" if c == "headline-cpu" else "") for c in cases])


def low_rank_fusion() -> str:
    def cells(get: Get) -> list[str]:
        both = get(FUSED, "fwd+bwd")
        return [
            f"{both['n']}, {_dims(both)}, {both['rank']}, {both['out']}",
            _ms(both),
            *(_x(both, b) for b in ("multibench", "reference", "compile")),
            _peaks(get, [FUSED, "multibench", "reference", "compile(reference)"]),
        ]

    full = "low_rank_fusion_cpu_2026-11-23_full.csv"
    cases = [
        ("low_rank_fusion_cpu_2026-11-23_headline.csv", "headline-cpu", " (issue goal)"),
        (full, "mb-n1024", ""),
        (full, "lmf32-n4096", ""),
    ]
    header = [
        "case (N, dims, R, O)",
        "fused fwd+bwd",
        "vs MultiBench",
        "vs reference",
        "vs `torch.compile`",
        "peak: fused / MultiBench / reference / compiled",
    ]
    return _table(header, cells, cases)


def skew_pair_attention() -> str:
    def cells(get: Get) -> list[str]:
        both = get(FUSED, "fwd+bwd")
        return [
            f"{both['n']}, {both['window']}",
            _ms(both),
            *(_x(both, b) for b in ("reference", "compile", "mha")),
            _peaks(get, [FUSED, "reference", "compile(reference)", "per-pair-mha"]),
        ]

    name = "skew_pair_attention_cpu_2026-11-23_full.csv"
    goal = " (issue goal)"
    cases = [
        (name, "headline-cpu-w0", goal),
        (name, "headline-cpu-w2", goal),
        (name, "bert-w0-n64", ""),
        (name, "bert-w2-n1024", ""),
    ]
    header = [
        "case (N, window)",
        "fused fwd+bwd",
        "vs reference",
        "vs `torch.compile`",
        "vs per-pair MHA",
        "peak: fused / reference / compiled / MHA",
    ]
    return _table(header, cells, cases)


def multiple_kernel() -> str:
    def cells(get: Get) -> list[str]:
        both, fwd = get(FUSED, "fwd+bwd"), get(FUSED, "forward")
        kinds = both["case"].split("-")[-1 if both["case"].startswith("headline") else 1]
        return [
            f"N = {both['n']}, {kinds}",
            _ms(both),
            _x(both, "reference"),
            _x(both, "compile"),
            _x(fwd, "reference"),
            _peaks(get, [FUSED, "reference", "compile(reference)"]),
        ]

    name = "multiple_kernel_cpu_2026-11-23_full.csv"
    goal = " (issue goal)"
    cases = [
        (name, "headline-cpu-mixed", goal),
        (name, "headline-cpu-rbf", goal),
        (name, "mkl-mixed-n2048", ""),
        (name, "mkl-rbf-n1024", ""),
    ]
    header = [
        "case",
        "fused fwd+bwd",
        "vs reference",
        "vs `torch.compile`",
        "forward vs reference",
        "peak: fused / reference / compiled",
    ]
    return _table(header, cells, cases)


# README's names of the registered ops, in README's order (a new op must be named here).
OP_LABELS = {
    "tensor_fusion": "tensor fusion",
    "low_rank_fusion": "low-rank fusion",
    "product_fusion": "product fusion",
    "skew_pair_attention": "skew-pair attention",
    "multiple_kernel": "multiple kernel fusion",
    "mfb": "MFB / MLB bilinear pooling",
    "mfh": "MFH bilinear pooling",
    "block_fusion": "BLOCK / MUTAN bilinear fusion",
}
_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _size(n: int) -> str:
    return "2" + str(n.bit_length() - 1).translate(_SUPERSCRIPT) if n & (n - 1) == 0 else str(n)


def _rule(threshold: int, min_modalities: int, narrow: int = 0) -> str:
    if threshold == 0 and min_modalities <= 1:
        return "always fused"
    text = f"fused from {_size(threshold)}" if threshold else "fused"
    if threshold and narrow:
        text += f", or at any size when every modality is at most {narrow} wide"
    if min_modalities > 1:
        text += f" with M ≥ {min_modalities} (fewer modalities: always the reference)"
    return text


def cpu_size_rules() -> str:
    """The CPU size rules of the op registry (what ``python -m fusionops.info`` prints)."""
    from fusionops.registry import OPS  # importing fusionops registers every op

    if set(OP_LABELS) != set(OPS):
        raise KeyError(f"OP_LABELS names {sorted(OP_LABELS)} but the registry has {sorted(OPS)}")
    lines = [
        "| op (size counted) | calls that record a gradient "
        "| inference (`no_grad`, or no input requires grad) |",
        "|---|---|---|",
    ]
    for name, label in OP_LABELS.items():
        op = OPS[name]
        metric = op.size_metric.replace("*", "·")
        grad = _rule(op.cpu_min_size, op.cpu_min_modalities, op.cpu_narrow_width)
        infer = _rule(op.cpu_min_size_forward, op.cpu_min_modalities, op.cpu_narrow_width_forward)
        lines.append(f"| {label} ({metric}) | {grad} | {infer} |")
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "cpu-size-rules": cpu_size_rules,
    "perf-tensor-fusion": tensor_fusion,
    "perf-low-rank-fusion": low_rank_fusion,
    "perf-skew-pair-attention": skew_pair_attention,
    "perf-multiple-kernel": multiple_kernel,
}


def render(text: str, tables: dict[str, Callable[[], str]] = TABLES) -> str:
    """``text`` with every generated block rewritten; each table's block must be present."""
    absent = set(tables) - {m.group("name") for m in BLOCK.finditer(text)}
    if absent:
        raise KeyError(f"README has no generated block {sorted(absent)}")

    def body(m: re.Match) -> str:  # other tools' blocks are left alone
        name = m.group("name")
        return m.group(1) + tables[name]() + m.group(4) if name in tables else m.group(0)

    return BLOCK.sub(body, text)


def stale(path: Path = README) -> list[str]:
    """The blocks whose text differs from what the CSVs give."""
    text = path.read_text()
    fresh = render(text)
    old = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
    new = {m.group("name"): m.group("body") for m in BLOCK.finditer(fresh)}
    return sorted(n for n in new if n in TABLES and old.get(n) != new[n])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.readme_tables", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a table differs from the CSVs")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        print(f"stale README tables: {bad}" if bad else "README tables match the CSVs")
        return 1 if bad else 0
    README.write_text(render(README.read_text()))
    print(f"wrote {len(TABLES)} tables into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
