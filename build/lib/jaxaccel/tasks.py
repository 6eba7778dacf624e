"""Tasks: what a model is trained for, and how runs are ranked.

A `Task` is two functions of the model's outputs and the batch (a dict with
"x", "y" and any extra keys, such as a padding "mask"), plus the metric that
ranks runs:

    loss(outputs, batch) -> scalar         minimized by the train step
    metrics(outputs, batch) -> {name: scalar}

Both are means over the batch's valid elements: a target whose `mask` is 0
(a padded position, or a row `evaluate` added to fill its last batch) counts
for nothing. `count(batch)` says how many elements those means are over, so
`evaluate` weights each batch by it. Shipped: `classification` (one class per
example; the default), `lm` (next-token modelling: a target per position,
with bits per byte and perplexity) and `regression` (MSE, MAE). A user's own
task is `Task(loss=..., metrics=..., metric=..., maximize=...)`.

Examples:
  >>> import jax.numpy as jnp
  >>> from jaxaccel import tasks
  >>> task = tasks.get("regression")
  >>> batch = {"y": jnp.array([1.0, 2.0]), "mask": jnp.array([1.0, 0.0])}
  >>> float(task.loss(jnp.array([3.0, 0.0]), batch)), task.metric
  (4.0, 'mse')
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccel.errors import ConfigError

NAMES = ("classification", "lm", "regression")


def weights(batch: dict, shape) -> jax.Array:
  """The batch's `mask` (rows, or positions) broadcast to `shape` as float32
  weights; ones when the batch has no mask."""
  mask = batch.get("mask")
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
  return jnp.broadcast_to(mask, shape)


def masked_mean(values: jax.Array, batch: dict) -> jax.Array:
  """The mean of `values` (one per target element) over the valid ones."""
  w = weights(batch, values.shape)
  return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def count_targets(batch: dict) -> jax.Array:
  """How many target elements of the batch are valid."""
  return jnp.sum(weights(batch, jnp.shape(batch["y"])))


def model_inputs(batch: dict):
  """What the model is called with: the batch's "x"."""
  return batch["x"]


@dataclasses.dataclass(frozen=True)
class Task:
  """What a model is trained for.

  Args:
    loss: `(outputs, batch) -> scalar`, the mean over valid targets.
    metrics: `(outputs, batch) -> {name: scalar}`, means over valid targets.
    metric: the name (a key of `metrics`, or "loss") that ranks runs, stops
      them early and picks a sweep's winner; records hold it as `val_NAME`.
    maximize: whether a larger `metric` is better.
    count: `batch -> number of valid targets` (the means' denominator).
    derived: `{name: mean} -> {name: value}`, figures computed from the
      means over a whole split (perplexity from the mean loss).
    inputs: `batch -> what the model is called with`.
    name: how config.json and the command line name the task.
  """
  loss: Callable
  metrics: Callable
  metric: str = "loss"
  maximize: bool = False
  count: Callable = count_targets
  derived: Callable | None = None
  inputs: Callable = model_inputs
  name: str = "custom"

  def better(self, value: float, best: float | None, min_delta: float = 0.0
             ) -> bool:
    """Whether `value` of the ranking metric improves on `best`."""
    if best is None:
      return True
    return (value > best + min_delta if self.maximize
            else value < best - min_delta)

  def with_loss_fn(self, loss_fn: Callable) -> "Task":
    """This task trained on `loss_fn(outputs, labels[, teacher_outputs])`
    instead of its own loss (the teacher's outputs are the batch's
    "teacher", set by a distilling train step)."""
    def loss(outputs, batch):
      teacher = (batch["teacher"],) if "teacher" in batch else ()
      return loss_fn(outputs, batch["y"], *teacher)
    return dataclasses.replace(self, loss=loss)

  def summarize(self, means: dict) -> dict:
    """The means over a split with the derived figures added."""
    return {**means, **(self.derived(means) if self.derived else {})}


# ------------------------------------------------------------ classification

def _token_cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y)


def _classification_loss(logits, batch):
  return masked_mean(_token_cross_entropy(logits, batch["y"]), batch)


def _accuracy(logits, batch):
  return masked_mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32),
                     batch)


@functools.cache
def classification() -> Task:
  """One integer class per example; softmax cross entropy; ranked by
  accuracy."""
  return Task(loss=_classification_loss,
              metrics=lambda logits, batch: {"accuracy": _accuracy(logits, batch)},
              metric="accuracy", maximize=True, name="classification")


# ----------------------------------------------------------------------- lm

def _lm_metrics(logits, batch):
  nats = masked_mean(_token_cross_entropy(logits, batch["y"]), batch)
  return {"accuracy": _accuracy(logits, batch),
          "bits_per_byte": nats / math.log(2.0)}


def _perplexity(means: dict) -> dict:
  return {"perplexity": float(np.exp(means["loss"]))} if "loss" in means else {}


@functools.cache
def lm() -> Task:
  """Next-token modelling: an integer target per position (byte-level text:
  256 symbols), masked mean cross entropy; token accuracy, bits per byte
  (the loss in bits: one token is one byte) and perplexity; ranked by bits
  per byte."""
  return Task(loss=_classification_loss, metrics=_lm_metrics,
              metric="bits_per_byte", maximize=False, derived=_perplexity,
              name="lm")


# --------------------------------------------------------------- regression

def _errors(outputs, batch):
  y = batch["y"]
  outputs = outputs.astype(jnp.float32)
  if outputs.shape != y.shape and outputs.shape == y.shape + (1,):
    outputs = outputs[..., 0]       # a (n, 1) head for (n,) targets
  return outputs - y.astype(jnp.float32)


@functools.cache
def regression() -> Task:
  """Float targets of any shape; mean squared error; MSE and MAE, ranked by
  MSE. A model with one output per example may return (n, 1) for (n,)
  targets."""
  def loss(outputs, batch):
    return masked_mean(jnp.square(_errors(outputs, batch)), batch)

  def metrics(outputs, batch):
    err = _errors(outputs, batch)
    return {"mse": masked_mean(jnp.square(err), batch),
            "mae": masked_mean(jnp.abs(err), batch)}
  return Task(loss=loss, metrics=metrics, metric="mse", maximize=False,
              name="regression")


_FACTORIES = {"classification": classification, "lm": lm,
              "regression": regression}


def get(task: "str | Task | None") -> Task:
  """A `Task` from its name (or a Task itself); None means classification.
  A name gives the same object every time, so compiled programs keyed on
  the task are reused."""
  if task is None:
    return classification()
  if isinstance(task, Task):
    return task
  if task not in _FACTORIES:
    raise ConfigError(f"unknown task {task!r}: use one of {', '.join(NAMES)}, "
                      "or a jaxaccel.tasks.Task(loss=..., metrics=...)")
  return _FACTORIES[task]()


def infer(y: np.ndarray) -> str:
  """The task targets `y` suggest: float targets are a regression, integer
  ones a classification, one per example, or next-token modelling, one per
  position."""
  y = np.asarray(y)
  if np.issubdtype(y.dtype, np.floating):
    return "regression"
  return "classification" if y.ndim <= 1 else "lm"
