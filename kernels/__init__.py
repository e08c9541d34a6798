"""Fused SDE log-probability kernels (installed as `megaflow.kernels`).

`sde_log_prob` dispatches to the Triton kernel (`logprob_triton`, imported only when used) or
to the eager reference `sde_log_prob_torch`.
"""
from megaflow.kernels.logprob import BACKENDS, KernelBackendError, resolve_backend, sde_log_prob
from megaflow.kernels.reference import LogProbOut, sde_log_prob_torch

__all__ = ["BACKENDS", "KernelBackendError", "LogProbOut", "resolve_backend", "sde_log_prob", "sde_log_prob_torch"]
