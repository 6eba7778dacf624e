"""Run directories: `config.json`, `metrics.jsonl` and orbax checkpoints.

A run directory holds everything needed to resume or reuse a run:

    config.json        the full run config, chain spec included
    metrics.jsonl      one JSON line per epoch
    normalization.npz  how raw inputs were scaled (for `predict`)
    checkpoint/<epoch> orbax checkpoints: the train state and fit progress

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed at any moment leaves the last complete one intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxaccel.errors import CheckpointError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
NORMALIZATION = "normalization.npz"


def _to_storable(state):
  """Typed PRNG keys become their raw uint32 data, which orbax can store."""
  return state._replace(rng=jax.random.key_data(state.rng))


def _from_storable(state, impl):
  return state._replace(rng=jax.random.wrap_key_data(state.rng, impl=impl))


@contextlib.contextmanager
def _quiet_absl():
  """Holds back absl's warnings (orbax logs through it) for a moment."""
  log = logging.getLogger("absl")
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


class RunDir:
  """Reads and writes one run directory."""

  def __init__(self, path, *, max_to_keep: int = 2):
    self.path = pathlib.Path(path)
    self._max_to_keep = max_to_keep
    self._manager = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          (self.path / "checkpoint").absolute(),
          options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep,
                                               create=True))
    return self._manager

  # ----------------------------------------------------------- config, metrics
  def write_config(self, config: dict) -> None:
    self.path.mkdir(parents=True, exist_ok=True)
    tmp = self.path / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(self.path / CONFIG)

  def has_config(self) -> bool:
    return (self.path / CONFIG).is_file()

  def read_config(self) -> dict:
    f = self.path / CONFIG
    if not f.is_file():
      raise CheckpointError(f"no run found at {self.path}: {CONFIG} is missing; "
                            "give the --out directory of a `jaxaccel train` run")
    try:
      return json.loads(f.read_text())
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{f} is corrupt ({e}); retrain the run")

  def append_metrics(self, record: dict) -> None:
    with open(self.path / METRICS, "a") as f:
      f.write(json.dumps(record) + "\n")

  def read_metrics(self) -> list[dict]:
    f = self.path / METRICS
    if not f.is_file():
      return []
    records = []
    for line in f.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break   # a line cut short by a kill: everything after it is stale
    return records

  def truncate_metrics(self, last_epoch: int) -> list[dict]:
    """Keeps the metric lines of epochs <= last_epoch (used on resume)."""
    kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
    tmp = self.path / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(self.path / METRICS)
    return kept

  def write_normalization(self, **arrays: np.ndarray) -> None:
    np.savez(self.path / NORMALIZATION, **arrays)

  def read_normalization(self) -> dict[str, np.ndarray]:
    f = self.path / NORMALIZATION
    if not f.is_file():
      return {}
    with np.load(f, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}

  # ---------------------------------------------------------------- checkpoints
  def latest_epoch(self) -> int | None:
    if not (self.path / "checkpoint").is_dir():
      return None
    # Another process (a requeued run) may have written since we looked.
    self.manager.reload()
    return self.manager.latest_step()

  def save(self, epoch: int, state, progress: dict) -> None:
    """Saves the train state and fit progress after `epoch`, synchronously."""
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_storable(state)),
        progress=ocp.args.JsonSave(progress)), force=True)
    self.manager.wait_until_finished()

  def restore(self, like) -> tuple[Any, dict]:
    """Restores the latest train state into the structure of `like`."""
    epoch = self._require_checkpoint()
    target = jax.tree.map(np.zeros_like, _to_storable(like))
    try:
      out = self.manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          progress=ocp.args.JsonRestore()))
    except Exception as e:   # orbax raises many types for damaged files
      raise CheckpointError(
          f"checkpoint {self.path / 'checkpoint' / str(epoch)} cannot be "
          f"restored ({type(e).__name__}: {str(e)[:200]}); it is corrupt or "
          "from a different model/optimizer: retrain, or delete it to start "
          "over") from None
    got = [(a.shape, a.dtype) for a in jax.tree.leaves(out.state)]
    want = [(a.shape, a.dtype) for a in jax.tree.leaves(target)]
    if got != want:
      bad = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w) \
          if len(got) == len(want) else None
      detail = (f"array {bad} is {got[bad]} in the checkpoint, {want[bad]} in "
                "the model" if bad is not None else
                f"{len(got)} arrays in the checkpoint, {len(want)} expected")
      raise CheckpointError(
          f"checkpoint {self.path / 'checkpoint' / str(epoch)} is from a "
          f"different model or optimizer ({detail}); use the settings it was "
          "trained with, or a new --out")
    impl = jax.random.key_impl(like.rng)
    return _from_storable(out.state, impl), dict(out.progress)

  def save_variables(self, variables: dict) -> None:
    """Saves inference variables alone (`{"params", **model_state}`, no
    optimizer), readable by `restore_variables`: a compressed model."""
    variables = dict(variables)
    state = {"params": variables.pop("params"), "model_state": variables}
    self.manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state)), force=True)
    self.manager.wait_until_finished()

  def restore_variables(self) -> dict:
    """Restores only params and model state, with no optimizer needed."""
    epoch = self._require_checkpoint()
    try:
      # Host arrays shaped from the metadata: a run saved from many devices
      # (or processes) is then readable on any number of devices.
      with _quiet_absl():   # "Metadata file does not exist": harmless
        meta = ocp.StandardCheckpointer().metadata(
            (self.path / "checkpoint" / str(epoch) / "state").absolute())
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                            meta.item_metadata)
      out = self.manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      return {"params": out.state["params"], **out.state["model_state"]}
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {self.path / 'checkpoint' / str(epoch)} cannot be read "
          f"({type(e).__name__}: {str(e)[:200]}); it is corrupt: retrain the "
          "run") from None

  def _require_checkpoint(self) -> int:
    epoch = self.latest_epoch()
    if epoch is None:
      raise CheckpointError(f"no checkpoint in {self.path / 'checkpoint'}; "
                            "train first with `jaxaccel train --out "
                            f"{self.path}`")
    return epoch

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None
