"""Structured pruning that removes units: a smaller model, not a masked one.

`shrink` scores each hidden unit of an MLP (a Dense output) or each filter of
a CNN (a Conv output channel) by the norm of the weights into it times the
norm of the weights out of it, keeps the best `1 - fraction` of each layer,
and slices the kept units out of that layer's kernel and bias and out of the
next layer's kernel (for the last convolution, out of every position of the
flattened features the first Dense layer reads). The result is the same
kind of model with smaller widths: fewer parameters, fewer FLOPs, and a
faster forward pass with no masks or sparse kernels.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxaccel import models
  >>> model = models.create("mlp", num_classes=10, widths=(300, 100))
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 784)))
  >>> small, small_vars = shrink(model, variables, 0.5)
  >>> small.widths, small_vars["params"]["Dense_1"]["kernel"].shape
  ((150, 50), (150, 50))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import models
from jaxaccel.errors import ConfigError

PyTree = Any


def _norm(w: np.ndarray, unit_axis: int) -> np.ndarray:
  """L2 norm of w per index of `unit_axis`."""
  axes = tuple(i for i in range(w.ndim) if i != unit_axis % w.ndim)
  return np.sqrt(np.sum(np.square(w), axis=axes))


def _keep(score: np.ndarray, fraction: float) -> np.ndarray:
  """Indices of the best `1 - fraction` of the units, in their order."""
  k = max(1, int(round(score.size * (1.0 - fraction))))
  return np.sort(np.argsort(-score, kind="stable")[:k])


def _registry_kind(model) -> tuple[str, dict]:
  desc = models.describe(model) or {}
  name = desc.get("name")
  if name not in ("mlp", "cnn"):
    what = name or type(getattr(model, "module", None) or model).__name__
    raise ConfigError(f"shrink removes units of jaxaccel's mlp and cnn models; "
                      f"got {what}, whose layers it cannot remove (prune with "
                      f"pattern = \"channel\" keeps the shape and masks "
                      f"instead)")
  return name, desc


def _drop_units(p: dict, cur: str, nxt: str, fraction: float) -> int:
  """Removes the weakest `fraction` of layer `cur`'s output units from its
  kernel and bias and from the inputs of layer `nxt` (in place); the number
  kept. A Dense `nxt` after a convolution reads the flattened (h, w,
  channel) features, so a channel is removed at every position."""
  kernel, following = p[cur]["kernel"], p[nxt]["kernel"]
  units = kernel.shape[-1]
  if following.ndim == 4:                      # the next convolution: HWIO
    incoming = following.transpose(2, 0, 1, 3)
  else:                                        # (positions * units, out)
    incoming = following.reshape(-1, units, following.shape[-1]).transpose(1, 0, 2)
  keep = _keep(_norm(kernel, -1) * _norm(incoming, 0), fraction)
  p[cur]["kernel"] = kernel[..., keep]
  p[cur]["bias"] = p[cur]["bias"][keep]
  if following.ndim == 4:
    p[nxt]["kernel"] = following[:, :, keep, :]
  else:
    rows = following.reshape(-1, units, following.shape[-1])[:, keep, :]
    p[nxt]["kernel"] = rows.reshape(-1, following.shape[-1])
  return int(keep.size)


def check_model(model) -> None:
  """A ConfigError unless shrink can remove units of `model`."""
  _registry_kind(model)


def shrink(model, variables: dict, fraction: float) -> tuple[Any, dict]:
  """The model with `fraction` of every hidden layer's units removed.

  Args:
    model: a registry `mlp` or `cnn` (`jaxaccel.models.create`).
    variables: its trained variables.
    fraction: in (0, 1): the share of units removed from each hidden layer.

  Returns:
    (the smaller model, its variables).
  """
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
      or not 0.0 < fraction < 1.0:
    raise ConfigError(f"shrink fraction must lie in (0, 1) (the share of "
                      f"units removed); got {fraction!r}")
  name, desc = _registry_kind(model)
  p = {k: dict(v) for k, v in jax.tree.map(np.asarray,
                                            dict(variables["params"])).items()}
  if name == "mlp":
    layers = [f"Dense_{i}" for i in range(len(desc["kwargs"]["widths"]) + 1)]
    kwargs = {"widths": tuple(_drop_units(p, cur, nxt, fraction)
                              for cur, nxt in zip(layers, layers[1:]))}
  else:
    convs = [f"Conv_{i}" for i in range(len(desc["kwargs"]["features"]))]
    features = tuple(_drop_units(p, cur, nxt, fraction)
                     for cur, nxt in zip(convs, convs[1:] + ["Dense_0"]))
    kwargs = {"features": features,
              "hidden": _drop_units(p, "Dense_0", "Dense_1", fraction)}
  small = models.create(name, num_classes=desc["num_classes"],
                        **{**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in desc["kwargs"].items()}, **kwargs})
  params = jax.tree.map(jnp.asarray, p)
  rest = {k: v for k, v in variables.items() if k != "params"}
  return small, {"params": params, **rest}


def flops(model, variables: dict, sample: np.ndarray) -> int:
  """Floating-point operations of one eval forward pass on `sample` (one
  batch), as XLA's cost analysis counts them."""
  adapter = models.adapt(model)
  fn = jax.jit(lambda x: adapter.logits(variables, x))
  cost = fn.lower(jnp.asarray(sample)).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return int(cost.get("flops", 0))
