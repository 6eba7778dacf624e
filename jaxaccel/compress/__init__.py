"""Compression as pure pytree transformations: pruning, quantization,
distillation, low rank, integer inference for any model (`int8`),
removing units (`shrink`), the before/after report, and stages that chain
them into recipes (`compress.run`, `compress.load_recipe`).

Examples:
  >>> import jax.numpy as jnp
  >>> from jaxaccel import compress
  >>> params = {"w": jnp.array([[0.1, -2.0], [3.0, 0.2]])}
  >>> pruned, masks = compress.prune(params, 0.5)
  >>> q = compress.quantize(pruned, bits=8)
  >>> compress.dequantize(q)["w"][0, 0].item(), compress.size_bytes(q)
  (0.0, 11)
"""

from jaxaccel.compress import (distillation, int8, lowrank, pruning,
                               quantization, report, shrink, stages)
from jaxaccel.compress.distillation import (distill, distillation_loss,
                                            make_distillation_loss)
from jaxaccel.compress.lowrank import LowRankMLP, factorize, lowrank_model
from jaxaccel.compress.pruning import (GradientStats, MaskState, PruneState,
                                       apply_masks, gradient_statistics,
                                       keep_masks, prune, prune_gradually,
                                       sparsity_report)
from jaxaccel.compress.quantization import (QArray, QuantAwareModel,
                                            dequantize, fake_quantize, quantize)
from jaxaccel.compress.report import size_bytes
from jaxaccel.compress.stages import (Settings, compress_run, list_recipes,
                                      load_recipe, run)

__all__ = [
    "GradientStats", "LowRankMLP", "MaskState", "PruneState", "QArray",
    "QuantAwareModel", "Settings", "apply_masks", "compress_run",
    "dequantize", "distill", "distillation", "distillation_loss", "factorize",
    "fake_quantize", "gradient_statistics", "int8",
    "keep_masks", "list_recipes", "load_recipe",
    "lowrank", "lowrank_model", "make_distillation_loss", "prune",
    "prune_gradually", "pruning", "quantization", "quantize", "report", "run",
    "shrink", "size_bytes", "sparsity_report", "stages",
]
