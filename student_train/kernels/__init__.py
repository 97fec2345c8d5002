"""Soft-DTW kernels: the float64 reference (test oracle) and the fast paths (numba CPU, Triton GPU, torch)."""

from student_train.kernels.reference import soft_dtw_reference
from student_train.kernels.soft_dtw import cosine_cost, soft_dtw, soft_dtw_divergence

__all__ = ["cosine_cost", "soft_dtw", "soft_dtw_divergence", "soft_dtw_reference"]
