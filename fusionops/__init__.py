"""fusionops: fused CPU/GPU kernels for multimodal fusion.

Functional ops: :func:`tensor_fusion`, :func:`low_rank_fusion`, :func:`product_fusion`,
:func:`skew_pair_attention` (pair sets: :func:`skew_pairs`), :func:`multiple_kernel` (base kernels:
:class:`BaseKernel`).
Layers: :class:`TensorFusion`, :class:`LowRankFusion`, :class:`LowRankTensorFusion`,
:class:`ProductFusion`, :class:`ProductConcat`, :class:`Concat`, :class:`SkewPairFusion`
(with :class:`EncoderStacks` and :func:`layer_summaries` for ``transformers`` encoders; pair
sets chosen by :func:`select_skew_pairs`), :class:`MultipleKernelFusion`.
Estimators: :class:`MultipleKernelRidge`, :class:`MultipleKernelRidgeClassifier` (β learned on
the simplex jointly with a kernel ridge predictor).
Backend choice: :func:`backend` (context manager, per thread) or ``FUSIONOPS_BACKEND``; which
backend served the calls so far: :func:`dispatch_counts`;
``python -m fusionops.info`` prints what is built and usable here.
"""

from fusionops import _extension
from fusionops._backend import BACKENDS, BackendUnavailableError, backend
from fusionops.base_kernels import BaseKernel
from fusionops.mkl import MultipleKernelRidge, MultipleKernelRidgeClassifier
from fusionops.nn import (
    MFB,
    MFH,
    MLB,
    Block,
    Concat,
    EncoderStacks,
    LowRankFusion,
    LowRankTensorFusion,
    MultipleKernelFusion,
    Mutan,
    ProductConcat,
    ProductFusion,
    SkewPairFusion,
    TensorFusion,
    layer_summaries,
)
from fusionops.ops import (
    block_fusion,
    low_rank_fusion,
    mfb,
    mfh,
    multiple_kernel,
    product_fusion,
    skew_pair_attention,
    tensor_fusion,
)
from fusionops.pairs import skew_pairs
from fusionops.registry import dispatch_counts, reset_dispatch_counts
from fusionops.selection import SkewPairSelection, select_skew_pairs

_extension.warn_if_missing()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "BaseKernel",
    "Block",
    "Concat",
    "EncoderStacks",
    "LowRankFusion",
    "LowRankTensorFusion",
    "MFB",
    "MFH",
    "MLB",
    "MultipleKernelFusion",
    "MultipleKernelRidge",
    "MultipleKernelRidgeClassifier",
    "Mutan",
    "ProductConcat",
    "ProductFusion",
    "SkewPairFusion",
    "SkewPairSelection",
    "TensorFusion",
    "backend",
    "block_fusion",
    "dispatch_counts",
    "layer_summaries",
    "low_rank_fusion",
    "mfb",
    "mfh",
    "multiple_kernel",
    "product_fusion",
    "reset_dispatch_counts",
    "select_skew_pairs",
    "skew_pair_attention",
    "skew_pairs",
    "tensor_fusion",
]
