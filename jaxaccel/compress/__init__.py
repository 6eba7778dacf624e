"""Compression as pure pytree transformations: pruning, quantization,
distillation, low rank, and the before/after report."""

from jaxaccel.compress import pruning
from jaxaccel.compress.pruning import (GradientStats, PruneState,
                                       gradient_statistics, keep_masks, prune,
                                       prune_gradually, sparsity_report)

__all__ = [
    "GradientStats", "PruneState", "gradient_statistics", "keep_masks",
    "prune", "prune_gradually", "pruning", "sparsity_report",
]
