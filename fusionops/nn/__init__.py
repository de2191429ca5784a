"""Drop-in fusion layers."""

from fusionops.nn.low_rank_fusion import LowRankFusion, LowRankTensorFusion
from fusionops.nn.product_fusion import Concat, ProductConcat, ProductFusion
from fusionops.nn.tensor_fusion import TensorFusion

__all__ = ["Concat", "LowRankFusion", "LowRankTensorFusion", "ProductConcat", "ProductFusion", "TensorFusion"]
