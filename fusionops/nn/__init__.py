"""Drop-in fusion layers."""

from fusionops.nn.tensor_fusion import TensorFusion

__all__ = ["TensorFusion"]
