"""Callbacks: what `fit` calls around its epochs, for a user's own logging.

A callback overrides the hooks it needs. `on_epoch_end` gets the epoch's
record (the line `metrics.jsonl` gets) and the state; returning True stops
the run after that epoch.

Examples:
  >>> class PrintLoss(Callback):
  ...   def on_epoch_end(self, record, state):
  ...     print(f"epoch {record['epoch']}: {record['train_loss']:.2f}")
  >>> PrintLoss().on_epoch_end({"epoch": 1, "train_loss": 0.5}, None)
  epoch 1: 0.50
"""

from __future__ import annotations

import math
import pathlib


class Callback:
  """Hooks of one `fit` run; each default does nothing."""

  def on_fit_start(self, *, start_epoch: int, epochs: int) -> None:
    """Before the first epoch runs (`start_epoch` > 0 when resuming)."""

  def on_epoch_end(self, record: dict, state) -> bool | None:
    """After each epoch; return True to stop the run there."""

  def on_fit_end(self, history: list[dict]) -> None:
    """After the last epoch, also when the run stopped early."""


class TensorBoard(Callback):
  """Writes every number of each epoch's record as a TensorBoard scalar
  (`train_loss`, `val_accuracy`, `learning_rate`, ...) at step = epoch.

  Args:
    logdir: where the event files go, e.g. `RUN/tensorboard`; view them with
      `tensorboard --logdir RUN`.
  """

  def __init__(self, logdir):
    from tensorboardX import SummaryWriter   # only runs that log need it
    self.logdir = pathlib.Path(logdir)
    self._writer = SummaryWriter(str(self.logdir))

  def on_epoch_end(self, record, state):
    del state
    for name, value in record.items():
      if (name != "epoch" and isinstance(value, (int, float))
          and not isinstance(value, bool) and math.isfinite(value)):
        self._writer.add_scalar(name, value, global_step=record["epoch"])
    self._writer.flush()

  def on_fit_end(self, history):
    del history
    self._writer.close()
