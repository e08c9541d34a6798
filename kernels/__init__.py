"""Fused SDE log-probability kernels (installed as `megaflow.kernels`)."""
from megaflow.kernels.reference import LogProbOut, sde_log_prob_torch

__all__ = ["LogProbOut", "sde_log_prob_torch"]
