"""The "from MKL to low-rank tensors" study: multiple kernel learning on digit views and on
simulated visual / audio / text modalities (learned β, accuracy, kernel-PCA separability),
and low-rank fusion (rank 4, one output) vs tensor fusion on a simulated regression task.
Run ``python -m experiments.mkl_lmf``."""

from experiments.mkl_lmf.study import RESULTS, StudyConfig, run_study

__all__ = ["RESULTS", "StudyConfig", "run_study"]
