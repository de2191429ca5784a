"""Dropout arguments of the fused ops (tensor fusion's on Z, the bilinear family's): checks and
the per-call seed. The masks themselves are hashed from the seed (fusionops/reference/
tensor_fusion.py, dropout_keep), so the kernels regenerate them in backward."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

# Seeds are drawn in [0, SEED_LIMIT) (torch.randint on the CPU generator), and accepted there.
SEED_LIMIT = 2**31


def check_dropout(op: str, name: str, p: object) -> float:
    """``p``: a real number in [0, 1), returned as a float."""
    # bool is an int, but True as a probability is a mistake, not 1
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{op}: {name} must be a float in [0, 1), got {type(p).__name__} {p!r}")
    if not 0.0 <= p < 1.0:  # also refuses NaN
        raise ValueError(f"{op}: {name} must be in [0, 1), got {p}")
    return float(p)


def check_seed(op: str, seed: object) -> None:
    """``seed``: None (drawn per call) or an int in [0, 2**31)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.SymInt)):
        raise TypeError(f"{op}: seed must be an int in [0, 2**31) or None, got {type(seed).__name__}")
    if isinstance(seed, int) and not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{op}: seed must be in [0, 2**31), got {seed}")


# torch._disable_dynamo is torch.compiler.disable imported on the first call rather than at
# `import fusionops` (importing torch._dynamo costs about a second, and fails where sysconfig is
# stubbed out, as tests/test_packaging.py does).
@torch._disable_dynamo
def draw_seed() -> int:
    """A dropout seed in [0, 2**31) from torch's default CPU generator, whatever the device of
    the call (no host-device sync on CUDA). Run eagerly even inside torch.compile, so that a
    compiled model draws the same seeds as the eager one after the same torch.manual_seed
    (traced, randint would come from the compiler's own random stream). Under FakeTensorMode
    (shape propagation) it draws a real one too: a fake tensor has no value to read."""
    with unset_fake_temporarily():
        return int(torch.randint(SEED_LIMIT, (), dtype=torch.int64).item())
