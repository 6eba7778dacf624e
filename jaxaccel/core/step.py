"""The one train step and the one eval step, for every placement.

A train step is a pure function `(state, batch) -> (state, metrics)`. The
same step runs on one device under `jit`, over a mesh under sharded `jit`,
and under `pmap` with `axis_name` set, where gradients, the loss, the
accuracy and the model state are averaged over that axis before the
update, so every device applies the update one device would.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from jaxaccel import models
  >>> from jaxaccel.core import init_state, make_train_step
  >>> model = models.MLP(num_classes=2, widths=(4,))
  >>> state = init_state(model, optax.sgd(0.1), (3,))
  >>> step = jax.jit(make_train_step(model, optax.sgd(0.1)))
  >>> state, metrics = step(state, {"x": jnp.ones((8, 3)),
  ...                               "y": jnp.zeros(8, jnp.int32)})
  >>> int(state.step), float(metrics["finite"])
  (1, 1.0)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxaccel import precision
from jaxaccel.core.state import TrainState
from jaxaccel.models import adapt

Batch = dict   # {"x": float32 inputs, "y": int32 labels}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross entropy against integer labels, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def all_finite(*trees) -> jax.Array:
  """True when every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]
  return jnp.all(jnp.stack(leaves))


def _mean_floats(tree, axis_name: str):
  return jax.tree.map(
      lambda v: jax.lax.pmean(v, axis_name)
      if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)


def make_train_step(model, tx: optax.GradientTransformation, *,
                    loss_fn: Callable = cross_entropy,
                    augment: Callable | None = None,
                    skip_nonfinite: bool = True,
                    teacher: Callable | None = None,
                    axis_name: str | None = None):
  """Builds the pure train step `(state, batch) -> (state, metrics)`.

  Args:
    model: any model `jaxaccel.models.adapt` takes.
    tx: the optimizer. When its state comes from `precision.loss_scaled`,
      the loss is multiplied by the scale before differentiation and the
      optimizer itself turns an overflowing step into a skipped one.
    loss_fn: `(logits, labels) -> scalar`, or with a teacher
      `(logits, labels, teacher_logits) -> scalar`.
    augment: a pure `(key, x) -> x` applied to each batch.
    skip_nonfinite: a step whose loss or gradients are not finite changes
      nothing but the step counter and the key, and reports `finite=0`.
    teacher: `x -> logits` (or a list of logits) of a trained model, run on
      the same (augmented) inputs under `stop_gradient`; the metrics then
      hold the student-teacher `agreement`.
    axis_name: under `pmap`, the device axis to average over. Each device
      draws augmentation and dropout for its own rows.
  """
  model = adapt(model)

  def train_step(state: TrainState, batch: Batch):
    rng, aug_key, dropout_key = jax.random.split(state.rng, 3)
    if axis_name is not None:   # each device draws for its own rows
      index = jax.lax.axis_index(axis_name)
      aug_key = jax.random.fold_in(aug_key, index)
      dropout_key = jax.random.fold_in(dropout_key, index)
    x = augment(aug_key, batch["x"]) if augment is not None else batch["x"]
    targets = (batch["y"],)
    if teacher is not None:
      targets += (jax.lax.stop_gradient(teacher(x)),)
    scaled = precision.is_loss_scaled(state.opt_state)

    def loss_of(params):
      logits, model_state = model.apply(params, state.model_state, x,
                                        train=True, rng=dropout_key)
      loss = loss_fn(logits, *targets)
      scaled_loss = loss * state.opt_state.scale if scaled else loss
      return scaled_loss, (loss, logits, model_state)

    (_, (loss, logits, model_state)), grads = jax.value_and_grad(
        loss_of, has_aux=True)(state.params)
    predicted = jnp.argmax(logits, -1)
    accuracy = jnp.mean(predicted == batch["y"])
    agreement = None
    if teacher is not None:
      t = targets[1]
      if isinstance(t, (list, tuple)):    # several teachers: their mean vote
        t = sum(jax.nn.softmax(ti.astype(jnp.float32)) for ti in t)
      agreement = jnp.mean(predicted == jnp.argmax(t, -1))
    if axis_name is not None:
      grads, loss, accuracy, agreement = jax.lax.pmean(
          (grads, loss, accuracy, agreement), axis_name)
      model_state = _mean_floats(model_state, axis_name)

    def apply_update(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state, model_state

    def keep(_):
      return state.params, state.opt_state, state.model_state

    if scaled:
      # The loss-scale transformation turns an overflowing step into zero
      # updates and a smaller scale; the model state is kept here.
      finite = all_finite(loss, grads)
      params, opt_state, _ = apply_update(None)
      model_state = jax.lax.cond(finite, lambda _: model_state,
                                 lambda _: state.model_state, None)
    elif skip_nonfinite:
      # The update runs only on finite steps: no select pass over the state.
      finite = all_finite(loss, grads)
      params, opt_state, model_state = jax.lax.cond(finite, apply_update, keep,
                                                    None)
    else:
      finite = jnp.array(True)
      params, opt_state, model_state = apply_update(None)
    new_state = TrainState(step=state.step + 1, params=params,
                           model_state=model_state, opt_state=opt_state,
                           rng=rng)
    metrics = {"loss": jnp.where(finite, loss, 0.0),
               "accuracy": jnp.where(finite, accuracy, 0.0),
               "finite": finite.astype(jnp.float32)}
    if agreement is not None:
      metrics["agreement"] = jnp.where(finite, agreement, 0.0)
    return new_state, metrics
  return train_step


def make_eval_step(model):
  """Builds `(variables, batch) -> sums` of cross-entropy, correct answers
  and examples, for a batch whose padding rows have `mask` 0."""
  model = adapt(model)

  def eval_step(variables, batch):
    logits = model.logits(variables, batch["x"])
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["y"])
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["y"]) * mask
    return {"loss": jnp.sum(per_example * mask), "correct": jnp.sum(correct),
            "count": jnp.sum(mask)}
  return eval_step
