"""The training core: TrainState, pure steps, fit / evaluate / predict.

A train step is a pure function `(state, batch) -> (state, metrics)`. `fit`
compiles a whole epoch into one `lax.scan` when the training set fits on the
device, and streams batches through the compiled step otherwise.

Examples:
  >>> import optax
  >>> from jaxaccel import data, models, train
  >>> ds = data.load("digits")
  >>> model = models.create("mlp", num_classes=10, widths=(64, 64))
  >>> result = train.fit(model, optax.adam(1e-3), ds, epochs=2, progress=False)
  >>> 0.0 <= train.evaluate(model, result.state, ds.x_test, ds.y_test)["accuracy"] <= 1.0
  True
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxaccel import models, optim
from jaxaccel.checkpoint import RunDir
from jaxaccel.data import Dataset, check_labels
from jaxaccel.errors import CheckpointError, ConfigError, DataError

PyTree = Any
Batch = dict   # {"x": float32 inputs, "y": int32 labels}


class TrainState(NamedTuple):
  """Everything that changes during training, as one pytree."""
  step: jax.Array          # (), int32: steps taken, skipped ones included
  params: PyTree
  model_state: PyTree      # non-trainable collections, e.g. batch_stats
  opt_state: PyTree
  rng: jax.Array           # typed PRNG key for augmentation and dropout


def init_variables(model: nn.Module, input_shape, *, seed: int = 0
                   ) -> tuple[dict, jax.Array]:
  """The model's initial variables for a seed, and the state's first key."""
  init_key, rng = jax.random.split(jax.random.key(seed))
  variables = model.init(init_key, jnp.zeros((1, *input_shape), jnp.float32),
                         train=False)
  return dict(variables), rng


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               input_shape, *, seed: int = 0,
               variables: dict | None = None) -> TrainState:
  """Initializes params, model state and optimizer state from a seed, or
  starts from given `variables` (see `warm_start`)."""
  fresh, rng = init_variables(model, input_shape, seed=seed) if (
      variables is None) else (None, jax.random.split(jax.random.key(seed))[1])
  variables = dict(variables if variables is not None else fresh)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=variables, opt_state=tx.init(params), rng=rng)


def warm_start(model: nn.Module, source: dict, input_shape, *,
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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross entropy against integer labels, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def all_finite(*trees) -> jax.Array:
  """True when every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]
  return jnp.all(jnp.stack(leaves))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    loss_fn: Callable = cross_entropy,
                    augment: Callable | None = None,
                    skip_nonfinite: bool = True,
                    teacher: Callable | None = None):
  """Builds the pure train step `(state, batch) -> (state, metrics)`.

  A step whose loss or gradients are not finite changes nothing but the step
  counter and the key; it reports `finite=0` so `fit` can count it. The
  guard costs one pass over the gradients and one select over params and
  optimizer state; `skip_nonfinite=False` drops it.

  With a `teacher` (`x -> logits`, or a list of logits), the loss is
  `loss_fn(logits, labels, teacher_logits)` with the teacher's logits under
  `stop_gradient`, and the metrics include the student-teacher `agreement`.
  """
  def train_step(state: TrainState, batch: Batch):
    rng, aug_key, dropout_key = jax.random.split(state.rng, 3)
    x = augment(aug_key, batch["x"]) if augment is not None else batch["x"]
    targets = (batch["y"],)
    if teacher is not None:
      targets += (jax.lax.stop_gradient(teacher(x)),)

    def loss_of(params):
      logits, new_model_state = model.apply(
          {"params": params, **state.model_state}, x, train=True,
          mutable=list(state.model_state), rngs={"dropout": dropout_key})
      return loss_fn(logits, *targets), (logits, new_model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(
        loss_of, has_aux=True)(state.params)

    def apply_update(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return (optax.apply_updates(state.params, updates), opt_state,
              dict(model_state))

    if skip_nonfinite:
      # The update runs only on finite steps: no select pass over the state.
      finite = all_finite(loss, grads)
      params, opt_state, model_state = jax.lax.cond(
          finite, apply_update,
          lambda _: (state.params, state.opt_state, dict(state.model_state)),
          None)
    else:
      finite = jnp.array(True)
      params, opt_state, model_state = apply_update(None)
    new_state = TrainState(step=state.step + 1, params=params,
                           model_state=model_state, opt_state=opt_state,
                           rng=rng)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    metrics = {"loss": jnp.where(finite, loss, 0.0),
               "accuracy": jnp.where(finite, accuracy, 0.0),
               "finite": finite.astype(jnp.float32)}
    if teacher is not None:
      t = targets[1]
      if isinstance(t, (list, tuple)):    # several teachers: their mean vote
        t = sum(jax.nn.softmax(ti.astype(jnp.float32)) for ti in t)
      agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(t, -1))
      metrics["agreement"] = jnp.where(finite, agreement, 0.0)
    return new_state, metrics
  return train_step


def make_eval_step(model: nn.Module):
  """Builds `(variables, batch) -> sums` of cross-entropy, correct answers
  and examples, for a batch whose padding rows have `mask` 0."""
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["x"], train=False)
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["y"])
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["y"]) * mask
    return {"loss": jnp.sum(per_example * mask), "correct": jnp.sum(correct),
            "count": jnp.sum(mask)}
  return eval_step


