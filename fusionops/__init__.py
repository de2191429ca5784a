"""fusionops: fused CPU/GPU kernels for multimodal fusion.

Functional ops: :func:`tensor_fusion`, :func:`low_rank_fusion`, :func:`product_fusion`.
Layers: :class:`TensorFusion`, :class:`LowRankFusion`, :class:`LowRankTensorFusion`,
:class:`ProductFusion`, :class:`ProductConcat`, :class:`Concat`.
Backend choice: :func:`backend` (context manager) or ``FUSIONOPS_BACKEND``;
``python -m fusionops.info`` prints what is built and usable here.
"""

from fusionops import _extension
from fusionops._backend import BACKENDS, BackendUnavailableError, backend
from fusionops.nn import (
    Concat,
    LowRankFusion,
    LowRankTensorFusion,
    ProductConcat,
    ProductFusion,
    TensorFusion,
)
from fusionops.ops import low_rank_fusion, product_fusion, tensor_fusion
from fusionops.pairs import skew_pairs

_extension.warn_if_missing()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Concat",
    "LowRankFusion",
    "LowRankTensorFusion",
    "ProductConcat",
    "ProductFusion",
    "TensorFusion",
    "backend",
    "low_rank_fusion",
    "product_fusion",
    "skew_pairs",
    "tensor_fusion",
]
