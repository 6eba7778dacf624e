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

from jaxaccel import (backends, data as data_lib, models, tracing, optim, parallel as parallel_lib,
                      tasks as tasks_lib)
from jaxaccel.checkpoint import RunDir
from jaxaccel.core import (Callback, EarlyStopping, FitLoop, PlateauSignal,
                           RunDirectory, TrainState, compiled, init_state,
                           make_eval_step, variables_of)
from jaxaccel.data import Dataset, check_labels
from jaxaccel.data.streams import ArrayFiles, Stream
from jaxaccel.errors import CheckpointError, ConfigError, DataError
from jaxaccel.models import adapt


@functools.lru_cache(maxsize=16)
def _jitted_eval_step(model, task):
  return compiled.jit(make_eval_step(model, task))


@functools.lru_cache(maxsize=16)
def _jitted_logits(model):
  return compiled.jit(model.logits)


def eval_batches(arrays: dict, batch_size: int):
  """Fixed-size eval batches of a dict of arrays (one compile serves all);
  the rows that fill the last one have `mask` 0 (any mask of the data's
  own is kept for the others)."""
  n = len(arrays["x"])
  batch_size = min(batch_size, n)
  for start in range(0, n, batch_size):
    rows = min(batch_size, n - start)
    batch = {k: data_lib.pad_rows(np.asarray(a[start:start + batch_size]),
                                  batch_size)
             for k, a in arrays.items()}
    valid = (np.arange(batch_size) < rows).astype(np.float32)
    mask = batch.get("mask")
    batch["mask"] = (valid if mask is None else
                     mask * valid.reshape((-1,) + (1,) * (np.ndim(mask) - 1)))
    yield batch


def _variables(state_or_variables) -> dict:
  return (variables_of(state_or_variables)
          if isinstance(state_or_variables, TrainState) else state_or_variables)


def evaluate(model, state_or_variables, x, y: np.ndarray | None = None, *,
             task=None, batch_size: int = 1024) -> dict:
  """The task's loss and metrics of a model on (x, y), in eval mode
  (running batch-norm statistics).

  Args:
    model: any model `jaxaccel.models.adapt` takes.
    state_or_variables: a `TrainState` or `{"params": ..., **model_state}`.
    x: inputs; or a batch dict of whole arrays (`Dataset.arrays(split)`:
      "x", "y" and extras such as a "mask"), with `y` None; or arrays on
      disk (`jaxaccel.data.ArrayFiles`), read a batch at a time; or a
      `Stream` (`jaxaccel.data.streams`), of which one epoch is read.
    y: targets.
    task: a `jaxaccel.tasks.Task` or its name (default: inferred from the
      targets, as `fit` does).

  Returns:
    {"loss": ..., each metric of the task, its derived figures}: means over
    every valid target; NaN for an empty split.
  """
  if task is None and isinstance(x, Stream):
    task = resolve_task(None, x)
  elif task is None:   # from the targets, as `fit` infers it
    task = tasks_lib.infer(x.columns["y"][:1] if isinstance(x, ArrayFiles)
                           else x["y"] if isinstance(x, dict) else y)
  task = tasks_lib.get(task)
  step = _jitted_eval_step(adapt(model), task)
  if isinstance(x, Stream):
    batches = epoch_batches(x)
  elif isinstance(x, ArrayFiles):   # read a slice of rows at a time
    batches = (b for lo in range(0, len(x), batch_size)
               for b in eval_batches(x[lo:lo + batch_size], batch_size))
  else:
    arrays = dict(x) if isinstance(x, dict) else {"x": x, "y": y}
    batches = eval_batches(arrays, batch_size) if len(arrays["x"]) else ()
  totals: dict = {}
  for batch in batches:
    for k, v in step(_variables(state_or_variables), batch).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if isinstance(x, Stream) and jax.process_count() > 1:
    # Each process read its own rows: the sums are the processes' together.
    from jax.experimental import multihost_utils
    keys = sorted(totals)
    summed = multihost_utils.process_allgather(
        np.asarray([totals[k] for k in keys])).sum(0)
    totals = dict(zip(keys, map(float, summed)))
  count = totals.pop("count", 0.0)
  if not count:
    return {"loss": float("nan"), task.metric: float("nan")}
  return task.summarize({k: v / count for k, v in totals.items()})


