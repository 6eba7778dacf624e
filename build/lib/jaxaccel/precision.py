"""Mixed precision: compute dtypes and dynamic loss scaling.

A policy keeps the parameters and the optimizer state in float32 (the master
copy) and runs the model's matmuls and convolutions in a lower precision:

* `fp32`: everything in float32 (the default);
* `bf16`: bfloat16 compute. bfloat16 has float32's exponent range, so
  gradients need no scaling;
* `fp16`: float16 compute with dynamic loss scaling: the loss is multiplied
  by a scale before differentiation, the gradients divided by it after; a
  step whose scaled gradients overflow is skipped and the scale halved, and
  after `growth_interval` good steps in a row the scale doubles.

Loss scaling is an optax transformation (`loss_scaled`) whose state holds
the scale, so it is checkpointed with the rest of the optimizer state.

Examples:
  >>> import jax.numpy as jnp, optax
  >>> from jaxaccel import precision
  >>> tx = precision.loss_scaled(optax.sgd(0.1), initial_scale=2.0 ** 15)
  >>> state = tx.init({"w": jnp.zeros(3)})
  >>> float(state.scale)
  32768.0
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccel.errors import ConfigError
from jaxaccel.models import adapt

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class Policy:
  """Which dtype the model computes in, and whether the loss is scaled."""
  name: str
  compute_dtype: Any
  loss_scaling: bool


def get_policy(name: str) -> Policy:
  """The policy called `name`: "fp32", "bf16" or "fp16"."""
  if name not in PRECISIONS:
    raise ConfigError(f"unknown precision {name!r}: use one of "
                      f"{', '.join(PRECISIONS)}")
  dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}[name]
  return Policy(name=name, compute_dtype=dtype, loss_scaling=name == "fp16")


def cast_model(model, policy: Policy):
  """The model (any kind `models.adapt` takes) computing in the policy's
  dtype, as an adapter; its params stay float32.

  A linen module with a `dtype` field is cloned with that dtype, so its
  layers cast their float32 params for the computation only; any other
  model runs on params and inputs cast to the dtype.
  """
  return adapt(model).with_compute_dtype(policy.compute_dtype)


class LossScaleState(NamedTuple):
  """Dynamic loss scale around an inner optimizer state."""
  scale: jax.Array         # (), float32
  good_steps: jax.Array    # (), int32: finite steps since the last change
  inner: optax.OptState


def loss_scaled(tx: optax.GradientTransformation, *,
                initial_scale: float = 2.0 ** 15, growth_interval: int = 2000,
                factor: float = 2.0, min_scale: float = 1.0
                ) -> optax.GradientTransformation:
  """Wraps `tx` so it takes gradients of a scaled loss.

  The gradients given to `update` are those of `loss * scale` (see
  `LossScaleState.scale`). They are divided by the scale; when any is not
  finite the step changes nothing (zero updates, inner state kept) and the
  scale is divided by `factor`. After `growth_interval` finite steps in a row
  the scale is multiplied by `factor`.

  Args:
    tx: the optimizer to run on the unscaled gradients.
    initial_scale: the first scale.
    growth_interval: finite steps in a row before the scale grows.
    factor: how much the scale shrinks on overflow and grows after a run.
    min_scale: the scale never drops below this.
  """
  if initial_scale <= 0 or growth_interval <= 0 or factor <= 1.0:
    raise ConfigError(
        f"loss scaling needs initial_scale > 0, growth_interval > 0 and "
        f"factor > 1; got {initial_scale}, {growth_interval}, {factor}")

  def init_fn(params):
    return LossScaleState(scale=jnp.asarray(initial_scale, jnp.float32),
                          good_steps=jnp.zeros((), jnp.int32),
                          inner=tx.init(params))

  def update_fn(updates, state, params=None):
    grads = jax.tree.map(lambda g: g / state.scale.astype(g.dtype), updates)
    finite = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

    def good(_):
      new_updates, inner = tx.update(grads, state.inner, params)
      grow = state.good_steps + 1 >= growth_interval
      scale = jnp.where(grow, state.scale * factor, state.scale)
      return new_updates, LossScaleState(
          scale=scale, good_steps=jnp.where(grow, 0, state.good_steps + 1),
          inner=inner)

    def overflow(_):
      zeros = jax.tree.map(jnp.zeros_like, updates)
      return zeros, LossScaleState(
          scale=jnp.maximum(state.scale / factor, min_scale),
          good_steps=jnp.zeros((), jnp.int32), inner=state.inner)

    return jax.lax.cond(finite, good, overflow, None)

  return optax.GradientTransformation(init_fn, update_fn)


def is_loss_scaled(opt_state) -> bool:
  """True when the optimizer state comes from `loss_scaled`."""
  return isinstance(opt_state, LossScaleState)


def apply_policy(model, tx: optax.GradientTransformation, policy: Policy | str):
  """The model (as an adapter) and optimizer a policy trains with."""
  if isinstance(policy, str):
    policy = get_policy(policy)
  model = cast_model(model, policy)
  if policy.loss_scaling:
    tx = loss_scaled(tx)
  return model, tx
