"""Triton kernels, one module per operator (imported lazily: triton is optional)."""
