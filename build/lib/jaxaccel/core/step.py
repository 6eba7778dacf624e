"""The one train step and the one eval step, for every placement.

A train step is a pure function `(state, batch) -> (state, metrics)`; its
loss and metrics are a `jaxaccel.tasks.Task`'s. The same step runs on one
device under `jit`, over a mesh under sharded `jit`, and under `pmap` with
`axis_name` set, where gradients, the loss, the metrics and the model state
are averaged over that axis before the update, so every device applies the
update one device would.

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

from jaxaccel import precision, tasks
from jaxaccel.core.state import TrainState
from jaxaccel.models import adapt

Batch = dict   # {"x": inputs, "y": targets, optional "mask", ...}


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
                    task: "tasks.Task | str | None" = None,
                    loss_fn: Callable | None = None,
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
    task: a `jaxaccel.tasks.Task` or its name (default classification):
      the loss, the metrics each step reports, what the model is called on.
    loss_fn: `(outputs, labels) -> scalar`, or with a teacher
      `(outputs, labels, teacher_outputs) -> scalar`, in place of the
      task's loss.
    augment: a pure `(key, x) -> x` applied to each batch's "x".
    skip_nonfinite: a step whose loss or gradients are not finite changes
      nothing but the step counter and the key, and reports `finite=0`.
    teacher: `x -> logits` (or a list of logits) of a trained model, run on
      the same (augmented) inputs under `stop_gradient`; the metrics then
      hold the student-teacher `agreement`.
    axis_name: under `pmap`, the device axis to average over. Each device
      draws augmentation and dropout for its own rows.
  """
  model = adapt(model)
  task = tasks.get(task)
  if loss_fn is not None:
    task = task.with_loss_fn(loss_fn)

  def train_step(state: TrainState, batch: Batch):
    rng, aug_key, dropout_key = jax.random.split(state.rng, 3)
    if axis_name is not None:   # each device draws for its own rows
      index = jax.lax.axis_index(axis_name)
      aug_key = jax.random.fold_in(aug_key, index)
      dropout_key = jax.random.fold_in(dropout_key, index)
    batch = dict(batch)
    if augment is not None:
      batch["x"] = augment(aug_key, batch["x"])
    x = task.inputs(batch)
    if teacher is not None:
      batch["teacher"] = jax.lax.stop_gradient(teacher(x))
    scaled = precision.is_loss_scaled(state.opt_state)

    def loss_of(params):
      outputs, model_state = model.apply(params, state.model_state, x,
                                         train=True, rng=dropout_key)
      loss = task.loss(outputs, batch)
      scaled_loss = loss * state.opt_state.scale if scaled else loss
      return scaled_loss, (loss, outputs, model_state)

    (_, (loss, outputs, model_state)), grads = jax.value_and_grad(
        loss_of, has_aux=True)(state.params)
    values = {"loss": loss, **task.metrics(outputs, batch)}
    if teacher is not None:
      t = batch["teacher"]
      if isinstance(t, (list, tuple)):    # several teachers: their mean vote
        t = sum(jax.nn.softmax(ti.astype(jnp.float32)) for ti in t)
      values["agreement"] = jnp.mean(jnp.argmax(outputs, -1) == jnp.argmax(t, -1))
    if axis_name is not None:
      grads, values = jax.lax.pmean((grads, values), axis_name)
      model_state = _mean_floats(model_state, axis_name)

    def apply_update(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state, model_state

    def keep(_):
      return state.params, state.opt_state, state.model_state

    if scaled:
      # The loss-scale transformation turns an overflowing step into zero
      # updates and a smaller scale; the model state is kept here.
      finite = all_finite(values["loss"], grads)
      params, opt_state, _ = apply_update(None)
      model_state = jax.lax.cond(finite, lambda _: model_state,
                                 lambda _: state.model_state, None)
    elif skip_nonfinite:
      # The update runs only on finite steps: no select pass over the state.
      finite = all_finite(values["loss"], grads)
      params, opt_state, model_state = jax.lax.cond(finite, apply_update, keep,
                                                    None)
    else:
      finite = jnp.array(True)
      params, opt_state, model_state = apply_update(None)
    new_state = TrainState(step=state.step + 1, params=params,
                           model_state=model_state, opt_state=opt_state,
                           rng=rng)
    metrics = {k: jnp.where(finite, v, 0.0) for k, v in values.items()}
    metrics["finite"] = finite.astype(jnp.float32)
    return new_state, metrics
  return train_step


def make_eval_step(model, task: "tasks.Task | str | None" = None):
  """Builds `(variables, batch) -> sums`: the task's loss and metrics, each
  times the batch's `count` of valid targets, and that `count` (rows that
  fill a last batch have `mask` 0)."""
  model = adapt(model)
  task = tasks.get(task)

  def eval_step(variables, batch):
    outputs = model.logits(variables, task.inputs(batch))
    count = task.count(batch)
    values = {"loss": task.loss(outputs, batch), **task.metrics(outputs, batch)}
    return {**{k: v * count for k, v in values.items()}, "count": count}
  return eval_step
