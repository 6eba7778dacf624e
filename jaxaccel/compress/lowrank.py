"""Low-rank factorization of dense kernels by truncated SVD.

`factorize` maps an MLP's params to those of `LowRankMLP`: each kernel W
(in, out) becomes U_r sqrt(S_r) (in, r) and sqrt(S_r) V_r^T (r, out), the
best rank-r approximation of W. The result is an ordinary params pytree of
an ordinary flax model, so it can be fine-tuned with `fit`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxaccel import models
  >>> mlp = models.create("mlp", num_classes=3, widths=(8,))
  >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  >>> low, ranks = factorize(params, rank=2)
  >>> ranks, low["Dense_0"]["kernel_u"].shape, low["Dense_0"]["kernel_v"].shape
  ((2, 2), (6, 2), (2, 8))
  >>> LowRankMLP(num_classes=3, widths=(8,), ranks=ranks).apply(
  ...     {"params": low}, jnp.ones((1, 6))).shape
  (1, 3)
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxaccel.errors import ConfigError

PyTree = Any


class LowRankDense(nn.Module):
  """x @ kernel_u @ kernel_v + bias: a dense layer of rank `rank`."""
  features: int
  rank: int

  @nn.compact
  def __call__(self, x):
    u = self.param("kernel_u", nn.initializers.lecun_normal(),
                   (x.shape[-1], self.rank))
    v = self.param("kernel_v", nn.initializers.lecun_normal(),
                   (self.rank, self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    return (x @ u) @ v + b


class LowRankMLP(nn.Module):
  """The registry's MLP with every dense layer factorized (ranks per layer,
  the output layer last)."""
  num_classes: int = 10
  widths: Sequence[int] = (300, 100)
  ranks: Sequence[int] = (32, 32, 10)

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    if len(self.ranks) != len(self.widths) + 1:
      raise ConfigError(f"LowRankMLP needs one rank per dense layer "
                        f"({len(self.widths) + 1}); got {tuple(self.ranks)}")
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    features = list(self.widths) + [self.num_classes]
    for i, (f, r) in enumerate(zip(features, self.ranks)):
      x = LowRankDense(f, r, name=f"Dense_{i}")(x)
      if i < len(features) - 1:
        x = nn.relu(x)
    return x


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
  """Smallest r whose top singular values hold `energy` of sum(s^2)."""
  s2 = np.asarray(singular_values, np.float64) ** 2
  cumulative = np.cumsum(s2) / max(s2.sum(), 1e-300)
  return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(s2)))


def _dense_names(params: PyTree) -> list[str]:
  """Names Dense_0..Dense_k of an MLP's params, in order, checked."""
  names = sorted((k for k in params if k.startswith("Dense_")),
                 key=lambda k: int(k.split("_")[1]))
  if not names or set(params) != set(names) or any(
      set(params[n]) != {"kernel", "bias"} or len(params[n]["kernel"].shape) != 2
      for n in names):
    raise ConfigError("factorize takes MLP params (Dense_0..Dense_k with 2-D "
                      f"kernels and biases); got layers {sorted(params)}")
  return names


def factorize(params: PyTree, *, rank: int | Sequence[int] | None = None,
              energy: float | None = None) -> tuple[PyTree, tuple[int, ...]]:
  """Truncated SVD of every dense kernel of an MLP.

  Args:
    params: MLP params (`models.create("mlp", ...)`).
    rank: one rank for all layers, or one per layer; a rank outside
      1..min(in, out) of its layer is an error.
    energy: instead of a rank: keep the fewest singular values holding this
      fraction of each kernel's squared Frobenius norm, in (0, 1].

  Returns:
    (params of `LowRankMLP`, the ranks used per layer).
  """
  if (rank is None) == (energy is None):
    raise ConfigError("factorize needs exactly one of rank=... or energy=...")
  names = _dense_names(params)
  if energy is not None and not 0.0 < energy <= 1.0:
    raise ConfigError(f"energy must lie in (0, 1]; got {energy}")
  if rank is not None:
    ranks = [rank] * len(names) if isinstance(rank, int) else list(rank)
    if len(ranks) != len(names):
      raise ConfigError(f"got {len(ranks)} ranks for {len(names)} dense layers")
  out, used = {}, []
  for i, name in enumerate(names):
    w = np.asarray(params[name]["kernel"], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    if rank is not None:
      r = ranks[i]
      if not 1 <= r <= len(s):
        raise ConfigError(f"rank {r} does not fit layer {name} of shape "
                          f"{w.shape}: use a rank from 1 to {len(s)}")
    else:
      r = rank_for_energy(s, energy)
    root = np.sqrt(s[:r])
    out[name] = {"kernel_u": jnp.asarray(u[:, :r] * root, jnp.float32),
                 "kernel_v": jnp.asarray(root[:, None] * vt[:r], jnp.float32),
                 "bias": params[name]["bias"]}
    used.append(r)
  return out, tuple(used)


def lowrank_model(model, ranks: Sequence[int]) -> LowRankMLP:
  """The `LowRankMLP` matching a registry MLP and `factorize`'s ranks."""
  widths = getattr(model, "widths", None)
  if widths is None:
    raise ConfigError(f"low-rank factorization supports the MLP; got "
                      f"{type(model).__name__}")
  return LowRankMLP(num_classes=model.num_classes, widths=tuple(widths),
                    ranks=tuple(ranks))
