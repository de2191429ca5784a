"""Drop-in fusion layers."""

from fusionops.nn.low_rank_fusion import LowRankFusion, LowRankTensorFusion
from fusionops.nn.multiple_kernel import MultipleKernelFusion
from fusionops.nn.product_fusion import Concat, ProductConcat, ProductFusion
from fusionops.nn.skew_pair import EncoderStacks, SkewPairFusion, layer_summaries
from fusionops.nn.tensor_fusion import TensorFusion

__all__ = [
    "Concat",
    "EncoderStacks",
    "LowRankFusion",
    "LowRankTensorFusion",
    "MultipleKernelFusion",
    "ProductConcat",
    "ProductFusion",
    "SkewPairFusion",
    "TensorFusion",
    "layer_summaries",
]
