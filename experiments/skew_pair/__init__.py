"""Skew-pair fusion study (SSFN, Hu et al. 2024): sweep skew and density on a synthetic
two-modality task over two random-weight ``transformers`` encoders, plot score against skew,
and choose a pair set by bootstrapping sparsity. Run ``python -m experiments.skew_pair``.
"""

from experiments.skew_pair.study import RESULTS, StudyConfig, run_study

__all__ = ["RESULTS", "StudyConfig", "run_study"]
