"""Callbacks: everything `fit` does around its epochs besides training.

`fit` runs the epochs; writing the run directory, early stopping, feeding
the plateau signal to `reduce_on_plateau` and TensorBoard logging are
callbacks, and a user's own are the same kind of object. A callback
overrides the hooks it needs; each gets the `FitLoop`, whose `state` it may
replace and whose `stop` it may set. A callback whose `progress()` returns
something has it saved with every checkpoint and handed back to `restore`
on resume, so a resumed run decides exactly as an uninterrupted one.

Every process of a multi-process run calls every callback (so all of them
stop at the same epoch); write files only from `jax.process_index() == 0`.

Examples:
  >>> class PrintLoss(Callback):
  ...   def on_epoch_end(self, loop, record):
  ...     print(f"epoch {record['epoch']}: {record['train_loss']:.2f}")
  >>> PrintLoss().on_epoch_end(None, {"epoch": 1, "train_loss": 0.5})
  epoch 1: 0.50
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from typing import Any

import jax

from jaxaccel import optim
from jaxaccel.checkpoint import RunDir
from jaxaccel.errors import CheckpointError, ConfigError


@dataclasses.dataclass
class FitLoop:
  """What a `fit` run's callbacks see, and may change between epochs."""
  state: Any                    # the TrainState, in host form
  epochs: int                   # the epoch the run ends after
  callbacks: list               # every callback of the run, in call order
  task: Any = None              # the run's `jaxaccel.tasks.Task`
  epoch: int = 0                # epochs completed (> 0 once resumed)
  history: list = dataclasses.field(default_factory=list)   # one record each
  stop: bool = False            # set to end the run after this epoch

  def progress(self) -> dict:
    """What a checkpoint saves besides the state: the epoch and each
    callback's own progress."""
    saved = {"epoch": self.epoch}
    for c in self.callbacks:
      saved.update(c.progress())
    return saved


class Callback:
  """Hooks of one `fit` run; each default does nothing."""

  def on_fit_start(self, loop: FitLoop) -> None:
    """Before the first epoch runs (`loop.epoch` > 0 when resuming)."""

  def on_epoch_end(self, loop: FitLoop, record: dict) -> None:
    """After each epoch, with the line `metrics.jsonl` gets; set `loop.stop`
    to end the run there."""

  def on_fit_end(self, loop: FitLoop) -> None:
    """After the last epoch, also when the run stopped early."""

  def progress(self) -> dict:
    """JSON-able values saved with each checkpoint (keys unique per run)."""
    return {}

  def restore(self, progress: dict) -> None:
    """Takes back what `progress` returned, when a run resumes."""


def _is_main_process() -> bool:
  return jax.process_index() == 0


class EarlyStopping(Callback):
  """Stops when a validation metric has not improved for `patience` epochs.

  Args:
    metric: the record's key to watch: `"val_loss"` (lower is better) or
      `"val_"` + the task's ranking metric (`val_accuracy` for classification,
      higher is better; `val_mse`, `val_bits_per_byte`: lower is). Default:
      the task's ranking metric.
    patience: epochs without improvement before the run stops.
    min_delta: how much better a value must be to count as improved.
  """

  def __init__(self, metric: str | None = None, patience: int = 3,
               min_delta: float = 0.0):
    if metric is not None and not metric.startswith("val_"):
      raise ConfigError(f"early stopping watches a validation metric (val_loss, "
                        f"or val_ and the task's metric); got {metric!r}")
    if patience < 1:
      raise ConfigError(f"early-stopping patience must be at least 1; got {patience}")
    self.metric, self.patience, self.min_delta = metric, patience, min_delta
    self.maximize = False
    self.best, self.bad_epochs = None, 0

  def improved(self, value: float) -> bool:
    if self.best is None:
      return True
    return (value > self.best + self.min_delta if self.maximize
            else value < self.best - self.min_delta)

  def on_fit_start(self, loop):
    task = loop.task
    ranked = f"val_{task.metric}" if task is not None else "val_accuracy"
    self.metric = self.metric or ranked
    if self.metric not in ("val_loss", ranked):
      raise ConfigError(f"early stopping watches val_loss or {ranked} (the "
                        f"task's ranking metric); got {self.metric!r}")
    self.maximize = self.metric == ranked and (task is None or task.maximize)
    self.best, self.bad_epochs = None, 0

  def on_epoch_end(self, loop, record):
    if self.metric not in record:
      raise ConfigError(f"early stopping watches {self.metric!r}, which needs "
                        "a validation split (validation > 0)")
    value = record[self.metric]
    if self.improved(value):
      self.best, self.bad_epochs = value, 0
    else:
      self.bad_epochs += 1
    loop.stop = loop.stop or self.bad_epochs >= self.patience

  def progress(self):
    return {"best": self.best, "bad_epochs": self.bad_epochs}

  def restore(self, progress):
    self.best, self.bad_epochs = progress["best"], progress["bad_epochs"]


