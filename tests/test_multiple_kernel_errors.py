"""Bad input to multiple_kernel, its base kernels, layer and estimators: errors that name the
argument, what was expected and what was given."""

from __future__ import annotations

import pytest
import torch

import fusionops
from fusionops import BaseKernel

A = [torch.randn(4, 3), torch.randn(4, 2)]
B = [torch.randn(5, 3), torch.randn(5, 2)]
BETA = torch.tensor([0.4, 0.6])
KERNELS = ["rbf", "linear"]


def call(xs_a=A, xs_b=B, beta=BETA, kernels=KERNELS):
    return fusionops.multiple_kernel(xs_a, xs_b, beta, kernels)


def test_the_happy_path_works():
    assert call().shape == (4, 5)
    assert call(xs_b=None).shape == (4, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"xs_b": B[:1]}, ValueError, r"xs_b has 1 modalities but xs_a has 2"),
        (
            {"beta": torch.tensor([1.0])},
            ValueError,
            r"beta must have shape \(2,\) \(one weight per modality\), got \(1,\)",
        ),
        ({"kernels": ["rbf"]}, ValueError, r"kernels has 1 entries but there are 2 modalities"),
        ({"beta": torch.tensor([0.5, -0.1])}, ValueError, r"beta must be >= 0.*got \[0.5, -0.1"),
        ({"beta": torch.tensor([0.5, float("nan")])}, ValueError, r"beta must be finite"),
        ({"beta": torch.tensor([1, 2])}, TypeError, r"beta has dtype torch.int64, expected torch.float32"),
        (
            {"kernels": ["rbf", "sigmoid"]},
            ValueError,
            r"kernels\[1\] has unknown kind 'sigmoid'; expected one of",
        ),
        (
            {"kernels": [BaseKernel("rbf", gamma=0.0), "linear"]},
            ValueError,
            r"kernels\[0\].gamma must be > 0, got 0",
        ),
        (
            {"kernels": [BaseKernel("rbf", gamma=-1.0), "linear"]},
            ValueError,
            r"kernels\[0\].gamma must be > 0, got -1",
        ),
        (
            {"kernels": [BaseKernel("rbf", gamma=torch.tensor(-0.5)), "linear"]},
            ValueError,
            r"kernels\[0\].gamma must be > 0, got -0.5",
        ),
        ({"kernels": [BaseKernel("rbf", gamma=float("inf")), "linear"]}, ValueError, r"gamma must be finite"),
        (
            {"kernels": [BaseKernel("polynomial", degree=0), "linear"]},
            ValueError,
            r"kernels\[0\].degree must be an int >= 1, got 0",
        ),
        (
            {"kernels": [BaseKernel("polynomial", degree=2.5), "linear"]},
            ValueError,
            r"degree must be an int >= 1, got 2.5",
        ),
        (
            {"kernels": [{"kind": "rbf", "sigma": 1.0}, "linear"]},
            ValueError,
            r"kernels\[0\] must be a dict with a 'kind'.*'sigma'",
        ),
        ({"kernels": [3, "linear"]}, TypeError, r"kernels\[0\] must be a BaseKernel, a kind string"),
        (
            {"kernels": "rbf"},
            TypeError,
            r"kernels must be a list or tuple with one base kernel per modality, got str",
        ),
        (
            {"xs_b": [torch.randn(5, 3), torch.randn(5, 4)]},
            ValueError,
            r"xs_b\[1\] has width 4 but xs_a\[1\] has 2",
        ),
        (
            {"xs_b": [torch.randn(5, 3), torch.randn(5, 2).double()]},
            TypeError,
            r"xs_b\[1\] has dtype torch.float64",
        ),
        (
            {"xs_a": [torch.randn(4, 3), torch.randn(3, 2)]},
            ValueError,
            r"xs_a\[1\] has leading shape \(3,\) but xs_a\[0\] has \(4,\)",
        ),
        (
            {"xs_a": [torch.randn(2, 4, 3), torch.randn(2, 4, 2)]},
            ValueError,
            r"xs_a\[0\] must have shape \(N, d_0\), got \(2, 4, 3\)",
        ),
        ({"xs_a": []}, ValueError, r"xs_a is empty"),
        ({"xs_a": torch.randn(4, 3)}, TypeError, r"xs_a must be a list or tuple of tensors"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_modalities_on_another_device_are_refused():
    meta = [torch.randn(5, 3, device="meta"), torch.randn(5, 2, device="meta")]
    with pytest.raises(ValueError, match=r"xs_b\[0\] is on meta, expected cpu"):
        call(xs_b=meta)


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match=r"beta must be 2 finite weights >= 0"):
        fusionops.MultipleKernelFusion(KERNELS, beta=[0.5, -0.5])
    with pytest.raises(ValueError, match=r"scales must be 2 finite values > 0"):
        fusionops.MultipleKernelFusion(KERNELS, scales=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"pass input_dims \(or a gamma\) to learn it"):
        fusionops.MultipleKernelFusion(KERNELS, learn_kernel_params=True)
    layer = fusionops.MultipleKernelFusion(KERNELS, input_dims=(3, 2))
    with pytest.raises(ValueError, match=r"built for input_dims \(3, 2\), got modalities of widths \(3, 4\)"):
        layer([torch.randn(4, 3), torch.randn(4, 4)])


