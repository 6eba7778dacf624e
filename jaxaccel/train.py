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
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxaccel import data as data_lib, models, optim, parallel as parallel_lib
from jaxaccel.checkpoint import RunDir
from jaxaccel.core import (Callback, EarlyStopping, FitLoop, PlateauSignal,
                           RunDirectory, TrainState, compiled, cross_entropy,
                           init_state, make_eval_step, variables_of)
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
  return compiled.jit(make_eval_step(model))


@functools.lru_cache(maxsize=16)
def _jitted_logits(model):
  return compiled.jit(model.logits)


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
class FitConfig:
  """What a `fit` run computes: the loop, the step, the placement.

  `fit(model, tx, data, FitConfig(epochs=5, parallel="pmap"))` and
  `fit(model, tx, data, epochs=5, parallel="pmap")` are the same run.
  """
  # The loop.
  epochs: int                   # passes over the training set
  batch_size: int = 128         # examples per step; an epoch's last partial
                                # batch is dropped so every step has one shape
  seed: int = 0                 # initialization (linen, plain functions; an
                                # NNX module brings its own), batch order,
                                # augmentation, dropout
  epoch_mode: str = "auto"      # "scan": the whole epoch compiled, data on
                                # the devices; "stream": batches fed from the
                                # host; "auto": scan below scan_max_bytes,
                                # except on CPU for models with convolutions
                                # (see `scan_pays`)
  scan_max_bytes: int = 2 ** 30
  # The step (see `jaxaccel.core.make_train_step`).
  loss_fn: Callable = cross_entropy   # (logits, labels[, teacher_logits])
  augment: Callable | None = None     # pure (key, x) -> x on each batch
  skip_nonfinite: bool = True   # skip and count non-finite steps
  teacher: Callable | None = None     # x -> logits, for distillation; each
                                      # epoch then logs train_agreement
  precision: str = "fp32"       # "fp32", "bf16" or "fp16"
  # The placement (see `jaxaccel.parallel`).
  parallel: str = "none"        # "none", "pmap" or "sharded"; the batch
                                # must split evenly over the devices
  mesh_shape: tuple | None = None   # "sharded": (data,) or (data, model)
  shard_rules: tuple | None = None  # "sharded": (regex, PartitionSpec) pairs
  fsdp: bool = False            # "sharded": split params and optimizer
                                # state over "data" too

  def check(self) -> None:
    if self.epochs <= 0:
      raise ConfigError(f"epochs must be positive; got {self.epochs}")
    if self.epoch_mode not in ("auto", "scan", "stream"):
      raise ConfigError(f"unknown epoch_mode {self.epoch_mode!r}: use auto, "
                        "scan or stream")


@dataclasses.dataclass
class FitResult:
  """What `fit` returns: the final state and one record per epoch.

  `steps_per_second` times the epochs after the first, which also compiles
  the program; a one-epoch fit has only that one to time, compilation
  included. Time a model's speed with two epochs or more.
  """
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


def scan_pays(model, state: TrainState, sample) -> bool:
  """Whether a compiled `lax.scan` epoch beats streaming steps for `model`.

  It does except on the CPU for a model whose training forward pass has a
  `conv_general_dilated` that JAX differentiates itself: XLA:CPU runs that
  gradient many times slower inside a compiled loop than in a step of its
  own (the flax examples' MNIST CNN on 8x8 digits, batch 32: 0.82 s per
  epoch scanned, 0.13 s streamed, on the 2-core development machine).
  Convolutions with their own gradient, such as `models.conv2d` in
  jaxaccel's CNN and ResNet, scan.
  """
  if jax.default_backend() != "cpu":
    return True
  apply = lambda p, s, x, rng: model.apply(p, s, x, train=True, rng=rng)[0]
  jaxpr = jax.make_jaxpr(apply)(state.params, state.model_state,
                                jnp.asarray(sample), state.rng)
  names = models.primitive_names(jaxpr.jaxpr, opaque=("custom_vjp",))
  return "conv_general_dilated" not in names


