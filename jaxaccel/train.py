"""fit / evaluate / predict: the epoch loop over the one train step.

`fit` compiles a whole epoch into one `lax.scan` when the training set fits
on the devices, and streams batches through the compiled step otherwise;
either way the epoch runs on an `Engine` of `jaxaccel.parallel`, which
places the state and batches for the chosen parallelism. Models are any
that `jaxaccel.models.adapt` takes: flax linen, flax NNX, plain functions.

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
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxaccel import models, optim, parallel as parallel_lib
from jaxaccel.checkpoint import RunDir
from jaxaccel.core import (Callback, TrainState, cross_entropy, init_state,
                           make_eval_step, variables_of)
from jaxaccel.data import Dataset, check_labels
from jaxaccel.errors import CheckpointError, ConfigError, DataError
from jaxaccel.models import adapt

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
def _jitted_logits(model):
  return jax.jit(model.logits)


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


def evaluate(model, state_or_variables, x: np.ndarray,
             y: np.ndarray, *, batch_size: int = 1024) -> dict:
  """Loss and accuracy of a model on (x, y), in eval mode (running BN stats)."""
  variables = (variables_of(state_or_variables)
               if isinstance(state_or_variables, TrainState)
               else state_or_variables)
  if len(x) == 0:
    return {"loss": float("nan"), "accuracy": float("nan")}
  step = _jitted_eval_step(adapt(model))
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for batch in eval_batches(x, y, batch_size):
    out = step(variables, batch)
    for k in totals:
      totals[k] += float(out[k])
  return {"loss": totals["loss"] / totals["count"],
          "accuracy": totals["correct"] / totals["count"]}


def predict(model, state_or_variables, x: np.ndarray, *,
            batch_size: int = 1024) -> np.ndarray:
  """Logits of a model on x, in eval mode, as a numpy array."""
  variables = (variables_of(state_or_variables)
               if isinstance(state_or_variables, TrainState)
               else state_or_variables)
  apply = _jitted_logits(adapt(model))
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


def _summarize(metrics: dict) -> dict:
  m = {k: np.asarray(v) for k, v in metrics.items()}
  n_ok = float(m["finite"].sum())
  return {"train_loss": float(m["loss"].sum() / max(n_ok, 1.0)),
          "train_accuracy": float(m["accuracy"].sum() / max(n_ok, 1.0)),
          "skipped_steps": int(len(m["finite"]) - n_ok),
          "steps": int(len(m["finite"])),
          **({"train_agreement": float(m["agreement"].sum() / max(n_ok, 1.0))}
             if "agreement" in m else {})}


def check_data(model, data: Dataset, batch_size: int) -> None:
  """Errors, before any work, for data that `model` cannot train on."""
  if batch_size <= 0:
    raise ConfigError(f"batch size must be positive; got {batch_size}")
  if len(data.x_train) < batch_size:
    raise ConfigError(f"batch size {batch_size} is larger than the {len(data.x_train)} "
                      "training examples; use a smaller --batch-size")
  num_out = models.output_classes(model, data.input_shape)
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


def describe_model(model) -> str:
  """A process-independent name of a model, recorded in config.json and
  compared on resume (function and NNX reprs hold memory addresses)."""
  adapter = adapt(model)
  if isinstance(adapter, models.LinenModel):
    return repr(adapter.module)
  if isinstance(adapter, models.NNXModel):
    shapes = jax.tree.map(lambda a: list(a.shape),
                          adapter.init(jax.random.key(0), None)[0])
    module = adapter.module
    return f"{type(module).__module__}.{type(module).__qualname__} {shapes}"
  if isinstance(adapter, models.FunctionModel):
    names = [f"{f.__module__}.{getattr(f, '__qualname__', type(f).__name__)}"
             for f in (adapter.init_fn, adapter.apply_fn)]
    return "functions " + ", ".join(names)
  return type(adapter).__name__


def fit(model, tx: optax.GradientTransformation | optim.Spec,
        data: Dataset, *, epochs: int, batch_size: int = 128, seed: int = 0,
        out=None, resume: bool = False, early_stopping: EarlyStopping | None = None,
        augment: Callable | None = None, loss_fn: Callable = cross_entropy,
        epoch_mode: str = "auto", scan_max_bytes: int = 2 ** 30,
        progress: bool = True, config: dict | None = None,
        state: TrainState | None = None,
        skip_nonfinite: bool = True,
        teacher: Callable | None = None, parallel: str = "none",
        mesh_shape=None, precision: str = "fp32", shard_rules=None,
        fsdp: bool = False, callbacks: Sequence[Callback] = ()) -> FitResult:
  """Trains `model` with the optax transformation `tx` on `data`.

  Args:
    model: a flax linen module (any common call signature), a flax NNX
      module, or plain functions (see `jaxaccel.models.adapt`).
    tx: any optax transformation, or a chain spec (see `jaxaccel.optim`).
    data: a `Dataset` (see `jaxaccel.data.load`).
    epochs: number of passes over the training set.
    batch_size: examples per step; the last partial batch of an epoch is
      dropped, so every step has the same shape.
    seed: seeds initialization (linen and plain functions; an NNX module
      brings its own initial values), batch order, augmentation, dropout.
    out: a run directory for config.json, metrics.jsonl and checkpoints.
    resume: continue from the last checkpoint in `out`. With no checkpoint
      there yet (or no directory at all) the run starts fresh and says so on
      stderr, so a requeued job can always run the same command.
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
    callbacks: `jaxaccel.core.Callback`s, called around every epoch (for
      example `TensorBoard(logdir)`); one returning True from
      `on_epoch_end` stops the run.

  Returns:
    A `FitResult` with the final state and per-epoch history.
  """
  model = adapt(model)
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
  check_data(model, data, batch_size)
  if resume and out is None:
    raise ConfigError("resume needs the run directory: pass out=... "
                      "(--out on the command line)")

  run = RunDir(out) if out is not None else None
  run_config = {"model": describe_model(model),
                "model_spec": models.describe(model),
                "optimizer": spec or _describe_tx(tx),
                "dataset": data.name, "epochs": epochs,
                "batch_size": batch_size, "seed": seed,
                "input_shape": list(data.input_shape),
                "num_classes": data.num_classes, **(config or {})}
  if (parallel, precision) != ("none", "fp32"):
    run_config.update(parallel=parallel, precision=precision)

  engine = parallel_lib.make_engine(
      model, tx, mode=parallel, mesh_shape=mesh_shape, precision=precision,
      rules=shard_rules, fsdp=fsdp, loss_fn=loss_fn, augment=augment,
      skip_nonfinite=skip_nonfinite, teacher=teacher)
  engine.check_batch(batch_size)
  tx = engine.tx
  if state is not None and jax.tree.structure(state.opt_state) != (
      jax.tree.structure(jax.eval_shape(tx.init, state.params))):
    raise ConfigError(
        "the given state's optimizer state does not fit the transformation "
        f"fit runs with precision={precision!r}; build it with the "
        "optimizer of precision.apply_policy(model, tx, precision)")
  # In a multi-process run only process 0 prints and writes run files.
  primary = parallel_lib.is_main_process()
  progress = progress and primary

  fresh = state if state is not None else init_state(
      model, tx, data.input_shape, seed=seed)
  start_epoch, best, bad_epochs, history = 0, None, 0, []
  if resume:
    if run.has_config():
      old = run.read_config()
      changed = [k for k in ("model", "optimizer", "dataset", "batch_size", "seed")
                 if old.get(k) != run_config.get(k)]
      if changed:
        raise CheckpointError(
            f"cannot resume {run.path}: {', '.join(changed)} differ(s) from the "
            f"saved run ({changed[0]}: saved {old.get(changed[0])!r}, now "
            f"{run_config.get(changed[0])!r}); use the same settings or a new --out")
    if run.latest_epoch() is None:
      # A requeued job that was killed before its first checkpoint (or never
      # started) runs the same command: start it fresh.
      if primary:
        sys.stderr.write(f"jaxaccel: no checkpoint in {run.path} yet; "
                         "starting a fresh run\n")
      resume = False
    else:
      fresh, prog = run.restore(fresh)
      start_epoch, best, bad_epochs = prog["epoch"], prog["best"], prog["bad_epochs"]
      history = run.truncate_metrics(start_epoch)
  elif run is not None and run.latest_epoch() is not None:
    raise CheckpointError(f"{run.path} already holds a run; pass --resume to "
                          "continue it or choose a new --out")
  if run is not None and not resume and primary:
    run.write_config(run_config)
    run.write_normalization(**data.stats)
    (run.path / "metrics.jsonl").unlink(missing_ok=True)

  n = len(data.x_train)
  steps = n // batch_size
  use_scan = epoch_mode == "scan" or (
      epoch_mode == "auto" and data.x_train.nbytes < scan_max_bytes)
  # A fresh copy: donation deletes the buffers of the state passed in.
  state = jax.tree.map(jnp.array, fresh)
  plateau = optim.has_plateau(state.opt_state)
  if plateau and not len(data.x_val):
    raise ConfigError("reduce_on_plateau watches the validation loss, which "
                      "needs a validation split (validation > 0)")

  stopped_early = False
  t_start = time.perf_counter()
  epoch_seconds = []
  callbacks = list(callbacks) if primary else []
  for c in callbacks:
    c.on_fit_start(start_epoch=start_epoch, epochs=epochs)
  bar = tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs,
             desc="fit", unit="epoch", disable=not progress, leave=False)
  for epoch in bar:
    t0 = time.perf_counter()
    order = epoch_order(seed, epoch, n, batch_size)
    state, metrics = engine.run_epoch(
        state, data.x_train, data.y_train, order, use_scan=use_scan,
        progress=progress, desc=f"epoch {epoch + 1}")
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
    for c in callbacks:
      stopped_early = bool(c.on_epoch_end(record, state)) or stopped_early
    if run is not None:
      # Metrics first: a kill between the two leaves a line that resume drops.
      if primary:
        run.append_metrics(record)
      run.save(epoch + 1, state, {"epoch": epoch + 1, "best": best,
                                  "bad_epochs": bad_epochs})
    if stopped_early:
      break
  bar.close()
  for c in callbacks:
    c.on_fit_end(history)
  if run is not None:
    run.close()
  wall = time.perf_counter() - t_start
  # The first epoch also compiles: time the others when there are any.
  timed = epoch_seconds[1:] or epoch_seconds
  return FitResult(state=state, history=history, stopped_early=stopped_early,
                   wall_seconds=wall,
                   steps_per_second=steps * len(timed) / sum(timed) if timed else 0.0)


def load_run(path, *, model=None) -> tuple[Any, dict, dict]:
  """Loads a run directory for inference: (model, variables, config).

  Registry models, and linen modules whose class is importable, are rebuilt
  from config.json. Any other model (NNX, plain functions, a class defined
  in a notebook) is given as `model`, the object the run was trained with.
  """
  run = RunDir(path)
  config = run.read_config()
  desc = config.get("model_spec")
  if model is None:
    if not desc:
      raise CheckpointError(
          f"{run.path} was trained with a model that config.json cannot "
          f"rebuild ({config.get('model', 'unknown')}); load it in Python "
          "with the model object: jaxaccel.train.load_run(path, model=...)")
    model = models.from_description(desc)
  variables = run.restore_variables()
  run.close()
  return model, variables, config
