"""Names -> models for the command line, and how a run records its model.

Examples:
  >>> from jaxaccel.models import create, parse_model_spec
  >>> parse_model_spec("mlp:300,100")
  ('mlp', {'widths': (300, 100)})
  >>> create("mlp", num_classes=10, widths=(64,)).widths
  (64,)
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax

from jaxaccel.errors import ConfigError, DataError
from jaxaccel.models.zoo import CNN, GPT, MLP, ResNet


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet18": ResNet,
    "gpt": GPT,
}
# Models of token sequences: rows of integer ids, one target per position.
SEQUENCE_MODELS = ("gpt",)
# Models that need (height, width, channels) rows; the MLP takes any shape.
IMAGE_MODELS = ("cnn", "resnet18")


def create(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  """Builds a registered model by name.

  Args:
    name: "mlp", "cnn" or "resnet18".
    num_classes: size of the output layer.
    **kwargs: fields of the model class, e.g. `widths=(64, 64)` for the MLP.
  """
  if name not in MODELS:
    raise ConfigError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
  cls = MODELS[name]
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = set(kwargs) - fields
  if unknown:
    raise ConfigError(f"model {name!r} has no option {sorted(unknown)[0]!r}; "
                      f"its options are {', '.join(sorted(fields))}")
  if num_classes < 1:
    raise ConfigError(f"num_classes (the outputs: classes, or 1 for a "
                      f"regression) must be at least 1; got {num_classes}")
  return cls(num_classes=num_classes, **kwargs)


def parse_model_spec(spec: str) -> tuple[str, dict]:
  """Reads the command line's model spelling: `mlp`, `mlp:300,100`,
  `cnn:32,64`, `gpt:4,4,128`.

  The numbers after the colon are the hidden widths (MLP) or conv features
  (CNN) or the base width (ResNet), or a GPT's layers, heads and width.
  """
  name, _, rest = spec.partition(":")
  if name not in MODELS:
    raise ConfigError(f"unknown model {name!r}: use one of {', '.join(MODELS)}, "
                      "optionally with widths, e.g. mlp:300,100")
  if not rest:
    return name, {}
  try:
    numbers = tuple(int(v) for v in rest.split(","))
  except ValueError:
    raise ConfigError(f"model spec {spec!r}: the part after ':' must be "
                      "comma-separated integers, e.g. mlp:300,100")
  if any(v <= 0 for v in numbers):
    raise ConfigError(f"model spec {spec!r}: widths must be positive")
  if name == "gpt":
    if len(numbers) != 3 or numbers[2] % numbers[1]:
      raise ConfigError(f"model spec {spec!r}: gpt takes LAYERS,HEADS,WIDTH "
                        "with WIDTH a multiple of HEADS, e.g. gpt:4,4,128")
    return name, dict(zip(("layers", "heads", "width"), numbers))
  key = {"mlp": "widths", "cnn": "features", "resnet18": "width"}[name]
  if name == "resnet18":
    if len(numbers) != 1:
      raise ConfigError(f"model spec {spec!r}: resnet18 takes one base width")
    return name, {key: numbers[0]}
  return name, {key: numbers}


def check_input(name: str, input_shape: Sequence[int]) -> None:
  """Raises DataError when a model cannot take inputs of this shape."""
  if name in IMAGE_MODELS and len(input_shape) != 3:
    raise DataError(f"model {name!r} needs images of shape (height, width, "
                    f"channels); the data has rows of shape {tuple(input_shape)}"
                    ": reshape the data or use --model mlp")
  if name == "cnn" and min(input_shape[:2]) < 4:
    raise DataError(f"model 'cnn' pools twice and needs images of at least "
                    f"4x4; got {tuple(input_shape[:2])}")
  if name in SEQUENCE_MODELS and len(input_shape) != 1:
    raise DataError(f"model {name!r} reads sequences of token ids; the data "
                    f"has rows of shape {tuple(input_shape)}: give it text "
                    "(--dataset pycode, fortunes or a .txt file)")


def describe(model) -> dict | None:
  """How a run records its model, so `from_description` can rebuild it.

  A registry model is recorded by name and options; a user's linen module by
  the import path of its class and its fields, when the class is importable
  (defined in a module, not in `__main__`) and every field is a plain value.
  Anything else (NNX modules, plain functions) gives None: such a run is
  loaded in Python with the model object (`load_run(path, model=...)`).
  """
  module = model.module if hasattr(model, "module") and not isinstance(
      model, nn.Module) else model
  if not isinstance(module, nn.Module):
    return None
  for name, cls in MODELS.items():
    if type(module) is cls:
      fields = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes"}
      kwargs = {f: getattr(module, f) for f in sorted(fields)}
      kwargs = {k: list(v) if isinstance(v, (tuple, list)) else v
                for k, v in kwargs.items() if k not in ("dtype", "axis_name")}
      return {"name": name, "num_classes": module.num_classes, "kwargs": kwargs}
  cls = type(module)
  if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
    return None
  kwargs = {}
  for f in sorted(set(cls.__dataclass_fields__) - {"parent", "name"}):
    value = getattr(module, f)
    if isinstance(value, tuple):
      value = list(value)
    if not _plain(value):
      return None
    kwargs[f] = value
  return {"import": f"{cls.__module__}:{cls.__qualname__}", "kwargs": kwargs}


def _plain(value) -> bool:
  if isinstance(value, (list, tuple)):
    return all(_plain(v) for v in value)
  return value is None or isinstance(value, (bool, int, float, str))


def from_description(desc: dict) -> nn.Module:
  """Rebuilds a model from `describe`'s output."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in desc["kwargs"].items()}
  if "import" in desc:
    module_name, _, qualname = desc["import"].partition(":")
    try:
      obj = importlib.import_module(module_name)
      for part in qualname.split("."):
        obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
      raise ConfigError(
          f"the run's model class {desc['import']} cannot be imported ({e}); "
          "put its module on the Python path, or load the run in Python with "
          "the model: jaxaccel.load_run(path, model=...)") from None
    return obj(**kwargs)
  return create(desc["name"], num_classes=desc["num_classes"], **kwargs)


def count_params(params) -> int:
  """Number of scalars in a params pytree; a leaf object with a shape (a
  quantized array, say) counts as that many."""
  shaped = lambda x: not isinstance(x, (dict, list, tuple)) and hasattr(x, "shape")
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params, is_leaf=shaped))