def variables_of(state: TrainState) -> dict:
  """The flax variables (params and model state) held in a train state."""
  return {"params": state.params, **state.model_state}


def _padded_batches(x: np.ndarray, batch_size: int):
  """Fixed-size batches (the last one padded) so one compile serves all."""
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate(
          [chunk, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    yield chunk, n


@functools.lru_cache(maxsize=16)
def _jitted_eval_step(model):
  return jax.jit(make_eval_step(model))


@functools.lru_cache(maxsize=16)
def _jitted_apply(model):
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
  """Fixed-size eval batches {x, y, mask}; padding rows have mask 0."""
  batch_size = min(batch_size, len(x))
  y = np.asarray(y, np.int32)
  for start, (xb, n) in zip(range(0, len(x), batch_size),
                            _padded_batches(x, batch_size)):
    yb = np.zeros(batch_size, np.int32)
    yb[:n] = y[start:start + n]
    mask = (np.arange(batch_size) < n).astype(np.float32)
    yield {"x": xb, "y": yb, "mask": mask}


def evaluate(model: nn.Module, state_or_variables, x: np.ndarray,
             y: np.ndarray, *, batch_size: int = 1024) -> dict:
  """Loss and accuracy of a model on (x, y), in eval mode (running BN stats)."""
  variables = (variables_of(state_or_variables)
               if isinstance(state_or_variables, TrainState)
               else state_or_variables)
  if len(x) == 0:
    return {"loss": float("nan"), "accuracy": float("nan")}
  step = _jitted_eval_step(model)
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for batch in eval_batches(x, y, batch_size):
    out = step(variables, batch)
    for k in totals:
      totals[k] += float(out[k])
  return {"loss": totals["loss"] / totals["count"],
          "accuracy": totals["correct"] / totals["count"]}


def predict(model: nn.Module, state_or_variables, x: np.ndarray, *,
            batch_size: int = 1024) -> np.ndarray:
  """Logits of a model on x, in eval mode, as a numpy array."""
  variables = (variables_of(state_or_variables)
               if isinstance(state_or_variables, TrainState)
               else state_or_variables)
  apply = _jitted_apply(model)
  batch_size = max(1, min(batch_size, len(x)))
  outs = [np.asarray(apply(variables, xb))[:n]
          for xb, n in _padded_batches(np.asarray(x, np.float32), batch_size)]
  return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------- fit

@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stop when a validation metric has not improved for `patience` epochs."""
  metric: str = "val_accuracy"    # or "val_loss"
  patience: int = 3
  min_delta: float = 0.0

  def improved(self, value: float, best: float | None) -> bool:
    if best is None:
      return True
    if self.metric.endswith("loss"):
      return value < best - self.min_delta
    return value > best + self.min_delta


@dataclasses.dataclass
class FitResult:
  """What `fit` returns: the final state and one record per epoch."""
  state: TrainState
  history: list[dict]
  stopped_early: bool
  wall_seconds: float
  steps_per_second: float


def epoch_key(seed: int, epoch: int) -> jax.Array:
  """The key that orders epoch `epoch`'s batches: a function of seed and
  epoch only, so a resumed run sees exactly the batches it would have."""
  return jax.random.fold_in(jax.random.key(seed + 1_000_003), epoch)


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> jax.Array:
  """Indices of one epoch as (steps, batch_size); the remainder is dropped."""
  steps = n // batch_size
  perm = jax.random.permutation(epoch_key(seed, epoch), n)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def make_scan_epoch(train_step):
  """Compiles a whole epoch: gather each batch from device-resident data."""
  def run_epoch(state, x, y, order):
    def body(state, idx):
      return train_step(state, {"x": x[idx], "y": y[idx]})
    return jax.lax.scan(body, state, order)
  return jax.jit(run_epoch, donate_argnums=0)


def _summarize(metrics: dict) -> dict:
  m = {k: np.asarray(v) for k, v in metrics.items()}
  n_ok = float(m["finite"].sum())
  return {"train_loss": float(m["loss"].sum() / max(n_ok, 1.0)),
          "train_accuracy": float(m["accuracy"].sum() / max(n_ok, 1.0)),
          "skipped_steps": int(len(m["finite"]) - n_ok),
          "steps": int(len(m["finite"])),
          **({"train_agreement": float(m["agreement"].sum() / max(n_ok, 1.0))}
             if "agreement" in m else {})}


def _check_data(model: nn.Module, data: Dataset, batch_size: int) -> None:
  if batch_size <= 0:
    raise ConfigError(f"batch size must be positive; got {batch_size}")
  if len(data.x_train) < batch_size:
    raise ConfigError(f"batch size {batch_size} is larger than the {len(data.x_train)} "
                      "training examples; use a smaller --batch-size")
  num_out = getattr(model, "num_classes", None)
  if num_out is not None:
    check_labels(data.y_train, num_out, "training labels")
    check_labels(data.y_test, num_out, "test labels")
  for split in ("train", "val", "test"):
    x = getattr(data, f"x_{split}")
    if len(x) and not np.all(np.isfinite(x)):
      raise DataError(f"x_{split} holds NaN or inf values; load the data with "
                      "nan_policy='drop' or 'impute'")


def _describe_tx(tx) -> str:
  """A process-independent name for a transformation built in Python: its
  repr holds function addresses, which differ in every process, so resume
  relies on the checkpoint's state structure and shapes instead."""
  return f"optax transformation built in Python ({type(tx).__name__})"


def fit(model: nn.Module, tx: optax.GradientTransformation | optim.Spec,
        data: Dataset, *, epochs: int, batch_size: int = 128, seed: int = 0,
        out=None, resume: bool = False, early_stopping: EarlyStopping | None = None,
        augment: Callable | None = None, loss_fn: Callable = cross_entropy,
        epoch_mode: str = "auto", scan_max_bytes: int = 2 ** 30,
        progress: bool = True, config: dict | None = None,
        state: TrainState | None = None,
        skip_nonfinite: bool = True,
        teacher: Callable | None = None, parallel: str = "none",
        mesh_shape=None, precision: str = "fp32", shard_rules=None,
        fsdp: bool = False) -> FitResult:
  """Trains `model` with the optax transformation `tx` on `data`.

  Args:
    model: a flax.linen module taking `(x, *, train)`.
    tx: any optax transformation, or a chain spec (see `jaxaccel.optim`).
    data: a `Dataset` (see `jaxaccel.data.load`).
    epochs: number of passes over the training set.
    batch_size: examples per step; the last partial batch of an epoch is
      dropped, so every step has the same shape.
    seed: seeds initialization, batch order and augmentation.
    out: a run directory for config.json, metrics.jsonl and checkpoints.
    resume: continue from the last checkpoint in `out`.
    early_stopping: stop when a validation metric stops improving.
    augment: a pure `(key, x) -> x` applied to each training batch.
    loss_fn: `(logits, labels) -> scalar`.
    epoch_mode: "scan" (whole epoch compiled, data on device), "stream"
      (batches fed from the host), or "auto" (scan when the training set is
      smaller than `scan_max_bytes`).
    progress: show a progress bar.
    config: extra entries for config.json (the command line records itself).
    state: a state to start from instead of a fresh one (fine-tuning).
    skip_nonfinite: skip (and count) steps whose loss or gradients are not
      finite; turn off only when speed matters more than that guard.
    teacher: for distillation, `x -> teacher logits` (see
      `jaxaccel.compress.distillation`); `loss_fn` then takes
      `(logits, labels, teacher_logits)` and each epoch logs
      `train_agreement`.
    parallel: "none" (one device), "pmap" or "sharded" (see
      `jaxaccel.parallel`); the batch must split evenly over the devices.
    mesh_shape: for "sharded", `(data,)` or `(data, model)`.
    precision: "fp32", "bf16" or "fp16" (see `jaxaccel.precision`).
    shard_rules: `(regex, PartitionSpec)` pairs on state paths ("sharded").
    fsdp: split params and optimizer state over the "data" axis too.

  Returns:
    A `FitResult` with the final state and per-epoch history.
  """
  if isinstance(tx, (str, list, dict)):
    spec = optim.to_string(optim.parse(tx))
    tx = optim.build(tx)
  else:
    spec = None
  if epochs <= 0:
    raise ConfigError(f"epochs must be positive; got {epochs}")
  if epoch_mode not in ("auto", "scan", "stream"):
    raise ConfigError(f"unknown epoch_mode {epoch_mode!r}: use auto, scan or "
                      "stream")
  _check_data(model, data, batch_size)
  if resume and out is None:
    raise ConfigError("resume needs the run directory: pass out=... "
                      "(--out on the command line)")

  run = RunDir(out) if out is not None else None
  run_config = {"model": repr(model), "model_spec": models.describe(model), "optimizer": spec or _describe_tx(tx),
                "dataset": data.name, "epochs": epochs,
                "batch_size": batch_size, "seed": seed,
                "input_shape": list(data.input_shape),
                "num_classes": data.num_classes, **(config or {})}

  engine = None
  if (parallel, precision, mesh_shape, shard_rules, fsdp) != (
      "none", "fp32", None, None, False):
    from jaxaccel import parallel as parallel_lib
    if teacher is not None:
      raise ConfigError("distillation (teacher=...) runs on one device in "
                        "fp32: drop parallel/precision/mesh options for it")
    engine = parallel_lib.make_engine(
        model, tx, mode=parallel, mesh_shape=mesh_shape, precision=precision,
        rules=shard_rules, fsdp=fsdp, loss_fn=loss_fn, augment=augment,
        skip_nonfinite=skip_nonfinite)
    engine.check_batch(batch_size)
    tx = engine.tx
    if state is not None and jax.tree.structure(state.opt_state) != (
        jax.tree.structure(jax.eval_shape(tx.init, state.params))):
      raise ConfigError(
          "the given state's optimizer state does not fit the transformation "
          f"fit runs with precision={precision!r}; build it with the "
          "optimizer of precision.apply_policy(model, tx, precision)")
    run_config.update(parallel=parallel, precision=precision)
  # In a multi-process run only process 0 prints and writes run files.
  primary = engine is None or parallel_lib.is_main_process()
  progress = progress and primary

  fresh = state if state is not None else init_state(
      model, tx, data.input_shape, seed=seed)
  start_epoch, best, bad_epochs, history = 0, None, 0, []
  if resume:
    old = run.read_config()
    changed = [k for k in ("model", "optimizer", "dataset", "batch_size", "seed")
               if old.get(k) != run_config.get(k)]
    if changed:
      raise CheckpointError(
          f"cannot resume {run.path}: {', '.join(changed)} differ(s) from the "
          f"saved run ({changed[0]}: saved {old.get(changed[0])!r}, now "
          f"{run_config.get(changed[0])!r}); use the same settings or a new --out")
    fresh, prog = run.restore(fresh)
    start_epoch, best, bad_epochs = prog["epoch"], prog["best"], prog["bad_epochs"]
    history = run.truncate_metrics(start_epoch)
  elif run is not None:
    if run.latest_epoch() is not None:
      raise CheckpointError(f"{run.path} already holds a run; pass --resume to "
                            "continue it or choose a new --out")
  if run is not None and not resume and primary:
    run.write_config(run_config)
    run.write_normalization(**data.stats)
    (run.path / "metrics.jsonl").unlink(missing_ok=True)
  state = fresh

  n = len(data.x_train)
  steps = n // batch_size
  use_scan = epoch_mode == "scan" or (
      epoch_mode == "auto" and data.x_train.nbytes < scan_max_bytes)
  if engine is None:   # the engine builds its own step for the devices
    train_step = make_train_step(model, tx, loss_fn=loss_fn, augment=augment,
                                 skip_nonfinite=skip_nonfinite, teacher=teacher)
  if engine is None and use_scan:
    run_epoch = make_scan_epoch(train_step)
    x_dev, y_dev = jax.device_put(data.x_train), jax.device_put(data.y_train)
  elif engine is None:
    step_fn = jax.jit(train_step, donate_argnums=0)
  # A fresh copy: donation deletes the buffers of the state passed in.
  state = jax.tree.map(jnp.array, state)
  plateau = optim.has_plateau(state.opt_state)
  if plateau and not len(data.x_val):
    raise ConfigError("reduce_on_plateau watches the validation loss, which "
                      "needs a validation split (validation > 0)")

  stopped_early = False
  t_start = time.perf_counter()
  epoch_seconds = []
  bar = tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs,
             desc="fit", unit="epoch", disable=not progress, leave=False)
  for epoch in bar:
    t0 = time.perf_counter()
    order = epoch_order(seed, epoch, n, batch_size)
    if engine is not None:
      state, metrics = engine.run_epoch(
          state, data.x_train, data.y_train, order, use_scan=use_scan,
          progress=progress, desc=f"epoch {epoch + 1}")
    elif use_scan:
      state, metrics = run_epoch(state, x_dev, y_dev, order)
    else:
      order = np.asarray(order)
      collected = []
      for idx in tqdm(order, desc=f"epoch {epoch + 1}", leave=False,
                      disable=not progress):
        state, m = step_fn(state, {"x": data.x_train[idx], "y": data.y_train[idx]})
        collected.append(m)
      metrics = jax.tree.map(lambda *v: jnp.stack(v), *collected)
    record = {"epoch": epoch + 1, "step": int(state.step), **_summarize(metrics)}
    seconds = time.perf_counter() - t0
    epoch_seconds.append(seconds)
    if len(data.x_val):
      val = evaluate(model, state, data.x_val, data.y_val)
      record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
    if plateau:
      state = state._replace(opt_state=optim.observe_plateau(
          state.opt_state, record["val_loss"]))
    # Hyperparameters held in the optimizer state: the learning rate first.
    record.update({k: float(v) for k, v in
                   optim.hyperparams(state.opt_state).items()})
    record["epoch_seconds"] = round(seconds, 4)
    history.append(record)
    bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                    val_acc=f"{record.get('val_accuracy', float('nan')):.4f}")

    if early_stopping is not None:
      if early_stopping.metric not in record:
        raise ConfigError(f"early stopping watches {early_stopping.metric!r}, "
                          "which needs a validation split (validation > 0)")
      value = record[early_stopping.metric]
      if early_stopping.improved(value, best):
        best, bad_epochs = value, 0
      else:
        bad_epochs += 1
      stopped_early = bad_epochs >= early_stopping.patience
    if run is not None:
      # Metrics first: a kill between the two leaves a line that resume drops.
      if primary:
        run.append_metrics(record)
      run.save(epoch + 1, state, {"epoch": epoch + 1, "best": best,
                                  "bad_epochs": bad_epochs})
    if stopped_early:
      break
  bar.close()
  if run is not None:
    run.close()
  wall = time.perf_counter() - t_start
  # The first epoch also compiles: time the others when there are any.
  timed = epoch_seconds[1:] or epoch_seconds
  return FitResult(state=state, history=history, stopped_early=stopped_early,
                   wall_seconds=wall,
                   steps_per_second=steps * len(timed) / sum(timed) if timed else 0.0)


def load_run(path) -> tuple[nn.Module, dict, dict]:
  """Loads a run directory for inference: (model, variables, config)."""
  run = RunDir(path)
  config = run.read_config()
  desc = config.get("model_spec")
  if not desc:
    raise CheckpointError(f"{run.path} was trained with a model outside the "
                          "registry; load it in Python with your model and "
                          "RunDir.restore_variables")
  model = models.from_description(desc)
  variables = run.restore_variables()
  run.close()
  return model, variables, config