class PlateauSignal(Callback):
  """Feeds each epoch's validation loss to `reduce_on_plateau` in the
  optimizer state; `fit` adds it whenever the chain has one (and refuses a
  run without a validation split first). The record then shows the scale
  set for the next epoch."""

  def on_epoch_end(self, loop, record):
    loop.state = loop.state._replace(opt_state=optim.observe_plateau(
        loop.state.opt_state, record["val_loss"]))
    record.update({k: float(v) for k, v in
                   optim.hyperparams(loop.state.opt_state).items()})


class RunDirectory(Callback):
  """Writes a run directory (config.json, normalization.npz, metrics.jsonl,
  a checkpoint per epoch) and resumes from it; `fit(out=...)` adds it last,
  so each checkpoint holds every other callback's progress.

  Args:
    path: the run directory.
    config: the run's config.json; on resume, its model, optimizer, data set,
      batch size and seed must match the saved one.
    normalization: arrays saved for `predict` (how raw inputs were scaled).
    resume: continue from the last checkpoint. With none there yet (or no
      directory at all) the run starts fresh and says so on stderr, so a
      requeued job can always run the same command.
  """
  MUST_MATCH = ("model", "optimizer", "dataset", "batch_size", "seed")

  def __init__(self, path, config: dict, *, normalization: dict | None = None,
               resume: bool = False):
    self.run = RunDir(path)
    self.config, self.normalization = config, normalization or {}
    self.resume = resume

  def on_fit_start(self, loop):
    run, main = self.run, _is_main_process()
    if self.resume and run.has_config():
      old = run.read_config()
      changed = [k for k in self.MUST_MATCH if old.get(k) != self.config.get(k)]
      if changed:
        raise CheckpointError(
            f"cannot resume {run.path}: {', '.join(changed)} differ(s) from the "
            f"saved run ({changed[0]}: saved {old.get(changed[0])!r}, now "
            f"{self.config.get(changed[0])!r}); use the same settings or a new --out")
    latest = run.latest_epoch()
    if self.resume and latest is not None:
      loop.state, progress = run.restore(loop.state)
      loop.epoch = progress["epoch"]
      loop.history = run.truncate_metrics(loop.epoch)
      for c in loop.callbacks:
        c.restore(progress)
      return
    if latest is not None:
      raise CheckpointError(f"{run.path} already holds a run; pass --resume to "
                            "continue it or choose a new --out")
    if self.resume and main:
      # A requeued job killed before its first checkpoint (or never started)
      # runs the same command: start it fresh.
      sys.stderr.write(f"jaxaccel: no checkpoint in {run.path} yet; "
                       "starting a fresh run\n")
    if main:
      run.write_config(self.config)
      run.write_normalization(**self.normalization)
      (run.path / "metrics.jsonl").unlink(missing_ok=True)

  def on_epoch_end(self, loop, record):
    # Metrics first: a kill between the two leaves a line that resume drops.
    if _is_main_process():
      self.run.append_metrics(record)
    self.run.save(loop.epoch, loop.state, loop.progress())

  def on_fit_end(self, loop):
    self.run.close()


class TensorBoard(Callback):
  """Writes every number of each epoch's record as a TensorBoard scalar
  (`train_loss`, `val_accuracy`, `learning_rate`, ...) at step = epoch.

  Args:
    logdir: where the event files go, e.g. `RUN/tensorboard`; view them with
      `tensorboard --logdir RUN`.
  """

  def __init__(self, logdir):
    self.logdir = pathlib.Path(logdir)
    self._writer = None

  def on_fit_start(self, loop):
    if _is_main_process():
      from jaxaccel.errors import optional   # only runs that log need it
      writer = optional("tensorboardX", "tensorboard").SummaryWriter
      self._writer = writer(str(self.logdir))

  def on_epoch_end(self, loop, record):
    if self._writer is None:
      return
    for name, value in record.items():
      if (name != "epoch" and isinstance(value, (int, float))
          and not isinstance(value, bool) and math.isfinite(value)):
        self._writer.add_scalar(name, value, global_step=record["epoch"])
    self._writer.flush()

  def on_fit_end(self, loop):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
