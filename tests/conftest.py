"""Shared fixtures: which kernel backends to test, poisoned allocations, tolerances."""

from __future__ import annotations

import os
import sys

# Triton runs on CPU tensors only under its interpreter, chosen when triton is first imported.
assert "triton" not in sys.modules, "conftest must run before triton is imported"
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusionops  # noqa: E402  (registers every op)
from fusionops import _backend  # noqa: E402
from fusionops.registry import OPS, OpDef  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The fused backends that serve each device type (whether built here or not).
KERNEL_BACKENDS = _backend.DEVICE_BACKENDS

# Backends that must be usable (CI sets FUSIONOPS_REQUIRE_BACKENDS=cpu,triton): for these a
# missing build fails the run instead of silently skipping every kernel test.
REQUIRED = {b for b in os.environ.get("FUSIONOPS_REQUIRE_BACKENDS", "").split(",") if b}


def op_of_module(module: str) -> OpDef:
    """The registered op a test module tests, from its name: ``test_<op>_…`` or, for ops whose
    name has more words, its first two (``test_skew_pair_kernels`` → ``skew_pair_attention``)."""
    stem = module.rsplit(".", 1)[-1].removeprefix("test_")
    found = [
        op
        for op in OPS.values()
        if stem.startswith(op.name) or op.name.startswith("_".join(stem.split("_")[:2]))
    ]
    if len(found) != 1:
        raise LookupError(f"cannot tell which op {module} tests (matches: {[op.name for op in found]})")
    return found[0]


def skip_unless_usable(
    backend: str, device: str, dtype: torch.dtype = torch.float32, op: OpDef | None = None
) -> None:
    """Skip (with the registry's reasons) unless ``backend`` serves ``op`` (default: the op of
    the calling test module) on ``device``; fail instead when the backend is required and the
    op has kernels for it."""
    if op is None:
        op = op_of_module(sys._getframe(1).f_globals["__name__"])
    why = _backend.reasons(op, backend, torch.device(device), dtype)
    if not why:
        return
    device_match = {"cpu": "cpu", "cuda": "cuda"}.get(backend, device) == device
    has_kernels = backend != "cuda" or op.cuda_kernels
    if backend in REQUIRED and device_match and has_kernels:
        pytest.fail(f"backend {backend!r} is required (FUSIONOPS_REQUIRE_BACKENDS) but: {why}")
    pytest.skip(f"{op.name}, backend {backend!r} on {device}: " + "; ".join(why))


def pytest_generate_tests(metafunc) -> None:
    """``device`` runs over DEVICES; ``kernel_backend`` over the fused backends of each."""
    if "kernel_backend" in metafunc.fixturenames:
        pairs = [(d, b) for d in DEVICES for b in KERNEL_BACKENDS[d]]
        ids = [f"{b}-{d}" for d, b in pairs]
        metafunc.parametrize(("device", "kernel_backend"), pairs, ids=ids, indirect=True)
    elif "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, indirect=True)


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.interpreter_subset(keep=f)``: on the triton backend (the interpreter, slow),
    collect only the parametrizations for which ``f(**params)`` is true; the others still run
    on the cpu backend. Deselected rather than skipped: a skip would read as a case not run."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("interpreter_subset")
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (
            marker is not None
            and params.get("kernel_backend") == "triton"
            and not marker.kwargs["keep"](**params)
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def device(request) -> str:
    return request.param


@pytest.fixture
def kernel_backend(request, device) -> str:
    """A fused backend for ``device``; skipped, with its reasons, when not usable here."""
    skip_unless_usable(request.param, device, op=op_of_module(request.module.__name__))
    return request.param


@pytest.fixture(autouse=True)
def poisoned_memory():
    """Every fresh allocation (torch.empty, at::empty) is NaN-filled during each test, so an
    output or scratch element a kernel forgets to write shows up as NaN."""
    import torch.utils.deterministic as det

    previous = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    det.fill_uninitialized_memory = previous[1]


# Relative tolerance of a kernel against the float64 reference on the same inputs. float32
# sums of up to a few thousand products; half precisions round the inputs' products (Z tile)
# and the output once each: 4 eps.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 4 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,
}


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``actual`` (any dtype) against a float64 ``expected``: elementwise within
    ``tol * (|expected| + max|expected|)`` and no NaN where ``expected`` has none."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert not torch.isnan(a).any(), f"{what}: NaN in the result (an element left unwritten?)"
    tol = TOL[dtype]
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale + 1e-300, msg=lambda m: f"{what}: {m}")


def assert_compiled_matches_reference(model: torch.nn.Module, xs: list[torch.Tensor], backend: str) -> None:
    """``torch.compile(model, fullgraph=True)`` run with ``backend`` forced gives the eager
    reference's output and parameter gradients (float32 tolerance)."""

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with fusionops.backend(backend):
        out = compiled(xs)
        out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with fusionops.backend("reference"):
        expected = model(xs)
        expected.sum().backward()
    assert_close_to(out, expected.to(torch.float64), torch.float32, "compiled forward")
    for g, p in zip(grads, model.parameters(), strict=True):
        assert_close_to(g, p.grad.to(torch.float64), torch.float32, "compiled grad")
