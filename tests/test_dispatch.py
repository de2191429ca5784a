"""Dispatch v2: the op registry, per-thread backend choice, the size rule under tracing,
autocast, dispatch counts, and the eager path against the custom ops."""

from __future__ import annotations

import threading

import pytest
import torch

import fusionops
from fusionops import _backend, _extension
from fusionops.registry import OPS, needs_grad

CPU = torch.device("cpu")
needs_cpu = pytest.mark.skipif(not _extension.extension_loaded(), reason="the C++ extension is not built")


def test_every_op_is_registered_once_with_its_reference_and_kernels():
    assert set(OPS) == {
        "tensor_fusion",
        "low_rank_fusion",
        "product_fusion",
        "skew_pair_attention",
        "multiple_kernel",
        "mfb",
        "mfh",
        "block_fusion",
    }
    for op in OPS.values():
        assert op.reference is getattr(fusionops.reference, op.name)
        assert op.kernels and all(k.startswith("_") for k in op.kernels)
        assert op.autocast in ("lower", "keep")
        op.kernels_for("triton") if _backend.triton_unsupported_reason(CPU) is None else None


def test_backend_blocks_are_per_thread():
    """A block in one thread never changes another thread's choice, even when the blocks
    overlap and end in a different order than they started."""
    inside = threading.Event()
    release = threading.Event()
    seen: dict[str, object] = {}

    def worker() -> None:
        with fusionops.backend("reference"):
            seen["worker inside"] = _backend.forced_backend()
            inside.set()
            release.wait(10)
        seen["worker after"] = _backend.forced_backend()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main while worker forces"] = _backend.forced_backend()
    with fusionops.backend("cpu"):
        release.set()
        t.join(10)
        seen["main inside"] = _backend.forced_backend()
    seen["main after"] = _backend.forced_backend()
    assert seen == {
        "worker inside": "reference",
        "main while worker forces": None,
        "worker after": None,
        "main inside": "cpu",
        "main after": None,
    }


def test_size_rule_per_mode_and_symbolic_sizes():
    for op in OPS.values():
        m = max(3, op.cpu_min_modalities)
        for training, threshold in ((True, op.cpu_min_size), (False, op.cpu_min_size_forward)):
            assert op.prefers_fused(CPU, threshold, m, training), op.name
            if threshold > 0:
                assert not op.prefers_fused(CPU, threshold - 1, m, training), op.name
        assert op.prefers_fused(torch.device("cuda"), 1, m, True), op.name  # no CPU rule on GPU
    # A symbolic size takes the fused kernels without comparing (no guard on a dynamic dim).
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    sym = env.create_unbacked_symint()
    assert OPS["tensor_fusion"].prefers_fused(CPU, sym, 2, False)


def test_product_fusion_of_two_modalities_goes_to_the_reference_automatically():
    op = OPS["product_fusion"]
    assert not op.prefers_fused(CPU, 1 << 30, 2, True) and not op.prefers_fused(CPU, 1 << 30, 2, False)


def test_needs_grad():
    a, b = torch.randn(2), torch.randn(2, requires_grad=True)
    assert not needs_grad([a], None, a) and needs_grad([a, b]) and needs_grad(a, b)
    with torch.no_grad():
        assert not needs_grad(b)


@needs_cpu
def test_dispatch_counts_record_the_serving_backend():
    fusionops.reset_dispatch_counts()
    xs = [torch.randn(4, 3), torch.randn(4, 2)]
    w = torch.randn(5, 12)
    with fusionops.backend("cpu"):
        fusionops.tensor_fusion(xs, w)
        fusionops.tensor_fusion(xs, w)
    with fusionops.backend("reference"):
        fusionops.tensor_fusion(xs, w)
    assert fusionops.dispatch_counts() == {"tensor_fusion": {"cpu": 2, "reference": 1}}
    fusionops.reset_dispatch_counts()
    assert fusionops.dispatch_counts() == {}


@needs_cpu
@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_export_with_a_dynamic_batch_dim(backend):
    """torch.export with a named dynamic batch dim, automatic and forced backends: the size
    rule does not compare the symbolic size (it used to raise an internal AssertionError)."""
    torch.manual_seed(0)
    layer = fusionops.TensorFusion([3, 4], 5)
    xs = [torch.randn(6, 3), torch.randn(6, 4)]
    batch = torch.export.Dim("batch")
    with fusionops.backend(backend):
        exported = torch.export.export(layer, (xs,), dynamic_shapes=([{0: batch}, {0: batch}],))
    other = [torch.randn(11, 3), torch.randn(11, 4)]
    with fusionops.backend("reference"):
        expected = layer(other)
    torch.testing.assert_close(exported.module()(other), expected, rtol=1e-5, atol=1e-5)
    graph = str(exported.graph)
    assert ("fusionops.tensor_fusion_projected" in graph) == (backend != "reference"), graph


