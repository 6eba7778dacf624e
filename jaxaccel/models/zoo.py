"""jaxaccel's own flax.linen models: MLP, CNN and ResNet-18 for small images.

They are ordinary linen modules taking `(x, *, train)`; the core sees them,
like any user's model, only through `jaxaccel.models.adapt`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxaccel.models import MLP
  >>> model = MLP(num_classes=10, widths=(64, 64))
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  >>> model.apply(variables, jnp.zeros((2, 8, 8, 1))).shape
  (2, 10)
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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
  outside one; a matmul is as fast in both places. With `matmul=False`
  (inference, where there is no gradient) it is XLA's own convolution:
  building the patches costs more than the matmul, and the CNN's forward
  pass at batch 1024 runs 5.7x faster (540 ms against 95 ms on 28x28
  images on the 2-core development machine).
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, matmul: bool = True):
    kh, kw = self.kernel_size
    s = self.strides
    n, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, c, self.features))
    out_h, out_w = -(-h // s), -(-w // s)
    pad_h = max((out_h - 1) * s + kh - h, 0)
    pad_w = max((out_w - 1) * s + kw - w, 0)
    padding = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    if matmul:
      x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
      # (n, out_h, out_w, kh * kw * c), taps in the kernel's (i, j, c) order
      cols = jnp.concatenate(
          [x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :]
           for i in range(kh) for j in range(kw)], axis=-1)
      y = jnp.dot(cols.astype(self.dtype),
                  kernel.reshape(kh * kw * c, self.features).astype(self.dtype))
    else:
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype), (s, s), padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
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
    x = x.astype(self.dtype)
    for f in self.features:
      x = nn.relu(Conv(f, (3, 3), dtype=self.dtype)(x, matmul=train))
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
             dtype=self.dtype)(x, matmul=train)
    y = nn.relu(norm("bn1")(y))
    y = Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(
        y, matmul=train)
    y = norm("bn2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = Conv(self.features, (1, 1), self.strides, use_bias=False,
               dtype=self.dtype, name="shortcut")(x, matmul=train)
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
    x = Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(
        x, matmul=train)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             dtype=self.dtype, axis_name=self.axis_name)(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2 ** i, strides, self.dtype,
                       self.axis_name)(x, train=train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
