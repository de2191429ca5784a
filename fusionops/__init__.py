"""fusionops: fused CPU/GPU kernels for multimodal fusion.

Functional ops: :func:`tensor_fusion`. Layers: :class:`TensorFusion`.
Backend choice: :func:`backend` (context manager) or ``FUSIONOPS_BACKEND``;
``python -m fusionops.info`` prints what is built and usable here.
"""

from fusionops import _extension
from fusionops._backend import BACKENDS, BackendUnavailableError, backend
from fusionops.nn import TensorFusion
from fusionops.ops import tensor_fusion

_extension.warn_if_missing()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "TensorFusion",
    "backend",
    "tensor_fusion",
]