def _layer_and_inputs(n: int):
    torch.manual_seed(0)
    layer = fusionops.TensorFusion([3, 4], 5)
    return layer, [torch.randn(n, 3), torch.randn(n, 4)]


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype_follows_nn_linear_for_every_backend_and_size(dtype):
    """Under autocast the projected op returns the autocast dtype, as nn.Linear does, whatever
    backend serves it and whatever the batch size; product fusion keeps its inputs' dtype."""
    for n in (8, 3000):
        layer, xs = _layer_and_inputs(n)
        for backend in (None, "cpu", "reference"):
            with torch.autocast("cpu", dtype=dtype), fusionops.backend(backend):
                y = layer(xs)
                lin = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
                p = fusionops.product_fusion([xs[0], xs[0], xs[0]])
            assert y.dtype == lin.dtype == dtype, (n, backend, y.dtype)
            assert p.dtype == torch.float32, (n, backend)
            cast = [x.to(dtype) for x in xs]
            expected = fusionops.reference.tensor_fusion(cast, layer.weight.to(dtype), layer.bias.to(dtype))
            torch.testing.assert_close(y.float(), expected.float(), rtol=0.05, atol=0.05)


@needs_cpu
def test_autocast_registered_for_the_custom_ops():
    """A direct torch.ops.fusionops call under autocast casts as the public function does."""
    xs = [torch.randn(4, 3), torch.randn(4, 2)]
    w, b = torch.randn(5, 12), torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.fusionops.tensor_fusion_projected(xs, w, b, None, "cpu")
        z = torch.ops.fusionops.tensor_fusion_features(xs, None, "cpu")
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32


@needs_cpu
def test_eager_path_matches_the_custom_op_path():
    """The eager autograd.Function and the custom op (what compiled graphs hold) give the same
    output and gradients for every input, bias and mask included."""
    torch.manual_seed(1)
    xs = [torch.randn(7, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(7, 3) > 0.3
    g = torch.randn(7, 5, dtype=torch.float64)
    leaves = [*xs, w, b]
    with fusionops.backend("cpu"):
        y = fusionops.tensor_fusion(xs, w, b, mask=mask)
    grads = torch.autograd.grad(y, leaves, g)
    y2 = torch.ops.fusionops.tensor_fusion_projected(xs, w, b, mask, "cpu")
    grads2 = torch.autograd.grad(y2, leaves, g)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    for a, e in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@needs_cpu
def test_compiled_code_follows_the_backend_block_of_its_thread():
    """torch.compile guards on the thread's forced backend: a block with another backend gets
    a graph of its own (the choice is fixed at trace time, not silently reused)."""
    graphs: list[str] = []

    def record(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda xs, w: fusionops.tensor_fusion(xs, w), backend=record, fullgraph=True)
    xs, w = [torch.randn(4, 3), torch.randn(4, 2)], torch.randn(5, 12)
    with fusionops.backend("reference"):
        expected = fn(xs, w)
    with fusionops.backend("cpu"):
        got = fn(xs, w)
    with fusionops.backend("reference"):
        fn(xs, w)  # the first graph again: no third trace
    assert len(graphs) == 2
    assert "tensor_fusion_projected" not in graphs[0] and "tensor_fusion_projected" in graphs[1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_cpu
@pytest.mark.parametrize("op", ["tensor_fusion", "low_rank_fusion", "product_fusion"])
@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_hot_path_reads_nothing_back_to_the_host(monkeypatch, op, backend):
    """No .item(), .tolist(), .cpu() or .numpy() on tensors in the Python of a forward +
    backward of tensor, low-rank and product fusion, so a CUDA graph can capture a training
    step (on a GPU each would be a host synchronisation)."""
    torch.manual_seed(0)
    xs = [torch.randn(6, 4, requires_grad=True) for _ in range(3)]
    if op == "tensor_fusion":
        args = (xs, torch.randn(3, 125, requires_grad=True), torch.randn(3, requires_grad=True))
    elif op == "low_rank_fusion":
        factors = [torch.randn(2, 5, 3, requires_grad=True) for _ in xs]
        args = (xs, factors, torch.randn(2, requires_grad=True), torch.randn(3, requires_grad=True))
    else:
        args = (xs,)

    def refuse(name):
        def read_back(self, *a, **k):
            raise AssertionError(f"{op}: Tensor.{name}() called in the hot path")

        return read_back

    fn = getattr(fusionops, op)
    fn(*args)  # first call outside the check (one-time lookups)
    for name in ("item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    with fusionops.backend(backend):
        y = fn(*args)
        y.sum().backward()
