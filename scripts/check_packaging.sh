#!/usr/bin/env bash
# Packaging check, as a new user would meet it (two compiles: 24 minutes on our 2 shared cores).
#   1. `python -m build --sdist`, then a wheel built from that sdist in a fresh venv
#      (torch==2.13.0 first, --no-build-isolation, as README says): the wheel must hold
#      fusionops._C, and once installed (outside the checkout) the extension must load and run.
#   2. The same sdist with build isolation ON and no package index: it must build against the
#      venv's torch (nothing to download) and hold fusionops._C too. CHECK_ISOLATED=0 skips it.
#   3. Isolation ON in a venv without torch: the build must stop, saying why.
# Usage: scripts/check_packaging.sh [WORKDIR]   (PYTHON=python3.11 picks the interpreter)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/fusionops-packaging.XXXXXX)}
py=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$work"
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }

step "fresh venv with torch==2.13.0 (README's pin; a local CPU wheel on our machines)"
rm -rf "$work/venv" "$work/bare" "$work/dist" "$work/wheels" "$work/wheels_iso" "$work/bdeps"
"$py" -m venv "$work/venv"
v="$work/venv/bin"
"$v/pip" install -q torch==2.13.0 setuptools wheel ninja build

step "sdist"
had_egg_info=0; [ -d "$root/fusionops.egg-info" ] && had_egg_info=1
"$v/python" -m build --sdist --outdir "$work/dist" "$root" >"$work/sdist.log" 2>&1 \
  || { tail -n 40 "$work/sdist.log"; exit 1; }
# setuptools writes fusionops.egg-info into the checkout: leave the tree as we found it
[ "$had_egg_info" = 1 ] || rm -rf "$root/fusionops.egg-info"
sdist=$(ls "$work"/dist/fusionops-*.tar.gz)

has_extension() {  # the wheel in $1 holds fusionops/_C*.so
  "$v/python" - "$1" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
so = [n for n in names if n.startswith("fusionops/_C") and n.endswith(".so")]
print(f"{sys.argv[1]}: {len(names)} files, extension: {so}")
sys.exit(0 if so else 1)
PY
}

step "wheel from the sdist, --no-build-isolation"
"$v/pip" wheel -q --no-build-isolation --no-deps -w "$work/wheels" "$sdist"
wheel=$(ls "$work"/wheels/fusionops-*.whl)
has_extension "$wheel"

step "install the wheel; the extension loads and serves a call (run outside the checkout)"
"$v/pip" install -q "$wheel"
(cd "$work" && "$v/python" - <<'PY'
import torch
import fusionops
from fusionops import _extension
assert _extension.extension_loaded(), _extension.extension_error()
assert "site-packages" in fusionops.__file__, fusionops.__file__  # the wheel, not the checkout
xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
layer = fusionops.TensorFusion([3, 3], 5).double()
with fusionops.backend("cpu"):
    y = layer(xs)
with fusionops.backend("reference"):
    torch.testing.assert_close(y, layer(xs))
print("installed wheel:", fusionops.__file__, "- fusionops._C loaded, cpu backend matches the reference")
PY
)

if [ "${CHECK_ISOLATED:-1}" != 0 ]; then
  step "wheel from the sdist with build isolation ON and no index (build deps from a local folder)"
  "$v/pip" download -q -d "$work/bdeps" setuptools wheel ninja
  "$v/pip" wheel -q --no-index --find-links "$work/bdeps" --no-deps -w "$work/wheels_iso" "$sdist"
  has_extension "$(ls "$work"/wheels_iso/fusionops-*.whl)"
fi

step "build isolation ON in a venv without torch: the build stops and says why"
"$py" -m venv "$work/bare"
[ -d "$work/bdeps" ] || "$v/pip" download -q -d "$work/bdeps" setuptools wheel ninja
if "$work/bare/bin/pip" wheel --no-index --find-links "$work/bdeps" --no-deps -w "$work/bare/w" "$sdist" \
  >"$work/bare.log" 2>&1; then
  echo "a build without torch succeeded silently" >&2; exit 1
fi
grep -q "torch is not installed in the environment being installed into" "$work/bare.log" \
  || { tail -n 30 "$work/bare.log"; echo "the failed build did not say why" >&2; exit 1; }
echo "failed as it should, with: $(grep -o 'fusionops: ERROR: torch is not installed[^.]*' "$work/bare.log" | head -n 1)"

step "packaging check passed (workdir $work)"