def fit(model, tx: optax.GradientTransformation | optim.Spec, data: Dataset,
        config: FitConfig | None = None, *, state: TrainState | None = None,
        out=None, resume: bool = False, run_config: dict | None = None,
        early_stopping: EarlyStopping | None = None,
        callbacks: Sequence[Callback] = (), progress: bool = True,
        **options) -> FitResult:
  """Trains `model` with the optax transformation `tx` on `data`.

  Args:
    model: a flax linen module (any common call signature), a flax NNX
      module, or plain functions (see `jaxaccel.models.adapt`).
    tx: any optax transformation, or a chain spec (see `jaxaccel.optim`).
    data: a `Dataset` (see `jaxaccel.data.load`).
    config: a `FitConfig`; or give its fields as keywords (`epochs=5`), which
      also override the ones of `config`.
    state: a state to start from instead of a fresh one (fine-tuning).
    out: a run directory for config.json, metrics.jsonl and checkpoints
      (the `RunDirectory` callback).
    resume: continue from the last checkpoint in `out`. With no checkpoint
      there yet (or no directory at all) the run starts fresh and says so on
      stderr, so a requeued job can always run the same command.
    run_config: extra entries for config.json (the command line records
      itself there).
    early_stopping: an `EarlyStopping` callback, run before `callbacks`.
    callbacks: `jaxaccel.core.Callback`s, called around every epoch (for
      example `TensorBoard(logdir)`); one setting `loop.stop` ends the run.
    progress: show progress bars.

  Returns:
    A `FitResult` with the final state and per-epoch history.
  """
  config = (dataclasses.replace(config, **options) if config is not None
            else FitConfig(**options))
  config.check()
  model = adapt(model)
  if isinstance(tx, (str, list, dict)):
    spec = optim.to_string(optim.parse(tx))
    tx = optim.build(tx)
  else:
    spec = None
  check_data(model, data, config.batch_size)
  if resume and out is None:
    raise ConfigError("resume needs the run directory: pass out=... "
                      "(--out on the command line)")

  engine = parallel_lib.make_engine(
      model, tx, mode=config.parallel, mesh_shape=config.mesh_shape,
      precision=config.precision, rules=config.shard_rules, fsdp=config.fsdp,
      loss_fn=config.loss_fn, augment=config.augment,
      skip_nonfinite=config.skip_nonfinite, teacher=config.teacher)
  engine.check_batch(config.batch_size)
  if state is not None and jax.tree.structure(state.opt_state) != (
      jax.tree.structure(jax.eval_shape(engine.tx.init, state.params))):
    raise ConfigError(
        "the given state's optimizer state does not fit the transformation "
        f"fit runs with precision={config.precision!r}; build it with the "
        "optimizer of precision.apply_policy(model, tx, precision)")
  if state is None:
    state = init_state(model, engine.tx, data.input_shape, seed=config.seed)

  # Callbacks: the built-in ones that change the state or the stop decision
  # first, the user's next, the run directory last (it checkpoints them all).
  hooks = []
  if optim.has_plateau(state.opt_state):
    if not len(data.x_val):
      raise ConfigError("reduce_on_plateau watches the validation loss, which "
                        "needs a validation split (validation > 0)")
    hooks.append(PlateauSignal())
  hooks += [early_stopping] if early_stopping is not None else []
  hooks += list(callbacks)
  if out is not None:
    hooks.append(RunDirectory(
        out, _run_config(model, spec or _describe_tx(tx), data, config,
                         run_config), normalization=data.stats, resume=resume))

  # In a multi-process run only process 0 shows progress.
  progress = progress and parallel_lib.is_main_process()
  # A fresh copy: donation deletes the buffers of the state passed in.
  loop = FitLoop(state=jax.tree.map(jnp.array, state), epochs=config.epochs,
                 callbacks=hooks)
  for c in hooks:
    c.on_fit_start(loop)
  n = len(data.x_train)
  use_scan = config.epoch_mode == "scan" or (
      config.epoch_mode == "auto" and data.x_train.nbytes < config.scan_max_bytes
      and scan_pays(model, loop.state, data.x_train[:1]))
  t_start = time.perf_counter()
  epoch_seconds = []
  bar = tqdm(range(loop.epoch, config.epochs), initial=loop.epoch,
             total=config.epochs, desc="fit", unit="epoch",
             disable=not progress, leave=False)
  for epoch in bar:
    t0 = time.perf_counter()
    order = epoch_order(config.seed, epoch, n, config.batch_size)
    loop.state, metrics = engine.run_epoch(
        loop.state, data.x_train, data.y_train, order, use_scan=use_scan,
        progress=progress, desc=f"epoch {epoch + 1}")
    loop.epoch = epoch + 1
    record = {"epoch": loop.epoch, "step": int(loop.state.step),
              **_summarize(metrics)}
    epoch_seconds.append(time.perf_counter() - t0)
    if len(data.x_val):
      val = evaluate(model, loop.state, data.x_val, data.y_val)
      record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
    # Hyperparameters held in the optimizer state: the learning rate first.
    record.update({k: float(v) for k, v in
                   optim.hyperparams(loop.state.opt_state).items()})
    record["epoch_seconds"] = round(epoch_seconds[-1], 4)
    loop.history.append(record)
    for c in hooks:
      c.on_epoch_end(loop, record)
    bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                    val_acc=f"{record.get('val_accuracy', float('nan')):.4f}")
    if loop.stop:
      break
  bar.close()
  for c in hooks:
    c.on_fit_end(loop)
  wall = time.perf_counter() - t_start
  # The first epoch also compiles: time the others when there are any.
  timed = epoch_seconds[1:] or epoch_seconds
  steps = n // config.batch_size
  return FitResult(state=loop.state, history=loop.history,
                   stopped_early=loop.stop, wall_seconds=wall,
                   steps_per_second=steps * len(timed) / sum(timed) if timed else 0.0)


def _run_config(model, optimizer: str, data: Dataset, config: FitConfig,
                extra: dict | None) -> dict:
  """config.json of a run: what resume checks and `load_run` rebuilds from."""
  run_config = {"model": describe_model(model),
                "model_spec": models.describe(model), "optimizer": optimizer,
                "dataset": data.name, "epochs": config.epochs,
                "batch_size": config.batch_size, "seed": config.seed,
                "input_shape": list(data.input_shape),
                "num_classes": data.num_classes, **(extra or {})}
  if (config.parallel, config.precision) != ("none", "fp32"):
    run_config.update(parallel=config.parallel, precision=config.precision)
  return run_config


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


def load_run_data(config: dict) -> Dataset:
  """The data set a run was trained on, split and scaled as it was, from its
  config.json (the command line records how it named the data: a path for
  .npz files)."""
  return data_lib.load(config.get("data", config["dataset"]),
                   data_dir=config.get("data_dir"),
                   validation=config.get("validation", 0.1),
                   seed=config.get("seed", 0),
                   normalize=config.get("normalize", "unit"),
                   nan_policy=config.get("nan_policy", "drop"),
                   num_classes=config["num_classes"])