def predict(model, state_or_variables, x: np.ndarray, *,
            batch_size: int = 1024) -> np.ndarray:
  """The model's outputs on x (logits, or a regression's values), in eval
  mode, as a numpy array; x keeps its dtype (token ids stay integers)."""
  variables = _variables(state_or_variables)
  apply = _jitted_logits(adapt(model))
  x = np.asarray(x)
  batch_size = max(1, min(batch_size, len(x)))
  outs = [np.asarray(apply(variables, xb))[:n]
          for xb, n in data_lib.padded_batches(x, batch_size)]
  return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------- fit

@dataclasses.dataclass(frozen=True)
class FitConfig:
  """What a `fit` run computes: the loop, the step, the placement.

  `fit(model, tx, data, FitConfig(epochs=5, parallel="pmap"))` and
  `fit(model, tx, data, epochs=5, parallel="pmap")` are the same run.
  """
  # The loop.
  epochs: int | None = None     # passes over the training set
  steps: int | None = None      # or: steps in all, in place of epochs (the
                                # last epoch stops short)
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
  task: Any = None              # a `jaxaccel.tasks.Task` or its name;
                                # None: inferred from the targets
                                # (`tasks.infer`)
  loss_fn: Callable | None = None     # (outputs, labels[, teacher_outputs]),
                                      # in place of the task's loss
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
    if (self.epochs is None) == (self.steps is None):
      raise ConfigError("give either epochs or steps (the length of the run)"
                        if self.epochs is None else
                        "give epochs or steps, not both")
    for name in ("epochs", "steps"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ConfigError(f"{name} must be positive; got {value}")
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


def _summarize(metrics: dict, task: tasks_lib.Task) -> dict:
  """An epoch's record from its steps' metrics: means over the finite
  steps, as `train_NAME`."""
  m = {k: np.asarray(v) for k, v in metrics.items()}
  finite = m.pop("finite")
  n_ok = max(float(finite.sum()), 1.0)
  means = task.summarize({k: float(v.sum() / n_ok) for k, v in m.items()})
  return {**{f"train_{k}": v for k, v in means.items()},
          "skipped_steps": int(len(finite) - finite.sum()),
          "steps": int(len(finite))}


def epoch_batches(stream: Stream):
  """This process's batches of a stream's first epoch."""
  it = stream.iterator(process_index=jax.process_index(),
                       process_count=jax.process_count())
  try:
    for _ in range(stream.steps_per_epoch):
      yield next(it)
  finally:
    it.close()


def input_spec(data: Dataset | Stream) -> tuple[tuple[int, ...], np.dtype]:
  """The shape (without the batch axis) and dtype of one input."""
  if isinstance(data, Stream):
    spec = data.element_spec["x"]
    return tuple(spec.shape), np.dtype(spec.dtype)
  return data.input_shape, data.input_dtype


def resolve_task(task, data: Dataset | Stream) -> tasks_lib.Task:
  """The task a run trains for: the one given, or the one its training
  targets suggest (`tasks.infer`)."""
  if task is not None:
    return tasks_lib.get(task)
  if isinstance(data, Stream):
    spec = data.element_spec["y"]
    return tasks_lib.get(tasks_lib.infer(np.zeros((1, *spec.shape), spec.dtype)))
  return tasks_lib.get(tasks_lib.infer(data.y_train))


def check_data(model, data: Dataset | Stream, batch_size: int,
               task: tasks_lib.Task | None = None) -> None:
  """Errors, before any work, for data that `model` cannot train on."""
  if isinstance(data, Stream):
    if "y" not in data.element_spec:
      raise DataError(f"the stream's batches hold {sorted(data.element_spec)}; "
                      "give each a 'y' (the targets) beside 'x'")
    if batch_size % jax.process_count():
      raise ConfigError(f"batch size {batch_size} does not split over the "
                        f"{jax.process_count()} processes")
    models.output_classes(model, *input_spec(data))   # the model takes it
    return
  if batch_size <= 0:
    raise ConfigError(f"batch size must be positive; got {batch_size}")
  if len(data.x_train) < batch_size:
    raise ConfigError(f"batch size {batch_size} is larger than the {len(data.x_train)} "
                      "training examples; use a smaller --batch-size")
  task = task or resolve_task(None, data)
  if task.name == "regression" and not np.issubdtype(data.y_train.dtype,
                                                    np.floating):
    raise DataError(f"the regression task takes float targets; y_train has "
                    f"dtype {data.y_train.dtype}: give float targets, or use "
                    "the classification task for class ids")
  if task.name == "lm" and data.y_train.ndim < 2:
    raise DataError(f"the lm task takes a target per position, (n, length); "
                    f"y_train has shape {data.y_train.shape}, one per example: "
                    "use the classification task")
  if task.name in ("classification", "lm"):
    if not np.issubdtype(data.y_train.dtype, np.integer):
      raise DataError(f"the {task.name} task needs integer class ids as "
                      f"targets; y_train has dtype {data.y_train.dtype}: use "
                      "task='regression' for float targets")
    shape = models.output_shape(model, data.input_shape, data.input_dtype)
    want = (1, *data.y_train.shape[1:])
    if shape[:-1] != want:
      raise DataError(
          f"the model gives outputs of shape {shape} for one example, but "
          f"{task.name} targets need {want} plus a class axis"
          + (": use a sequence model such as --model gpt"
             if task.name == "lm" else ""))
    num_out = shape[-1] if len(shape) >= 2 else None
    if num_out is not None:
      check_labels(data.y_train, num_out, "training labels")
      check_labels(data.y_test, num_out, "test labels")
  for split in ("train", "val", "test"):
    x = getattr(data, f"x_{split}")
    if (len(x) and np.issubdtype(x.dtype, np.floating)
        and not np.all(np.isfinite(x))):
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
  if backends.formulation() != "cpu":
    return True
  apply = lambda p, s, x, rng: model.apply(p, s, x, train=True, rng=rng)[0]
  jaxpr = jax.make_jaxpr(apply)(state.params, state.model_state,
                                jnp.asarray(sample), state.rng)
  names = tracing.primitive_names(jaxpr.jaxpr, opaque=("custom_vjp",))
  return "conv_general_dilated" not in names


class ArrayEpochs(Callback):
  """Feeds `fit` the epochs of a `Dataset` held in memory: each epoch's
  batch order is a function of the seed and the epoch only (`epoch_order`),
  so a resumed run needs nothing else saved; the epoch runs as one compiled
  scan with the data on the devices, or step by step."""

  def __init__(self, data: Dataset, engine, *, batch_size: int, seed: int,
               use_scan: bool):
    self.arrays = data.arrays("train")
    self.engine, self.batch_size, self.seed = engine, batch_size, seed
    self.use_scan = use_scan
    self.steps_per_epoch = len(data.x_train) // batch_size

  def run(self, state, epoch: int, *, steps: int, progress: bool):
    order = epoch_order(self.seed, epoch, len(self.arrays["x"]),
                        self.batch_size)[:steps]
    return self.engine.run_epoch(state, self.arrays, order,
                                 use_scan=self.use_scan, progress=progress,
                                 desc=f"epoch {epoch + 1}")


class StreamEpochs(Callback):
  """Feeds `fit` the epochs of a `Stream`, this process's rows of each
  global batch. One iterator runs across epochs; its position goes into
  every checkpoint and comes back on resume, so a resumed run reads exactly
  the batches an uninterrupted one would (a plain iterable's stream saves
  none: it starts the resumed epoch again from `make_batches(epoch)`)."""

  def __init__(self, stream: Stream, engine):
    self.stream, self.engine = stream, engine
    self.steps_per_epoch = stream.steps_per_epoch
    self._saved, self._it = None, None

  def run(self, state, epoch: int, *, steps: int, progress: bool):
    if self._it is None:
      self._it = self.stream.iterator(
          epoch=epoch, state=self._saved, process_index=jax.process_index(),
          process_count=jax.process_count())
    place = self.engine.placement.local_batch
    batches = (place(next(self._it)) for _ in range(steps))
    return self.engine.run_steps(state, batches, steps,
                                 progress=progress, desc=f"epoch {epoch + 1}")

  def progress(self):
    return {"stream": self._it.get_state() if self._it else self._saved}

  def restore(self, progress):
    self._saved = progress.get("stream")

  def on_fit_end(self, loop):
    if self._it is not None:
      self._it.close()
      self._it = None


def fit(model, tx: optax.GradientTransformation | optim.Spec,
        data: Dataset | Stream,
        config: FitConfig | None = None, *, state: TrainState | None = None,
        val_data=None, out=None, resume: bool = False,
        run_config: dict | None = None,
        early_stopping: EarlyStopping | None = None,
        callbacks: Sequence[Callback] = (), progress: bool = True,
        **options) -> FitResult:
  """Trains `model` with the optax transformation `tx` on `data`.

  Args:
    model: a flax linen module (any common call signature), a flax NNX
      module, or plain functions (see `jaxaccel.models.adapt`).
    tx: any optax transformation, or a chain spec (see `jaxaccel.optim`).
    data: a `Dataset` (see `jaxaccel.data.load` and `from_arrays`), or a
      `Stream` of batches read from disk or made on the fly
      (`jaxaccel.data.streams`: a grain source, whose position is saved
      with each checkpoint, or any iterable of batch dicts); a stream's
      batch size is its own.
    config: a `FitConfig`; or give its fields as keywords (`epochs=5`), which
      also override the ones of `config`.
    val_data: what each epoch is validated on: default the `Dataset`'s
      validation split; for a stream, an `ArrayFiles`, a `Stream` or a
      batch dict of arrays (none when not given).
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
  if isinstance(data, Stream):
    if options.get("batch_size", data.batch_size) != data.batch_size:
      raise ConfigError(f"batch_size={options['batch_size']} differs from the "
                        f"stream's batch size {data.batch_size}: build the "
                        "stream with the batch size to train with")
    config = dataclasses.replace(config, batch_size=data.batch_size)
  elif val_data is None:
    val_data = data.arrays("val")
  task = resolve_task(config.task, data)
  check_data(model, data, config.batch_size, task)
  has_val = val_data is not None and (
      isinstance(val_data, Stream)
      or len(val_data["x"] if isinstance(val_data, dict) else val_data) > 0)
  if resume and out is None:
    raise ConfigError("resume needs the run directory: pass out=... "
                      "(--out on the command line)")

  engine = parallel_lib.make_engine(
      model, tx, mode=config.parallel, mesh_shape=config.mesh_shape,
      precision=config.precision, rules=config.shard_rules, fsdp=config.fsdp,
      task=task, loss_fn=config.loss_fn, augment=config.augment,
      skip_nonfinite=config.skip_nonfinite, teacher=config.teacher)
  engine.check_batch(config.batch_size)
  if state is not None and jax.tree.structure(state.opt_state) != (
      jax.tree.structure(jax.eval_shape(engine.tx.init, state.params))):
    raise ConfigError(
        "the given state's optimizer state does not fit the transformation "
        f"fit runs with precision={config.precision!r}; build it with the "
        "optimizer of precision.apply_policy(model, tx, precision)")
  input_shape, input_dtype = input_spec(data)
  if state is None:
    state = init_state(model, engine.tx, input_shape, seed=config.seed,
                       dtype=input_dtype)
  if isinstance(data, Stream):
    feeder = StreamEpochs(data, engine)
  else:
    feeder = ArrayEpochs(data, engine, batch_size=config.batch_size,
                         seed=config.seed, use_scan=config.epoch_mode == "scan"
                         or (config.epoch_mode == "auto"
                             and data.x_train.nbytes < config.scan_max_bytes
                             and scan_pays(model, state, data.x_train[:1])))

  per_epoch = feeder.steps_per_epoch
  epochs = config.epochs or -(-config.steps // per_epoch)
  total_steps = config.steps or epochs * per_epoch

  # Callbacks: the built-in ones that change the state or the stop decision
  # first, the user's next, the run directory last (it checkpoints them all).
  hooks = [feeder]
  if optim.has_plateau(state.opt_state):
    if not has_val:
      raise ConfigError("reduce_on_plateau watches the validation loss, which "
                        "needs a validation split (validation > 0)")
    hooks.append(PlateauSignal())
  hooks += [early_stopping] if early_stopping is not None else []
  hooks += list(callbacks)
  if out is not None:
    hooks.append(RunDirectory(
        out, _run_config(model, spec or _describe_tx(tx), data, task, config,
                         run_config),
        normalization=getattr(data, "stats", None), resume=resume))

  # In a multi-process run only process 0 shows progress.
  progress = progress and parallel_lib.is_main_process()
  # A fresh copy: donation deletes the buffers of the state passed in.
  loop = FitLoop(state=jax.tree.map(jnp.array, state), epochs=epochs,
                 callbacks=hooks, task=task)
  for c in hooks:
    c.on_fit_start(loop)
  t_start = time.perf_counter()
  epoch_seconds, epoch_steps = [], []
  bar = tqdm(range(loop.epoch, epochs), initial=loop.epoch,
             total=epochs, desc="fit", unit="epoch",
             disable=not progress, leave=False)
  val_key = f"val_{task.metric}"
  for epoch in bar:
    t0 = time.perf_counter()
    epoch_steps.append(min(per_epoch, total_steps - epoch * per_epoch))
    loop.state, metrics = feeder.run(loop.state, epoch, steps=epoch_steps[-1],
                                     progress=progress)
    loop.epoch = epoch + 1
    record = {"epoch": loop.epoch, "step": int(loop.state.step),
              **_summarize(metrics, task)}
    epoch_seconds.append(time.perf_counter() - t0)
    if has_val:
      val = evaluate(model, loop.state, val_data, task=task)
      record.update({f"val_{k}": v for k, v in val.items()})
    # Hyperparameters held in the optimizer state: the learning rate first.
    record.update({k: float(v) for k, v in
                   optim.hyperparams(loop.state.opt_state).items()})
    record["epoch_seconds"] = round(epoch_seconds[-1], 4)
    loop.history.append(record)
    for c in hooks:
      c.on_epoch_end(loop, record)
    bar.set_postfix({"loss": f"{record['train_loss']:.4f}",
                     val_key: f"{record.get(val_key, float('nan')):.4f}"})
    if loop.stop:
      break
  bar.close()
  for c in hooks:
    c.on_fit_end(loop)
  wall = time.perf_counter() - t_start
  # The first epoch also compiles: time the others when there are any.
  first = 1 if len(epoch_seconds) > 1 else 0
  timed = sum(epoch_seconds[first:])
  return FitResult(state=loop.state, history=loop.history,
                   stopped_early=loop.stop, wall_seconds=wall,
                   steps_per_second=sum(epoch_steps[first:]) / timed
                   if timed else 0.0)


def _run_config(model, optimizer: str, data: Dataset | Stream,
                task: tasks_lib.Task, config: FitConfig,
                extra: dict | None) -> dict:
  """config.json of a run: what resume checks and `load_run` rebuilds from,
  the data's description (`data.describe`, or the stream's) among it."""
  input_shape, input_dtype = input_spec(data)
  if isinstance(data, Stream):
    description, num_classes = data.description, None
    name = description.get("name", "stream")
  else:
    description, num_classes = data_lib.describe(data), data.num_classes
    name = data.name
  run_config = {"model": describe_model(model),
                "model_spec": models.describe(model), "optimizer": optimizer,
                "dataset": name, "data": description,
                "task": task.name, "epochs": config.epochs, "steps": config.steps,
                "batch_size": config.batch_size, "seed": config.seed,
                "input_shape": list(input_shape),
                "input_dtype": str(input_dtype),
                "num_classes": num_classes, **(extra or {})}
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
      name = " ".join(str(config.get("model", "unknown")).split())
      raise CheckpointError(
          f"{run.path} was trained with a model that config.json cannot "
          f"rebuild ({name if len(name) <= 60 else name[:57] + '...'}); load "
          "it in Python with the model object: "
          "jaxaccel.train.load_run(path, model=...)")
    model = models.from_description(desc)
  try:
    variables = run.restore_variables()
  finally:
    run.close()
  return model, variables, config


def load_run_data(config: dict, data: Dataset | None = None) -> Dataset:
  """The data set a run was trained on, split and scaled as it was: `data`
  when given, else rebuilt from the description in its config.json
  (`data.rebuild`), which refuses, saying to pass `data`, when it cannot."""
  if data is not None:
    return data
  if not isinstance(config.get("data"), dict):
    raise DataError("the run's config.json holds no description of its data "
                    "(it was written by an older jaxaccel): pass the data "
                    "set (data=...) or train the run again")
  return data_lib.rebuild(config["data"])
