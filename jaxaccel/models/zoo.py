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

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import backends


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 on NHWC, as a reshape and a max.

  Equal to `nn.max_pool(x, (2, 2), (2, 2))` in values and gradients (odd
  trailing rows and columns are dropped, as VALID padding does; at ties the
  first maximum in the window takes the gradient), and much faster on
  XLA:CPU: 2.6 ms forward and backward at 128x28x28x32 on the development
  machine, against 41 ms for `nn.max_pool`'s reduce-window gradient and
  3.4 ms for JAX's own gradient of the reshaped max. Off the CPU
  (`backends.formulation()`) the reshaped max keeps JAX's gradient.
  """
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  if backends.formulation() == "cpu":
    return _max_pool(x)
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@jax.custom_vjp
def _max_pool(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_fwd(x):
  # Differentiated (training), the pool is an elementwise maximum of four
  # strided slices, which XLA:CPU fuses with the bias and ReLU before it
  # into one vectorized loop; the reduce over the window's axes of the
  # 6-D view ran 3-7x slower. Inference keeps the reshape and max, which
  # the int8 and ONNX paths read as a pool.
  rows = jnp.maximum(x[:, 0::2], x[:, 1::2])
  y = jnp.maximum(rows[:, :, 0::2], rows[:, :, 1::2])
  return y, (x, y)


def _max_pool_bwd(residuals, g):
  x, y = residuals
  n, h, w, c = x.shape
  # On the (n, h/2, 2, w/2, 2, c) view: a window element takes the gradient
  # when it equals the maximum and no element before it (row-major) does.
  hit = x.reshape(n, h // 2, 2, w // 2, 2, c) == y[:, :, None, :, None, :]
  before = jnp.zeros(hit.shape, bool)
  for i, j in ((0, 0), (0, 1), (1, 0)):
    later = np.zeros((1, 1, 2, 1, 2, 1), bool)
    later.reshape(4)[2 * i + j + 1:] = True
    before = before | (hit[:, :, i:i + 1, :, j:j + 1, :] & later)
  grad = jnp.where(hit & ~before, g[:, :, None, :, None, :], 0)
  return (grad.reshape(n, h, w, c).astype(g.dtype),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` over the last axis, whose bias gradient is a matrix-vector
  product: XLA:CPU sums a 128x28x28x32 gradient over its rows in 3.1 ms as
  a reduction and in 0.8 ms as a product with a vector of ones."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  rows = g.reshape(-1, g.shape[-1])
  total = jnp.dot(jnp.ones(rows.shape[0], g.dtype), rows,
                  preferred_element_type=jnp.float32)
  return g, total.astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


_NHWC = ("NHWC", "HWIO", "NHWC")


def shifted_windows(xp: jax.Array, kernel_hw, out_hw, strides) -> list:
  """The kh * kw windows of a padded NHWC input that a convolution's kernel
  taps read, row-major over the taps, each (n, out_h, out_w, c)."""
  (kh, kw), (oh, ow), (sh, sw) = kernel_hw, out_hw, strides
  return [xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]
          for i in range(kh) for j in range(kw)]


def _conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """`lax.conv_general_dilated` on NHWC inputs and HWIO kernels whose
  gradient is two more convolutions in the same NHWC / HWIO layout, with
  neither dilated (a strided one's gradient is taken by phases).

  XLA:CPU runs a convolution on Eigen's fast kernels only in that layout.
  Outside a loop its layout pass rewrites the gradient's convolutions into
  it; inside a `lax.scan` (a compiled epoch) it does not, and they fall to
  a slow generic loop: the flax examples' CNN trained 20x slower scanned
  than stepped. Written out here, the gradient is fast in both places.
  """
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return conv2d(x, kernel, strides, padding), (x, kernel)


def _kernel_grad(xp, dy):
  """The kernel gradient of a stride-1 convolution over `xp`, an input
  padded and cropped to the output's size plus the taps' span less one:
  (kh, kw, c_in, c_out) with kh, kw = xp's spatial size - dy's + 1."""
  taps = tuple(xp.shape[d] - dy.shape[d] + 1 for d in (1, 2))
  if taps[0] * taps[1] * xp.shape[3] < backends.SMALL_KERNEL_INPUTS:
    # Few inputs per output (a first layer on one channel): one matmul of
    # the input's shifted windows (im2col, small here) with dy as it is,
    # which the bias gradient reads too; no transpose of dy.
    windows = jnp.concatenate(
        shifted_windows(xp, taps, dy.shape[1:3], (1, 1)), axis=-1)
    dk = jax.lax.dot_general(windows, dy, (((0, 1, 2), (0, 1, 2)), ((), ())),
                             preferred_element_type=jnp.float32)
    return dk.reshape(*taps, xp.shape[3], dy.shape[3])
  # A convolution over the input with batch and features swapped, dy as
  # the kernel.
  return _conv(xp.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
               ((0, 0), (0, 0))).transpose(1, 2, 0, 3)


def _phases(k, s):
  """For an axis of k taps and stride s: each residue r and its taps' count
  (the taps r, r + s, ... below k)."""
  return [(r, max(0, -(-(k - r) // s))) for r in range(s)]


def _conv2d_bwd(strides, padding, residuals, dy):
  """Both gradients by phases. Kernel tap i = r + s * t of an axis with
  stride s reads the padded input's rows r, r + s, ...: per residue pair
  (r0, r1) both gradients are stride-1 convolutions with that subset of
  the taps, and the input gradient's phases are interleaved. At stride 1
  there is one phase: the transposed convolution and the kernel gradient.
  (Written with dilations instead, dy dilated by the strides, XLA:CPU ran
  a strided layer's gradients on a generic loop: 95 ms against 52 ms by
  phases for a 128x28x28x64 -> 128 3x3 stride-2 layer, forward 13 ms.)"""
  x, kernel = residuals
  k, size, out = kernel.shape[:2], x.shape[1:3], dy.shape[1:3]
  (n, c), (s0, s1) = (x.shape[0], x.shape[3]), strides
  lo = [padding[d][0] for d in range(2)]
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  # the padded input's rows m = u * s + r, u in [u0, u1), cover x's rows
  # lo .. lo + size - 1
  u0 = [lo[d] // strides[d] for d in range(2)]
  u1 = [-(-(lo[d] + size[d]) // strides[d]) for d in range(2)]
  phases = [_phases(k[d], strides[d]) for d in range(2)]
  most = [max(t for _, t in phases[d]) for d in range(2)]
  dx_parts, dk_parts = [], []
  for r0, t0 in phases[0]:
    dx_row, dk_row = [], []
    for r1, t1 in phases[1]:
      if t0 and t1:
        sub = kernel[r0::s0, r1::s1]                 # (t0, t1, c_in, c_out)
        # dx at rows u * s + r: sum over t of dy[u - t] * sub[t], a
        # convolution of dy with the flipped taps
        pads = [(t - 1 - a, b - o) for t, a, b, o in zip((t0, t1), u0, u1, out)]
        dx_row.append(_conv(dy, jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2),
                            (1, 1), pads))
        # dk at taps r + s * t: the phase's rows r, r + s, ... against dy
        phase = xp[:, r0::s0, r1::s1][:, :out[0] + t0 - 1, :out[1] + t1 - 1]
        dk = _kernel_grad(phase, dy)
      else:   # no tap of the kernel reads this phase
        dx_row.append(jnp.zeros((n, u1[0] - u0[0], u1[1] - u0[1], c),
                                dy.dtype))
        dk = jnp.zeros((t0, t1, *kernel.shape[2:]), jnp.float32)
      dk_row.append(jnp.pad(dk, ((0, most[0] - t0), (0, most[1] - t1),
                                 (0, 0), (0, 0))))
    dx_parts.append(dx_row)
    dk_parts.append(dk_row)
  # dx: (n, u, s0, v, s1, c) -> rows u * s0 + r0, cropped to x's rows
  dx = jnp.stack([jnp.stack(row, axis=3) for row in dx_parts], axis=2)
  dx = dx.reshape(n, (u1[0] - u0[0]) * s0, (u1[1] - u0[1]) * s1, c)
  top, left = lo[0] - u0[0] * s0, lo[1] - u0[1] * s1
  dx = dx[:, top:top + size[0], left:left + size[1]]
  # dk: (t0, s0, t1, s1, ...) -> taps t * s + r, cropped to the kernel's
  dk = jnp.stack([jnp.stack(row, axis=2).reshape(most[0], most[1] * s1,
                                                 *kernel.shape[2:])
                  for row in dk_parts], axis=1)
  dk = dk.reshape(most[0] * s0, most[1] * s1, *kernel.shape[2:])
  return dx.astype(x.dtype), dk[:k[0], :k[1]].astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """2-D convolution, NHWC and SAME padding: `nn.Conv(features,
  kernel_size, strides, padding="SAME")` with the same parameters and
  result. With `train=True` on the CPU (`backends.formulation()`) its
  gradient is `conv2d`'s, fast inside the compiled epoch on XLA:CPU;
  otherwise (another backend, inference, export, int8) it is one plain
  `lax.conv_general_dilated` with JAX's gradient.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    kh, kw = self.kernel_size
    s = self.strides
    n, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, c, self.features))
    out_h, out_w = -(-h // s), -(-w // s)
    pad_h = max((out_h - 1) * s + kh - h, 0)
    pad_w = max((out_w - 1) * s + kw - w, 0)
    padding = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    cpu = train and backends.formulation() == "cpu"
    y = (conv2d if cpu else _conv)(x, kernel, (s, s), padding)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,))
      y = (add_bias if cpu else jnp.add)(y, bias.astype(self.dtype))
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
      x = nn.relu(Conv(f, (3, 3), dtype=self.dtype)(x, train=train))
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
             dtype=self.dtype)(x, train=train)
    y = nn.relu(norm("bn1")(y))
    y = Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(
        y, train=train)
    y = norm("bn2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = Conv(self.features, (1, 1), self.strides, use_bias=False,
               dtype=self.dtype, name="shortcut")(x, train=train)
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
        x, train=train)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             dtype=self.dtype, axis_name=self.axis_name)(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2 ** i, strides, self.dtype,
                       self.axis_name)(x, train=train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class CachedAttention(nn.Module):
  """Causal self-attention for decoding: the new positions' keys and values
  are written into the "cache" collection at `start`, and each new position
  attends to every cached position up to its own. Its parameters are those
  of `nn.MultiHeadDotProductAttention` (query, key, value, out), so a
  trained model decodes with the weights it trained with; any number of new
  positions per call (a whole prompt at once, then one token at a time)."""
  heads: int
  width: int
  context: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, start):
    n, length = x.shape[:2]
    heads, depth = self.heads, self.width // self.heads
    q, k, v = (nn.DenseGeneral((heads, depth), dtype=self.dtype, name=name)(x)
               for name in ("query", "key", "value"))
    cached = [self.variable("cache", name, jnp.zeros,
                            (n, self.context, heads, depth), k.dtype)
              for name in ("cached_key", "cached_value")]
    for var, new in zip(cached, (k, v)):
      var.value = jax.lax.dynamic_update_slice(
          var.value, new.astype(var.value.dtype), (0, start, 0, 0))
    keys, values = cached[0].value, cached[1].value
    q = q / jnp.sqrt(depth).astype(q.dtype)
    # New position start + i sees the cached positions 0 .. start + i.
    seen = (jnp.arange(self.context)[None, :]
            <= start + jnp.arange(length)[:, None])
    # The cache keeps positions before heads, so writing new positions
    # writes whole rows; it is read heads first, where both products are
    # plain batched matmuls (3x faster on XLA:CPU for 32 x 128 new positions
    # than products on the position-major layout, and faster for one).
    keys, values = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
    scores = jnp.einsum("nhtd,nhsd->nhts", q.transpose(0, 2, 1, 3), keys)
    scores = jnp.where(seen, scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    h = jnp.einsum("nhts,nhsd->nhtd", weights, values).transpose(0, 2, 1, 3)
    return nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype,
                           name="out")(h)


