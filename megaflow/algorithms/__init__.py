"""Advantages, losses and the named GRPO algorithms composed from them."""
from megaflow.algorithms.advantages import (
    AGGREGATIONS,
    Advantages,
    compute_advantages,
    group_zscore,
    zero_std_groups,
)
from megaflow.algorithms.losses import LOSSES, StepTerms, clipped_surrogate
from megaflow.algorithms.registry import ALGORITHMS, Algorithm, get_algorithm

__all__ = [
    "AGGREGATIONS", "ALGORITHMS", "LOSSES", "Advantages", "Algorithm", "StepTerms", "clipped_surrogate",
    "compute_advantages", "get_algorithm", "group_zscore", "zero_std_groups",
]
