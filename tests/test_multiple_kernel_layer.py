"""MultipleKernelFusion and the MKL estimators: what they compute and what they learn."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to

import fusionops
from fusionops import BaseKernel, reference


def views(n: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two classes; modality 0 carries the label (shifted means), modality 1 is pure noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    signal = torch.randn(n, 4, generator=gen, dtype=torch.float64) + 1.5 * (2 * y[:, None] - 1)
    noise = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    return [signal, noise], y


def test_reference_matches_the_definition_pair_by_pair():
    gen = torch.Generator().manual_seed(0)
    a = [
        torch.randn(4, 3, generator=gen, dtype=torch.float64),
        torch.randn(4, 2, generator=gen, dtype=torch.float64),
    ]
    b = [
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, 2, generator=gen, dtype=torch.float64),
    ]
    beta = torch.tensor([0.3, 1.7], dtype=torch.float64)
    kernels = [BaseKernel("rbf", gamma=0.4), BaseKernel("polynomial", degree=3, offset=-0.5)]
    out = reference.multiple_kernel(a, b, beta, kernels)
    for i in range(4):
        for j in range(5):
            rbf = torch.exp(-0.4 * ((a[0][i] - b[0][j]) ** 2).sum())
            poly = (a[1][i] @ b[1][j] - 0.5) ** 3
            assert torch.allclose(out[i, j], 0.3 * rbf + 1.7 * poly, rtol=1e-12, atol=1e-12)


def test_default_gamma_is_one_over_width():
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    assert torch.allclose(
        reference.base_kernel(a, b, "rbf"), reference.base_kernel(a, b, BaseKernel("rbf", gamma=0.2))
    )


def test_kernel_specs_as_strings_dicts_and_objects_agree():
    a = [torch.randn(3, 2, dtype=torch.float64)]
    beta = torch.ones(1, dtype=torch.float64)
    forms = ["poly", "polynomial", {"kind": "polynomial"}, BaseKernel("polynomial", degree=3, offset=1.0)]
    outs = [fusionops.multiple_kernel(a, None, beta, [k]) for k in forms]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_layer_is_the_op_with_softmax_weights():
    layer = fusionops.MultipleKernelFusion(["rbf", "linear"], beta=[0.25, 0.75], scales=[2.0, 0.5]).double()
    xs, _ = views(6)
    assert torch.allclose(layer.beta, torch.tensor([0.25, 0.75], dtype=torch.float64))
    weights = (layer.beta * layer.scales).detach()  # the float32 logits' rounding included
    assert torch.allclose(weights, torch.tensor([0.5, 0.375], dtype=torch.float64))
    expected = reference.multiple_kernel(xs, xs, weights, ["rbf", "linear"])
    assert_close_to(layer(xs), expected, torch.float64, "layer")
    layer(xs).sum().backward()
    assert layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0


def test_layer_learns_kernel_parameters():
    layer = fusionops.MultipleKernelFusion(
        ["rbf", BaseKernel("polynomial", degree=2, offset=0.5)], input_dims=(4, 6), learn_kernel_params=True
    ).double()
    assert torch.allclose(layer.log_gamma["0"].exp(), torch.tensor(0.25, dtype=torch.float64))
    xs, _ = views(5)
    layer(xs).sum().backward()
    assert layer.log_gamma["0"].grad != 0 and layer.offset["1"].grad != 0


def test_ridge_with_fixed_beta_is_kernel_ridge():
    """steps=0: β stays uniform and the predictor is the closed-form kernel ridge one."""
    xs, y = views(30)
    target = y.double() + 0.1 * xs[1][:, 0]
    est = fusionops.MultipleKernelRidge(["rbf", "linear"], alpha=0.3, steps=0, normalize=False).fit(
        xs, target
    )
    assert torch.allclose(est.beta_, torch.full((2,), 0.5, dtype=torch.float64))
    k = reference.multiple_kernel(xs, xs, torch.full((2,), 0.5, dtype=torch.float64), ["rbf", "linear"])
    coef = torch.linalg.solve(k + 0.3 * torch.eye(30, dtype=torch.float64), (target - target.mean())[:, None])
    assert torch.allclose(est.dual_coef_, coef, rtol=1e-8, atol=1e-10)
    assert torch.allclose(est.predict(xs), (k @ coef)[:, 0] + target.mean(), rtol=1e-8, atol=1e-10)


def test_classifier_weights_the_informative_modality():
    """The learned β favours the modality that carries the label; the objective falls."""
    xs, y = views(120)
    test_xs, test_y = views(200, seed=1)
    clf = fusionops.MultipleKernelRidgeClassifier(["rbf", "rbf"], alpha=0.5, steps=60, lr=0.1).fit(xs, y)
    assert clf.beta_[0] > 0.7, clf.beta_
    assert clf.history_[-1] < clf.history_[0]
    assert clf.score(test_xs, test_y) > 0.85
    assert set(clf.predict(test_xs).tolist()) <= {0, 1}


def test_regressor_fits_a_smooth_target():
    xs, _ = views(80)
    target = torch.sin(xs[0][:, 0]) + 0.05 * torch.randn(
        80, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    est = fusionops.MultipleKernelRidge(["rbf", "linear"], alpha=0.05, steps=20).fit(xs, target)
    assert est.score(xs, target) > 0.8
    assert est.predict(xs).shape == (80,)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_estimator_runs_on_each_cpu_backend(backend):
    from conftest import skip_unless_usable

    skip_unless_usable(backend, "cpu")
    xs, y = views(40)
    with fusionops.backend(backend):
        clf = fusionops.MultipleKernelRidgeClassifier(["rbf", "polynomial"], steps=5).fit(xs, y)
    assert clf.beta_.sum().item() == pytest.approx(1.0)