class GPTBlock(nn.Module):
  """A pre-norm decoder block: causal self-attention, then a GELU MLP, each
  added back to its input. With `decode`, attention reads and extends the
  key/value cache from position `start` (`CachedAttention`)."""
  heads: int
  width: int
  dropout: float = 0.0
  decode: bool = False
  dtype: jnp.dtype = jnp.float32
  mlp: int | None = None     # the MLP's hidden units (4 x width)
  context: int = 0           # the cache's length, with decode

  @nn.compact
  def __call__(self, x, mask, *, train: bool = False, start=None):
    h = nn.LayerNorm(dtype=self.dtype)(x)
    if self.decode:
      h = CachedAttention(self.heads, self.width, self.context, self.dtype,
                          name="attention")(h, start)
    else:
      h = nn.MultiHeadDotProductAttention(
          num_heads=self.heads, qkv_features=self.width, dtype=self.dtype,
          dropout_rate=self.dropout, name="attention")(
              h, mask=mask, deterministic=not train)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.gelu(nn.Dense(self.mlp or 4 * self.width, dtype=self.dtype,
                         name="mlp_in")(h))
    h = nn.Dense(self.width, dtype=self.dtype, name="mlp_out")(h)
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class GPT(nn.Module):
  """A decoder-only transformer over bytes: token and learned position
  embeddings, `layers` pre-norm blocks, a final layer norm, and the output
  projection (the token embedding itself when `tie`).

  Inputs are integer ids (n, length) with length <= `context`; outputs are
  logits (n, length, num_classes). With `decode=True` the model keeps keys,
  values and its position in the "cache" collection and each call takes the
  positions that follow the cached ones: a prompt in one call, then a token
  per call (initialize the cache with `model.init` on any input and zero it,
  or start from `init_cache`).
  """
  num_classes: int = 256
  layers: int = 4
  heads: int = 4
  width: int = 128
  context: int = 128
  dropout: float = 0.0
  tie: bool = True
  decode: bool = False
  dtype: jnp.dtype = jnp.float32
  # Each block's MLP hidden units; None is 4 x width (`shrink` sets fewer).
  mlp: int | None = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    length = x.shape[1]
    embed = nn.Embed(self.num_classes, self.width, name="embed",
                     embedding_init=nn.initializers.normal(0.02))
    positions = self.param("positions", nn.initializers.normal(0.02),
                           (self.context, self.width))
    start, mask = None, None
    if self.decode:          # the new positions follow the cached ones
      index = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      start = index.value
      pos = jax.lax.dynamic_slice_in_dim(positions, start, length)
      index.value = start + length
    else:
      pos = positions[:length]
      mask = nn.make_causal_mask(x)
    h = embed(x).astype(self.dtype) + pos.astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    for i in range(self.layers):
      h = GPTBlock(self.heads, self.width, self.dropout, self.decode,
                   self.dtype, self.mlp, self.context, name=f"block_{i}")(
                       h, mask, train=train, start=start)
    h = nn.LayerNorm(dtype=self.dtype)(h)
    if self.tie:
      return embed.attend(h.astype(jnp.float32))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)
