"""Packaging: the sdist carries every build input, declared dependencies are the used ones,
fusionops works without triton, and a build with no torch stops saying why.

The full check (a wheel compiled from the sdist in a fresh venv, with and without build
isolation) compiles the extension twice, about 10-25 minutes on 2 cores, so it is opt-in:
``FUSIONOPS_PACKAGING_CHECK=1 pytest tests/test_packaging.py`` or ``scripts/check_packaging.sh``.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".so", ".o")


def _files(folder: str, suffix: str = "") -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / folder).rglob("*" + suffix)
        if p.is_file() and not SKIP & set(p.parts) and not p.name.endswith(SKIP_SUFFIXES)
    }


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[set[str], str]:
    """The sdist's file names (relative to its top folder) and its PKG-INFO."""
    out = tmp_path_factory.mktemp("sdist")
    cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
           "--outdir", str(out), str(ROOT)]
    egg_info = ROOT / "fusionops.egg-info"
    had_egg_info = egg_info.exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if not had_egg_info:  # setuptools writes it into the checkout; leave the tree as found
        shutil.rmtree(egg_info, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("fusionops-*.tar.gz")
    with tarfile.open(path) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    return names, pkg_info


def test_sdist_holds_every_build_input(sdist):
    names, _ = sdist
    needed = _files("csrc") | _files("tools", ".py") | _files("fusionops", ".py")
    needed |= {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    assert not needed - names, f"left out of the sdist: {sorted(needed - names)}"
    assert not [n for n in names if n.endswith(SKIP_SUFFIXES)], "build products in the sdist"
    # every local #include of a C++/CUDA source resolves inside the sdist
    for src in sorted(n for n in names if n.startswith("csrc/")):
        for inc in re.findall(r'#include "([^"]+)"', (ROOT / src).read_text()):
            where = Path(src).parent / inc
            assert os.path.normpath(where).replace(os.sep, "/") in names, f"{src} includes {inc}: not shipped"


def test_declared_dependencies_are_the_used_ones(sdist):
    """Runtime: torch and numpy (imported by fusionops); triton only as an extra ([triton], and
    [test]: the tests run the Triton kernels on CPU); ninja only to build."""
    _, pkg_info = sdist
    lines = pkg_info.splitlines()
    requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    unconditional = {re.split(r"[<>=;\s\[]", r)[0] for r in requires if "extra ==" not in r}
    assert unconditional == {"torch", "numpy"}, requires
    triton = [r for r in requires if r.startswith("triton")]
    assert triton and all('extra == "triton"' in r or 'extra == "test"' in r for r in triton), triton
    assert any('extra == "triton"' in r for r in triton) and any('extra == "test"' in r for r in triton)
    assert not [r for r in requires if r.startswith("ninja")]
    pyproject = (ROOT / "pyproject.toml").read_text()
    build = re.search(r"\[build-system\][^\[]*?requires = \[([^\]]*)\]", pyproject)
    assert build and '"ninja"' in build.group(1) and "torch" not in build.group(1)
    # what the package imports, outside the standard library
    used = set()
    for path in (ROOT / "fusionops").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used.add(node.module.split(".")[0])
    third_party = used - set(sys.stdlib_module_names) - {"fusionops", "__future__"}
    assert third_party == {"torch", "numpy", "triton"}, third_party


_RUN_BLOCKED = """
import runpy, sys, sysconfig
for name in {blocked!r}:  # as if not installed: import fails, importlib.util.find_spec gives None
    sys.modules[name] = None
empty = {empty!r}
sysconfig.get_paths = lambda *a, **k: {{"purelib": empty, "platlib": empty}}  # no torch there
"""


def _python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_a_build_without_torch_stops_saying_why(tmp_path):
    """What `pip install .` with build isolation meets when the target environment has no torch:
    pip hides a successful build's output, so the build fails, with the way out."""
    prelude = _RUN_BLOCKED.format(blocked={"torch"}, empty=str(tmp_path))
    run = "sys.argv = ['setup.py', {cmds}]\nrunpy.run_path({setup!r}, run_name='__main__')\n"
    setup = str(ROOT / "setup.py")
    done = _python(prelude + run.format(cmds="'bdist_wheel'", setup=setup), ROOT)
    assert done.returncode == 1
    assert "torch is not installed in the environment being installed into" in done.stderr
    assert "FUSIONOPS_BUILD_EXT=0" in done.stderr and "--no-build-isolation" in done.stderr
    # metadata needs no torch (pip asks for it before building), nor does FUSIONOPS_BUILD_EXT=0
    # (--name: setuptools prints the name and stops, building nothing in the checkout)
    done = _python(prelude + run.format(cmds="'--name'", setup=setup), ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("fusionops"), done.stderr[-2000:]
    no_ext = {"FUSIONOPS_BUILD_EXT": "0"}
    done = _python(prelude + run.format(cmds="'--name', 'build_ext'", setup=setup), ROOT, no_ext)
    assert "building without fusionops._C" in done.stderr


def test_fusionops_works_without_triton(tmp_path):
    code = _RUN_BLOCKED.format(blocked={"triton"}, empty=str(tmp_path)) + """
import torch, fusionops
from fusionops.info import report
xs = [torch.randn(3, 2, dtype=torch.float64) for _ in range(2)]
with fusionops.backend("reference"):
    want = fusionops.tensor_fusion(xs)
torch.testing.assert_close(fusionops.tensor_fusion(xs), want)
try:
    with fusionops.backend("triton"):
        fusionops.tensor_fusion(xs)
except fusionops.BackendUnavailableError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("triton served a call without triton")
assert "triton not installed" in report()
assert sys.modules["triton"] is None  # nothing tried to import it for real
print("ok")
"""
    done = _python(code, tmp_path, {"TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FUSIONOPS_PACKAGING_CHECK") != "1",
    reason="compiles the extension twice from the sdist (10-25 min): set FUSIONOPS_PACKAGING_CHECK=1",
)
def test_a_wheel_built_from_the_sdist_holds_the_extension(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_packaging.sh"), str(tmp_path)],
        capture_output=True, text=True, timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "extension: ['fusionops/_C" in done.stdout and "packaging check passed" in done.stdout
