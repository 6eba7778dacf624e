"""flax.linen models and the name -> model registry the command line uses.

Models are used only through `model.init(rng, x)` and
`model.apply(variables, x, train=..., mutable=...)`. Every model takes
`train` so batch norm can switch between batch and running statistics.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxaccel.models import create
  >>> model = create("mlp", num_classes=10, widths=(64, 64))
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  >>> model.apply(variables, jnp.zeros((2, 8, 8, 1))).shape
  (2, 10)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccel.errors import ConfigError, DataError


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 on NHWC, as a reshape and a max.

  Equal to `nn.max_pool(x, (2, 2), (2, 2))` (odd trailing rows and columns are
  dropped, as VALID padding does), and much faster on XLA:CPU, whose
  reduce-window gradient is slow.
  """
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv(nn.Module):
  """2-D convolution (NHWC, SAME padding) as shifted slices and one matmul.

  Same parameters and result as `nn.Conv(features, kernel_size, strides,
  padding="SAME")`. XLA:CPU runs a convolution's gradient more than ten
  times slower inside a loop (the compiled epoch is a `lax.scan`) than
  outside one; a matmul is as fast in both places.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    s = self.strides
    n, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, c, self.features))
    out_h, out_w = -(-h // s), -(-w // s)
    pad_h = max((out_h - 1) * s + kh - h, 0)
    pad_w = max((out_w - 1) * s + kw - w, 0)
    x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                    (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    # (n, out_h, out_w, kh * kw * c), taps in the kernel's (i, j, c) order
    cols = jnp.concatenate(
        [x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :]
         for i in range(kh) for j in range(kw)], axis=-1)
    y = jnp.dot(cols.astype(self.dtype),
                kernel.reshape(kh * kw * c, self.features).astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(
          self.dtype)
    return y


class MLP(nn.Module):
  """Dense layers with ReLU; inputs of any shape are flattened first."""
  num_classes: int = 10
  widths: Sequence[int] = (300, 100)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for width in self.widths:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class CNN(nn.Module):
  """Two 3x3 conv + 2x2 max-pool blocks, then two dense layers."""
  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = x.astype(self.dtype)
    for f in self.features:
      x = nn.relu(Conv(f, (3, 3), dtype=self.dtype)(x))
      x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs with batch norm and an identity (or 1x1) shortcut."""
  features: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None   # average batch statistics over this axis

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train,
                                     momentum=0.9, dtype=self.dtype,
                                     axis_name=self.axis_name, name=name)
    y = Conv(self.features, (3, 3), self.strides, use_bias=False,
             dtype=self.dtype)(x)
    y = nn.relu(norm("bn1")(y))
    y = Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(y)
    y = norm("bn2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = Conv(self.features, (1, 1), self.strides, use_bias=False,
               dtype=self.dtype, name="shortcut")(x)
      x = norm("bn_shortcut")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet-18 layout for small images: a 3x3 stem with no max pool, four
  stages of basic blocks (64..512 channels), global average pooling."""
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  dtype: jnp.dtype = jnp.float32
  # Batch statistics are averaged over this named axis (set under pmap).
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = x.astype(self.dtype)
    x = Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             dtype=self.dtype, axis_name=self.axis_name)(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2 ** i, strides, self.dtype,
                       self.axis_name)(x, train=train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet18": ResNet,
}
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
  if num_classes < 2:
    raise ConfigError(f"num_classes must be at least 2; got {num_classes}")
  return cls(num_classes=num_classes, **kwargs)


def parse_model_spec(spec: str) -> tuple[str, dict]:
  """Reads the command line's model spelling: `mlp`, `mlp:300,100`, `cnn:32,64`.

  The numbers after the colon are the hidden widths (MLP) or conv features
  (CNN) or the base width (ResNet).
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


def describe(model: nn.Module) -> dict | None:
  """The registry name and options of a model, or None if not registered."""
  for name, cls in MODELS.items():
    if type(model) is cls:
      fields = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes"}
      kwargs = {f: getattr(model, f) for f in sorted(fields)}
      kwargs = {k: list(v) if isinstance(v, (tuple, list)) else v
                for k, v in kwargs.items() if k not in ("dtype", "axis_name")}
      return {"name": name, "num_classes": model.num_classes, "kwargs": kwargs}
  return None


def from_description(desc: dict) -> nn.Module:
  """Rebuilds a model from `describe`'s output."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in desc["kwargs"].items()}
  return create(desc["name"], num_classes=desc["num_classes"], **kwargs)


def count_params(params) -> int:
  """Number of scalars in a params pytree."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
