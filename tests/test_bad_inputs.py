"""Every registered op (``torch.ops.fusionops.*``) on every backend rejects hostile input with
an error naming the argument, before any kernel runs. The calls run in a child process
(tests/bad_inputs.py) so that a crash (an out-of-bounds access) fails its case instead of
killing the test run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_inputs import CASES
from conftest import skip_unless_usable

from fusionops.registry import OPS

SCRIPT = Path(__file__).with_name("bad_inputs.py")
BACKENDS = ["cpu", "triton"] + (["cuda"] if torch.cuda.is_available() else [])
_outcomes: dict[str, dict[str, dict]] = {}


def _run(backend: str) -> dict[str, dict]:
    """Each case's outcome on ``backend``, from as few child processes as crashes allow."""
    if backend in _outcomes:
        return _outcomes[backend]
    found: dict[str, dict] = {}
    todo = list(CASES)
    while todo:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), backend, *todo], capture_output=True, text=True, timeout=600
        )
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                found[record["case"]] = record
                started = None
        if started is not None:  # the child died inside this case
            found[started] = {
                "case": started,
                "crashed": f"exit code {proc.returncode}; stderr tail: {proc.stderr[-800:]}",
            }
        elif proc.returncode != 0 and not found:
            raise RuntimeError(f"tests/bad_inputs.py failed to start: {proc.stderr[-2000:]}")
        todo = [c for c in todo if c not in found]
    _outcomes[backend] = found
    return found


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_op_rejects(backend, case):
    device = "cuda" if backend == "cuda" else "cpu"
    skip_unless_usable(backend, device, op=OPS["tensor_fusion"])
    outcome = _run(backend)[case]
    _, expected, pattern = CASES[case]
    assert "crashed" not in outcome, f"{case} on {backend}: the process crashed ({outcome['crashed']})"
    assert outcome["raised"] is not None, f"{case} on {backend}: {outcome['message']}"
    assert expected.__name__ in outcome["raised"], f"{case} on {backend}: raised {outcome['raised'][0]}"
    assert re.search(pattern, outcome["message"]), f"{case} on {backend}: message {outcome['message']!r}"
