"""One module per operator: argument checks, autograd, fake kernels, backend choice."""

from fusionops.ops.tensor_fusion import tensor_fusion

__all__ = ["tensor_fusion"]
