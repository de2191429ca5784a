"""Drop-in fusion layers."""

from fusionops.nn.bilinear import MFB, MFH, MLB, Block, Mutan
from fusionops.nn.low_rank_fusion import LowRankFusion, LowRankTensorFusion
from fusionops.nn.multiple_kernel import MultipleKernelFusion
from fusionops.nn.product_fusion import Concat, ProductConcat, ProductFusion
from fusionops.nn.skew_pair import EncoderStacks, SkewPairFusion, layer_summaries
from fusionops.nn.tensor_fusion import TensorFusion

__all__ = [
    "MFB",
    "MFH",
    "MLB",
    "Block",
    "Concat",
    "EncoderStacks",
    "LowRankFusion",
    "LowRankTensorFusion",
    "MultipleKernelFusion",
    "Mutan",
    "ProductConcat",
    "ProductFusion",
    "SkewPairFusion",
    "TensorFusion",
    "layer_summaries",
]
