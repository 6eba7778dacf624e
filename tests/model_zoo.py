"""Models written the way users write them, for the any-model tests.

None of these knows jaxaccel: each is plain flax linen, flax NNX, or plain
JAX, as in flax's own examples. They are sized for 8x8 digits.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class ExamplesCNN(nn.Module):
  """The flax examples' MNIST CNN: no train argument at all."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


class TrainingMLP(nn.Module):
  """A linen model taking `training`, with dropout and batch norm."""
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, training: bool):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(128)(x)
    x = nn.BatchNorm(use_running_average=not training, momentum=0.9)(x)
    x = nn.relu(x)
    x = nn.Dropout(rate=self.dropout_rate, deterministic=not training)(x)
    return nn.Dense(10)(x)


class NNXCNN(nnx.Module):
  """An NNX CNN with batch norm and dropout, as in flax's NNX basics."""

  def __init__(self, *, dropout_rate: float = 0.1, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.linear1 = nnx.Linear(32 * 4 * 4, 64, rngs=rngs)
    self.linear2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout(nnx.relu(self.linear1(x)))
    return self.linear2(x)


class NNXMLP(nnx.Module):
  """An NNX MLP whose hidden layers sit in a list."""

  def __init__(self, din: int, widths, dout: int, *, rngs: nnx.Rngs):
    sizes = [din, *widths]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], dout, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.out(x)


class Block(nnx.Module):
  """Pre-norm transformer block: attention, then an MLP."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=heads, in_features=dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.mlp_out = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x, mask=None):
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class ViT(nnx.Module):
  """A small vision transformer: 2x2 patches, two blocks, mean pooling."""

  def __init__(self, *, dim: int = 32, heads: int = 4, patch: int = 2,
               tokens: int = 16, rngs: nnx.Rngs):
    self.patch = patch
    self.embed = nnx.Conv(1, dim, kernel_size=(patch, patch),
                          strides=(patch, patch), rngs=rngs)
    self.position = nnx.Param(
        jax.random.normal(rngs.params(), (1, tokens, dim)) * 0.02)
    self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(2)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, 10, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)                                 # (n, 4, 4, dim)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(axis=1))


class NNXGPT(nnx.Module):
  """A user's byte-level GPT: token and position embeddings, causal blocks,
  a separate output layer."""

  def __init__(self, *, dim: int = 32, heads: int = 2, layers: int = 1,
               context: int = 32, rngs: nnx.Rngs):
    self.context = context
    self.embed = nnx.Embed(256, dim, rngs=rngs)
    self.position = nnx.Param(
        jax.random.normal(rngs.params(), (context, dim)) * 0.02)
    self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, 256, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x) + self.position[...][:x.shape[1]]
    mask = nnx.make_causal_mask(x)
    for block in self.blocks:
      h = block(h, mask)
    return self.head(self.norm(h))


def mlp_init(key, sample):
  """Plain-JAX MLP 64-64-10: a list of (w, b)."""
  sizes = [sample[0].size, 64, 10]
  keys = jax.random.split(key, len(sizes) - 1)
  return [(jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), jnp.zeros(b))
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params, x):
  x = x.reshape(x.shape[0], -1)
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


class HandViT(nnx.Module):
  """Attention written by hand, as a user would: one fused qkv projection
  cut with `jnp.split`, heads taken with basic slicing and
  `lax.slice_in_dim`, patches by a reshape."""

  def __init__(self, dim: int = 16, heads: int = 2, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(4, dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.head = nnx.Linear(dim, 10, rngs=rngs)
    self.heads, self.dim = heads, dim

  def __call__(self, x):
    h = self.embed(x.reshape(x.shape[0], 16, 4))     # 16 patches of 4 pixels
    q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
    d = self.dim // self.heads
    outs = []
    for i in range(self.heads):
      qi = q[..., i * d:(i + 1) * d]
      ki = jax.lax.slice_in_dim(k, i * d, (i + 1) * d, axis=2)
      vi = v[:, :, i * d:(i + 1) * d]
      weights = jax.nn.softmax(qi @ ki.transpose(0, 2, 1) / d ** 0.5, axis=-1)
      outs.append(weights @ vi)
    h = h + self.proj(jnp.concatenate(outs, axis=-1))
    return self.head(h.mean(axis=1))
