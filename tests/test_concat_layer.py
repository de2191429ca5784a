"""fusionops.Concat is MultiBench's Concat: every modality flattened from dim 1, then concatenated.

The first two tests are MultiBench's own (tests/test_fusion.py ``test_concat``, with its seed and
recorded norm) and PyKale's port of it (``test_concat`` on (B, T, d) inputs), run against ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionops import Concat


def test_multibench_test_concat():
    torch.manual_seed(0)  # MultiBench's set_seeds fixture
    np.random.seed(0)
    fusion = Concat()
    output = fusion([torch.randn((1, 2)) for _ in range(2)])
    assert output.shape == (1, 4)
    assert np.isclose(torch.norm(output).item(), 2.7442679405212402)
    assert sum(p.numel() for p in fusion.parameters() if p.requires_grad) == 0


def test_pykale_test_concat_flattens_sequences():
    m1, m2 = torch.randn(4, 3, 5), torch.randn(4, 2, 5)
    output = Concat()([m1, m2])
    assert output.shape == (4, 5 * (3 + 2))
    assert torch.equal(output, torch.cat([m1.reshape(4, -1), m2.reshape(4, -1)], dim=1))


def test_mixed_ranks_training_flag_and_gradients():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 2, 2, 2, requires_grad=True)
    out = Concat()((a, b), training=True)  # MultiBench's forward(modalities, training=False)
    assert out.shape == (3, 4 + 8)
    out.backward(torch.arange(36.0).view(3, 12))
    assert torch.equal(a.grad, torch.arange(36.0).view(3, 12)[:, :4])
    assert torch.equal(b.grad, torch.arange(36.0).view(3, 12)[:, 4:].reshape(3, 2, 2, 2))


def test_compiles_fullgraph():
    xs = [torch.randn(2, 3, 4), torch.randn(2, 5)]
    compiled = torch.compile(Concat(), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(xs), Concat()(xs))


def test_bad_inputs_name_the_modality():
    with pytest.raises(ValueError, match="modalities must be a non-empty list or tuple"):
        Concat()([])
    with pytest.raises(ValueError, match=r"modalities\[1\] must be a \(B, ...\) tensor, 2\+ dims, got shape"):
        Concat()([torch.randn(3, 2), torch.randn(3)])
