"""One module per operator: argument checks, autograd, fake kernels, backend choice."""

from fusionops.ops.block_fusion import block_fusion
from fusionops.ops.low_rank_fusion import low_rank_fusion
from fusionops.ops.mfb import mfb
from fusionops.ops.mfh import mfh
from fusionops.ops.multiple_kernel import multiple_kernel
from fusionops.ops.product_fusion import product_fusion
from fusionops.ops.skew_pair import skew_pair_attention
from fusionops.ops.tensor_fusion import tensor_fusion

__all__ = [
    "block_fusion",
    "low_rank_fusion",
    "mfb",
    "mfh",
    "multiple_kernel",
    "product_fusion",
    "skew_pair_attention",
    "tensor_fusion",
]
