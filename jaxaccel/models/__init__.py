"""Models: the one adapter contract, jaxaccel's own zoo, and the registry.

The core sees every model through `adapt` (see `jaxaccel.models.adapter`):
flax linen modules of any common call signature, flax NNX modules, and plain
`init_fn` / `apply_fn` pairs.
"""

from jaxaccel.models.adapter import (CastModel, FunctionModel, LinenModel,
                                     ModelAdapter, NNXModel, adapt,
                                     from_functions, output_classes,
                                     output_shape)
from jaxaccel.models.registry import (IMAGE_MODELS, MODELS, SEQUENCE_MODELS,
                                      check_input,
                                      count_params, create, describe,
                                      from_description, parse_model_spec)
from jaxaccel.models.zoo import (CNN, GPT, MLP, BasicBlock, Conv, GPTBlock,
                                 ResNet, add_bias, conv2d, max_pool_2x2)

__all__ = [
    "BasicBlock", "CNN", "CastModel", "Conv", "FunctionModel", "GPT", "GPTBlock",
    "IMAGE_MODELS", "LinenModel", "MLP", "MODELS", "ModelAdapter", "NNXModel",
    "ResNet", "SEQUENCE_MODELS",
    "adapt", "add_bias", "check_input", "conv2d", "count_params", "create",
    "describe",
    "from_description", "from_functions", "max_pool_2x2", "output_classes", "output_shape",
    "parse_model_spec",
]