def test_estimator_bad_arguments():
    with pytest.raises(ValueError, match=r"alpha \(the ridge penalty\) must be > 0, got 0"):
        fusionops.MultipleKernelRidge(KERNELS, alpha=0.0)
    est = fusionops.MultipleKernelRidge(KERNELS, steps=2)
    with pytest.raises(RuntimeError, match="call fit before predict"):
        est.predict(A)
    with pytest.raises(ValueError, match=r"xs has 1 modalities but the estimator has 2 kernels"):
        est.fit(A[:1], torch.randn(4))
    with pytest.raises(ValueError, match=r"y must have 4 rows"):
        est.fit(A, torch.randn(3))
    with pytest.raises(ValueError, match=r"xs\[0\] holds non-finite values"):
        est.fit([torch.full((4, 3), float("nan")), A[1]], torch.randn(4))
    est.fit(A, torch.randn(4))
    with pytest.raises(ValueError, match=r"xs\[1\] has width 5, but the model was fit on width 2"):
        est.predict([torch.randn(2, 3), torch.randn(2, 5)])
    clf = fusionops.MultipleKernelRidgeClassifier(KERNELS, steps=1)
    with pytest.raises(ValueError, match=r"y needs at least two classes, got \[1\]"):
        clf.fit(A, torch.ones(4, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_estimators_name_non_finite_labels(bad):
    """Non-finite targets are blamed on y (they used to surface as a complaint about beta)."""
    y = torch.randn(4)
    y[2] = bad
    with pytest.raises(ValueError, match=r"MultipleKernelRidge.fit: y holds non-finite values \(rows \[2\]"):
        fusionops.MultipleKernelRidge(KERNELS, steps=2).fit(A, y)
    labels = torch.tensor([0.0, 1.0, bad, 1.0])
    with pytest.raises(ValueError, match=r"Classifier.fit: y holds non-finite labels \(rows \[2\]"):
        fusionops.MultipleKernelRidgeClassifier(KERNELS, steps=1).fit(A, labels)


@pytest.mark.parametrize("limit", [0, 1 << 40], ids=["tiles", "loops"])
def test_cpu_kernel_entry_checks_before_reading(limit):
    """The C++ forward checks its arguments before it reads them, on both of its paths (an empty
    modality list was indexed before the check)."""
    from conftest import skip_unless_usable

    skip_unless_usable("cpu", "cpu", op=fusionops.registry.OPS["multiple_kernel"])
    previous = torch.ops.fusionops._mkl_small_work(limit)
    try:
        fwd = torch.ops.fusionops._mkl_fwd.default
        with pytest.raises(RuntimeError, match=r"xs is empty; expected M >= 1 modalities"):
            fwd([], [], torch.ones(0), [], torch.ones(0), [])
        with pytest.raises(RuntimeError, match=r"xs_b\[1\] has width 3 but xs_a\[1\] has 2"):
            fwd(A, [B[0], torch.randn(5, 3)], BETA, [1, 0], torch.tensor([0.5, 0.0]), [0, 0])
    finally:
        torch.ops.fusionops._mkl_small_work(previous)
