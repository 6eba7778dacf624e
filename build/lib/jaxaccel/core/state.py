"""TrainState and the one place that builds it.

Examples:
  >>> import optax
  >>> from jaxaccel import models
  >>> from jaxaccel.core import init_state
  >>> state = init_state(models.MLP(num_classes=3, widths=(4,)),
  ...                    optax.sgd(0.1), (5,), seed=0)
  >>> int(state.step), sorted(state.params)
  (0, ['Dense_0', 'Dense_1'])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccel import optim
from jaxaccel.errors import CheckpointError
from jaxaccel.models import adapt

PyTree = Any


class TrainState(NamedTuple):
  """Everything that changes during training, as one pytree."""
  step: jax.Array          # (), int32: steps taken, skipped ones included
  params: PyTree
  model_state: PyTree      # what the model carries besides params (batch_stats)
  opt_state: PyTree
  rng: jax.Array           # typed PRNG key for augmentation and dropout


def variables_of(state: TrainState) -> dict:
  """The variables (params and model state) held in a train state."""
  return {"params": state.params, **state.model_state}


def init_variables(model, input_shape, *, seed: int = 0,
                   dtype=jnp.float32) -> tuple[dict, jax.Array]:
  """The model's initial variables for a seed (traced on one input of
  `input_shape` and `dtype`), and the state's first key."""
  init_key, rng = jax.random.split(jax.random.key(seed))
  params, model_state = adapt(model).init(
      init_key, jnp.zeros((1, *input_shape), dtype))
  return {"params": params, **model_state}, rng


def init_state(model, tx: optax.GradientTransformation, input_shape, *,
               seed: int = 0, variables: dict | None = None,
               dtype=jnp.float32) -> TrainState:
  """A fresh train state: the model's initial variables for `seed` (or the
  given `variables`, see `warm_start`), the optimizer state, the first key.
  `dtype` is the inputs' (integers for token ids)."""
  if variables is None:
    variables, rng = init_variables(model, input_shape, seed=seed, dtype=dtype)
  else:
    rng = jax.random.split(jax.random.key(seed))[1]
  return state_from_variables(variables, tx, rng)


def state_from_variables(variables: dict, tx: optax.GradientTransformation,
                         rng: jax.Array) -> TrainState:
  """A train state at step 0 holding `variables` (`{"params": ..., **model
  state}`), a fresh optimizer state and the key `rng`; traceable, so sweeps
  build many at once under `vmap`."""
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=variables, opt_state=tx.init(params), rng=rng)


def warm_start(model, source: dict, input_shape, *,
               seed: int = 0) -> tuple[dict, list[str]]:
  """Fresh variables for `model` with every entry of `source` whose path and
  shape match copied in: transfer learning keeps the body of a trained model
  and gives a new head (say, for other classes) a fresh initialization.

  Returns:
    (variables, the paths copied from `source`).
  """
  fresh, _ = init_variables(model, input_shape, seed=seed)
  flat_source = {jax.tree_util.keystr(p): v
                 for p, v in jax.tree_util.tree_leaves_with_path(source)}
  copied = []

  def take(path, v):
    old = flat_source.get(jax.tree_util.keystr(path))
    if old is not None and old.shape == v.shape and old.dtype == v.dtype:
      copied.append(optim.param_path(path))
      return jnp.asarray(old)
    return v
  variables = jax.tree_util.tree_map_with_path(take, dict(fresh))
  if not copied:
    raise CheckpointError("warm start copied nothing: no variable of the "
                          "source has the path and shape of one of this model")
  return variables, copied
