"""Pure-PyTorch definitions of every operator (DESIGN.md): readable, not fast.

These are the oracle the tests hold every kernel to, and the ``reference`` backend.
"""

from fusionops.reference.tensor_fusion import tensor_fusion, tensor_fusion_features

__all__ = ["tensor_fusion", "tensor_fusion_features"]
