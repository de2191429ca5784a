"""Pure-PyTorch definitions of every operator (DESIGN.md): readable, not fast.

These are the oracle the tests hold every kernel to, and the ``reference`` backend.
"""

from fusionops.reference.bilinear import block_fusion, mfb, mfh
from fusionops.reference.low_rank_fusion import low_rank_fusion
from fusionops.reference.multiple_kernel import base_kernel, multiple_kernel
from fusionops.reference.product_fusion import product_fusion
from fusionops.reference.skew_pair import skew_pair_attention
from fusionops.reference.tensor_fusion import tensor_fusion, tensor_fusion_features

__all__ = [
    "base_kernel",
    "block_fusion",
    "low_rank_fusion",
    "mfb",
    "mfh",
    "multiple_kernel",
    "product_fusion",
    "skew_pair_attention",
    "tensor_fusion",
    "tensor_fusion_features",
]
