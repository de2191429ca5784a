"""Per-layer linear probes: where in each encoder's summary stack each bit can be read.

A ridge classifier per layer (closed form, float64) is fitted on the training rows and scored
on the validation rows. It checks the planted depths directly (``task.py``): the probe of bit
``a`` on stack A should sit at chance below ``depth_a`` and rise at it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def layer_probe(
    stack: Tensor, target: Tensor, train: Tensor, held_out: Tensor, ridge: float = 1.0
) -> list[float]:
    """Held-out accuracy of a ridge classifier of the 0/1 ``target`` on each layer of
    ``stack (N, L, D)`` (already standardised)."""
    accs = []
    sign = (2 * target - 1).double()
    for layer in range(stack.shape[1]):
        x = torch.cat([stack[:, layer].double(), torch.ones(stack.shape[0], 1, dtype=torch.float64)], 1)
        xt = x[train]
        gram = xt.T @ xt + ridge * torch.eye(x.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, xt.T @ sign[train])
        pred = (x[held_out] @ w > 0).long()
        accs.append(float((pred == target[held_out]).double().mean()))
    return accs


def xor_ceiling(acc_a: float, acc_b: float) -> float:
    """Accuracy of the XOR of two independent bit guesses right with ``acc_a`` and ``acc_b``:
    what a model reading the bits as well as the best probes would reach."""
    return acc_a * acc_b + (1 - acc_a) * (1 - acc_b)
