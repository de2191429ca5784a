"""Property-based, for the bilinear ops (MFB, MFH, BLOCK): hypothesis draws the problem (rows
including 0, widths, factor / chunks and rank, activation, normalisation, dtype, the memory
layout of the inputs, the parameters and the upstream gradient, absent biases) and each fused
backend must give the float64 reference's output and gradients, through the ops' own
``check_against_reference``. Derandomized; the interpreter backend gets fewer examples."""

from __future__ import annotations

import pytest
from bilinear_inputs import (
    PARAM_LAYOUTS,
    check_against_reference,
    make_block_params,
    make_mfb_params,
    make_mfh_params,
)
from conftest import skip_unless_usable
from hypothesis import given
from hypothesis import strategies as st
from inputs import LAYOUTS, make_xs
from test_properties import dtypes, grad_layouts, property_settings, rows

from fusionops.registry import OPS

BACKENDS = ["cpu", "triton"]
EXAMPLES = {"cpu": 25, "triton": 5}
layouts = st.sampled_from(LAYOUTS)
param_layouts = st.sampled_from(PARAM_LAYOUTS)
small = st.integers(1, 5)


def _settings(backend: str):
    return property_settings(EXAMPLES[backend])


def _run(backend, op, x, t, params, kwargs, dtype, grad_layout, bias, conditioned):
    if not bias:
        params[1] = params[3] = params[5] = None
    check_against_reference(op, backend, x, t, params, kwargs, dtype, grad_layout, conditioned)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mfb(backend):
    skip_unless_usable(backend, "cpu", op=OPS["mfb"])

    @_settings(backend)
    @given(n=rows, dx=small, dt=small, k=small, o=small, out=small, dtype=dtypes, layout=layouts,
           param_layout=param_layouts, grad_layout=grad_layouts, bias=st.booleans(),
           activation=st.sampled_from(["relu", "tanh", None]), normalize=st.booleans())  # fmt: skip
    def check(n, dx, dt, k, o, out, dtype, layout, param_layout, grad_layout, bias, activation, normalize):
        x, t = make_xs((n,), (dx, dt), dtype, "cpu", layout)
        params = make_mfb_params(dx, dt, k, o, out, dtype, "cpu", param_layout)
        kwargs = {"factor": k, "activation": activation, "normalize": normalize}
        _run(backend, "mfb", x, t, params, kwargs, dtype, grad_layout, bias, normalize)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mfh(backend):
    """MFB's draws plus the number of chained blocks p (1: MFB itself, 2: block.bootstrap's)."""
    skip_unless_usable(backend, "cpu", op=OPS["mfh"])

    @_settings(backend)
    @given(n=rows, dx=small, dt=small, k=small, o=small, out=small, blocks=st.integers(1, 4), dtype=dtypes,
           layout=layouts, param_layout=param_layouts, grad_layout=grad_layouts, bias=st.booleans(),
           activation=st.sampled_from(["relu", "tanh", None]), normalize=st.booleans())  # fmt: skip
    def check(
        n, dx, dt, k, o, out, blocks, dtype, layout, param_layout, grad_layout, bias, activation, normalize
    ):
        x, t = make_xs((n,), (dx, dt), dtype, "cpu", layout)
        params = make_mfh_params(dx, dt, k, o, out, blocks, dtype, "cpu", param_layout)
        kwargs = {"factor": k, "activation": activation, "normalize": normalize}
        _run(backend, "mfh", x, t, params, kwargs, dtype, grad_layout, bias, normalize)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_fusion(backend):
    skip_unless_usable(backend, "cpu", op=OPS["block_fusion"])

    @_settings(backend)
    @given(n=rows, chunks=small, rank=small, s=small, out=small, dtype=dtypes, layout=layouts,
           param_layout=param_layouts, grad_layout=grad_layouts, bias=st.booleans(),
           normalize=st.sampled_from(["before_cat", "after_cat", "none"]))  # fmt: skip
    def check(n, chunks, rank, s, out, dtype, layout, param_layout, grad_layout, bias, normalize):
        x, t = make_xs((n,), (chunks * s, chunks * s), dtype, "cpu", layout)
        params = make_block_params(chunks, rank, s, out, dtype, "cpu", param_layout)
        kwargs = {"rank": rank, "normalize": normalize}
        _run(backend, "block_fusion", x, t, params, kwargs, dtype, grad_layout, bias, normalize != "none")

    check()
