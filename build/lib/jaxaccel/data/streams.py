"""Streamed data for the training loop: grain data sets, iterables of batches.

A `Stream` is data that does not sit in memory as one array. The training
loop asks it for an iterator that crosses epoch boundaries by itself and
yields this process's rows of each global batch as a dict of numpy arrays.
A stream built on grain (`from_grain`) also saves its position as a small
JSON-able state, so that a resumed run sees exactly the batches an
uninterrupted one would have seen; one built on a plain iterable
(`from_iterable`) cannot.

Examples:
  >>> import json
  >>> import numpy as np
  >>> from jaxaccel.data import streams
  >>> rows = [{"x": np.full(3, i, np.float32), "y": i} for i in range(10)]
  >>> stream = streams.from_grain(rows, batch_size=4, seed=0)
  >>> stream.steps_per_epoch, stream.element_spec["x"].shape
  (2, (3,))
  >>> it = stream.iterator()
  >>> seen = [next(it)["y"] for _ in range(3)]
  >>> state = json.loads(json.dumps(it.get_state()))   # as checkpoints keep it
  >>> it.epoch, state["epoch"], state["step"]
  (1, 1, 1)
  >>> resumed = stream.iterator(state=state)
  >>> np.array_equal(next(it)["y"], next(resumed)["y"])
  True
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grain
import jax
import numpy as np

from jaxaccel.errors import ConfigError, DataError

__all__ = ["ArrayFiles", "Stream", "StreamIterator", "from_grain",
           "from_iterable", "hash_files", "save_arrays", "split_files"]

Batch = dict[str, np.ndarray]


class StreamIterator(abc.ABC):
  """This process's rows of a stream's global batches, epoch after epoch.

  `epoch` is the epoch the next batch belongs to; `get_state()` is the
  position after the last batch returned (JSON-able), or None when the
  stream cannot resume.
  """
  epoch: int

  def __iter__(self) -> StreamIterator:
    return self

  @abc.abstractmethod
  def __next__(self) -> Batch:
    """The next batch: rows [lo, hi) of the next global batch."""

  @abc.abstractmethod
  def get_state(self) -> dict | None:
    """Where this iterator stands, for `Stream.iterator(state=...)`."""

  @abc.abstractmethod
  def close(self) -> None:
    """Stops any background reading."""


class Stream(abc.ABC):
  """Data read batch by batch: see `from_grain` and `from_iterable`."""
  steps_per_epoch: int
  checkpointable: bool

  @property
  @abc.abstractmethod
  def batch_size(self) -> int:
    """Examples per step, all processes together."""

  @property
  @abc.abstractmethod
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of one example (no batch axis), per key."""

  @property
  @abc.abstractmethod
  def description(self) -> dict:
    """What identifies the data, JSON-able, for the run's config.json."""

  @abc.abstractmethod
  def iterator(self, *, epoch: int = 0, state: dict | None = None,
               process_index: int = 0, process_count: int = 1
               ) -> StreamIterator:
    """An iterator from the start of `epoch`, or from a saved `state`.

    Args:
      epoch: the epoch to start at when `state` is None.
      state: a `StreamIterator.get_state()`; it holds its own epoch, so
        `epoch` is then not used.
      process_index: this process's place among the processes.
      process_count: how many processes share each global batch; each
        takes `batch_size // process_count` rows of it, in process order.
    """


# ----------------------------------------------------------- shared checks

def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(value, what: str, hint: str) -> int:
  if not _is_int(value) or value < 1:
    raise ConfigError(f"{what} must be a positive integer; got {value!r}: "
                      f"{hint}")
  return int(value)


def _start_epoch(epoch) -> int:
  if not _is_int(epoch) or epoch < 0:
    raise ConfigError(f"epoch must be a non-negative integer; got {epoch!r}")
  return int(epoch)


def _process_rows(batch_size: int, process_index: int, process_count: int
                  ) -> slice:
  """The rows [lo, hi) of each global batch that one process takes."""
  process_count = _positive_int(process_count, "process_count",
                                "give the number of processes (1 or more)")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index must lie in [0, {process_count}); got "
                      f"{process_index!r}")
  if batch_size % process_count:
    nearest = max(batch_size // process_count, 1) * process_count
    raise ConfigError(
        f"batch size {batch_size} does not split evenly over {process_count} "
        f"processes: use a batch size that is a multiple of {process_count} "
        f"(e.g. {nearest})")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _json_description(description: Mapping | None) -> dict:
  description = dict(description or {})
  try:
    json.dumps(description)
  except TypeError as e:
    raise ConfigError(f"the stream description must be JSON-able, as it is "
                      f"written to config.json; {e}: give strings, numbers, "
                      "lists and dicts") from None
  return description


def _row_keys(row: Any, where: str) -> tuple[str, ...]:
  """The keys of one example or batch, which must be a dict holding "x"."""
  if not isinstance(row, Mapping):
    hint = (" (a filtered grain.MapDataset gives None for dropped rows: "
            "filter before building the source)" if row is None else "")
    raise DataError(f"{where} is a {type(row).__name__}, not a dict of "
                    f"arrays{hint}: give dicts such as {{'x': ..., 'y': ...}}")
  if "x" not in row:
    raise DataError(f"{where} has keys {sorted(row)} but no 'x': the model "
                    "reads its inputs from 'x'; rename the input key to 'x'")
  return tuple(row)


def _spec(example: Mapping) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
          for k, v in example.items()}


# -------------------------------------------------------------------- grain

def _epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit shuffle seed for one epoch, independent across (seed, epoch).

  grain's own reseeding on `repeat` uses seed + epoch, under which seed 1
  would replay seed 0's epochs one epoch late.
  """
  return int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0])


def _stack_rows(rows: list) -> Batch:
  """grain's batch function: checks that the examples agree, then stacks."""
  keys = _row_keys(rows[0], "an example")
  for row in rows[1:]:
    if _row_keys(row, "an example") != keys:
      raise DataError(f"examples have different keys: {sorted(keys)} and "
                      f"{sorted(row)}; every example must have the same keys")
  batch = {}
  for k in keys:
    try:
      batch[k] = np.stack([np.asarray(row[k]) for row in rows])
    except ValueError:
      shapes = sorted({np.shape(row[k]) for row in rows})
      raise DataError(f"examples have {k!r} of different shapes {shapes}; "
                      f"every example's {k!r} must have one shape: pad or "
                      "crop them in the source") from None
  return batch


class _GrainStream(Stream):
  checkpointable = True

  def __init__(self, source, *, batch_size, seed, shuffle, name, description,
               prefetch):
    if isinstance(source, grain.MapDataset):
      self._source = source
    elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
      self._source = grain.MapDataset.source(source)
    else:
      raise ConfigError(
          f"from_grain takes a grain.MapDataset or a random-access source "
          f"(with __len__ and __getitem__); got a {type(source).__name__}: "
          "wrap an iterable of batches with from_iterable instead")
    self._batch_size = _positive_int(batch_size, "batch_size",
                                     "give the number of examples per step")
    if not _is_int(seed) or seed < 0:
      raise ConfigError(f"seed must be a non-negative integer; got {seed!r}")
    self._seed, self._shuffle = int(seed), bool(shuffle)
    self._prefetch = int(prefetch)
    if self._prefetch < 0:
      raise ConfigError(f"prefetch must be 0 or more batches; got {prefetch}")
    self._len = len(self._source)
    if self._len < self._batch_size:
      raise DataError(f"the source has {self._len} examples, fewer than one "
                      f"batch of {self._batch_size}: use a batch size of at "
                      f"most {self._len} or more data")
    self.steps_per_epoch = self._len // self._batch_size
    self._name = name or type(source).__name__
    self._user_description = _json_description(description)
    self._given_source = source

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @functools.cached_property
  def element_spec(self):
    # Reads example 0, once: the one read outside this process's rows.
    example = self._source[0]
    _row_keys(example, "example 0 of the source")
    return _spec(example)

  @functools.cached_property
  def description(self) -> dict:
    # Asked for only here, as a source may read all its data to describe it.
    own = getattr(self._given_source, "description", None)
    own = _json_description(own) if isinstance(own, Mapping) else {}
    return {"source": "grain", "name": self._name, **self.fingerprint(),
            **own, **self._user_description}

  def fingerprint(self) -> dict:
    """What a saved position is only valid for."""
    return {"len": self._len, "batch_size": self._batch_size,
            "seed": self._seed, "shuffle": self._shuffle}

  def epoch_batches(self, epoch: int, rows: slice) -> grain.IterDataset:
    """One epoch of this process's batches, as a grain pipeline."""
    order = grain.MapDataset.range(self._len)
    if self._shuffle:
      order = order.shuffle(seed=_epoch_seed(self._seed, epoch))
    size, local = self._batch_size, rows.stop - rows.start

    # Local example i is row rows.start + i % local of global batch
    # i // local: this process never touches the other rows.
    def read(i: int):
      step, row = divmod(i, local)
      return self._source[order[step * size + rows.start + row]]
    # Threads read the next batches while the train step runs, one batch
    # each; a few batches ahead keep that overlap at little memory.
    options = grain.ReadOptions(num_threads=self._prefetch,
                                prefetch_buffer_size=self._prefetch)
    return (grain.MapDataset.range(self.steps_per_epoch * local).map(read)
            .batch(local, drop_remainder=True, batch_fn=_stack_rows)
            .to_iter_dataset(options))

  def check_state(self, state) -> tuple[int, int, dict]:
    """(epoch, step, grain state) of a saved position, if it fits."""
    if not isinstance(state, Mapping) or not {"epoch", "step", "grain",
                                               "data"} <= set(state):
      raise DataError(f"{state!r} is not a saved stream position: give the "
                      "value of StreamIterator.get_state()")
    if state["data"] != self.fingerprint():
      raise DataError(f"the saved position belongs to data {state['data']}, "
                      f"but this stream is {self.fingerprint()}: resume "
                      "with the same source, batch size, seed and shuffle, "
                      "or start a new run")
    return int(state["epoch"]), int(state["step"]), state["grain"]

  def iterator(self, *, epoch=0, state=None, process_index=0,
               process_count=1) -> StreamIterator:
    rows = _process_rows(self._batch_size, process_index, process_count)
    return _GrainIterator(self, rows, _start_epoch(epoch), state)


class _GrainIterator(StreamIterator):
  """One grain iterator per epoch; the state is (epoch, step, grain's state).

  Steps count global batches, so a position saved by N processes resumes
  on any other number of them.
  """

  def __init__(self, stream: _GrainStream, rows: slice, epoch: int, state):
    self._stream, self._rows = stream, rows
    if state is None:
      self._open(epoch)
    else:
      epoch, step, grain_state = stream.check_state(state)
      self._open(epoch)
      self._batches.set_state(grain_state)
      self._step = step

  def _open(self, epoch: int) -> None:
    self.epoch, self._step = epoch, 0
    self._batches = iter(self._stream.epoch_batches(epoch, self._rows))

  def __next__(self) -> Batch:
    batch = next(self._batches)
    self._step += 1
    if self._step == self._stream.steps_per_epoch:
      # Opening reads nothing yet; it makes the state after an epoch's last
      # batch the start of the next epoch.
      self._batches.close()
      self._open(self.epoch + 1)
    return batch

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "step": self._step,
            "grain": self._batches.get_state(),
            "data": self._stream.fingerprint()}

  def close(self) -> None:
    self._batches.close()


def from_grain(source, *, batch_size: int, seed: int = 0, shuffle: bool = True,
               name: str | None = None, description: Mapping | None = None,
               prefetch: int = 2) -> Stream:
  """A checkpointable stream over a random-access source, read with grain.

  Epoch e visits the examples in an order that depends only on (seed, e)
  and drops the last partial batch. Each process reads only its own rows
  of each global batch, and global batch b of epoch e is the same for any
  number of processes.

  Args:
    source: a `grain.MapDataset` or any random-access source (`__len__`, and
      `__getitem__(i)` returning a dict of numpy arrays or scalars holding
      "x"), e.g. a `grain.sources.ArrayRecordDataSource` or `ArrayFiles`.
    batch_size: examples per step, all processes together.
    seed: seed of the per-epoch shuffle.
    shuffle: False reads the examples in source order every epoch.
    name: a name for config.json (default: the source's class name).
    description: JSON-able facts about the data recorded with it; a
      `description` dict of the source itself is recorded too.
    prefetch: batches read ahead in background threads; 0 reads each batch
      when it is asked for.

  Returns:
    A `Stream` with `steps_per_epoch = len(source) // batch_size`.

  Examples:
    >>> import numpy as np
    >>> rows = [{"x": np.float32(i), "y": i % 2} for i in range(6)]
    >>> stream = from_grain(rows, batch_size=2, shuffle=False)
    >>> it = stream.iterator(process_index=1, process_count=2)
    >>> [float(next(it)["x"][0]) for _ in range(4)]   # row 1 of each batch
    [1.0, 3.0, 5.0, 1.0]
  """
  return _GrainStream(source, batch_size=batch_size, seed=seed,
                      shuffle=shuffle, name=name, description=description,
                      prefetch=prefetch)


# ----------------------------------------------------------------- iterable

class _IterableStream(Stream):
  checkpointable = False

  def __init__(self, make_batches, *, steps_per_epoch, name, description):
    if not callable(make_batches):
      raise ConfigError(f"make_batches must be a function of the epoch that "
                        f"returns an iterable of batches; got a "
                        f"{type(make_batches).__name__}")
    self._make_batches = make_batches
    self.steps_per_epoch = _positive_int(
        steps_per_epoch, "steps_per_epoch",
        "give the number of batches to take from each epoch")
    self._name = name or getattr(make_batches, "__name__", "iterable")
    self._user_description = _json_description(description)

  @functools.cached_property
  def _first(self) -> Batch:
    """The first batch of epoch 0, which fixes the keys, shapes and size."""
    batches = iter(self._make_batches(0))
    try:
      batch = next(batches)
    except StopIteration:
      raise DataError("make_batches(0) gave no batches: it must give at "
                      f"least steps_per_epoch={self.steps_per_epoch}") from None
    finally:
      _close(batches)
    keys = _row_keys(batch, "the first batch of make_batches(0)")
    batch = {k: np.asarray(batch[k]) for k in keys}
    sizes = {k: len(v) if v.ndim else None for k, v in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
      raise DataError(f"the first batch of make_batches(0) has rows per key "
                      f"{sizes}: give arrays that share their first axis")
    return batch

  @property
  def batch_size(self) -> int:
    return len(self._first["x"])

  @functools.cached_property
  def element_spec(self):
    return _spec({k: v[0] for k, v in self._first.items()})

  @functools.cached_property
  def description(self) -> dict:
    return {"source": "iterable", "name": self._name,
            "steps_per_epoch": self.steps_per_epoch, **self._user_description}

  def check_batch(self, batch, epoch: int, step: int) -> Batch:
    where = f"batch {step} of make_batches({epoch})"
    keys = _row_keys(batch, where)
    if set(keys) != set(self._first):
      raise DataError(f"{where} has keys {sorted(keys)}, but the first batch "
                      f"had {sorted(self._first)}: give the same keys in "
                      "every batch")
    batch = {k: np.asarray(batch[k]) for k in keys}
    for k, v in batch.items():
      want = (self.batch_size,) + self._first[k].shape[1:]
      if v.shape != want:
        raise DataError(f"{where} has {k!r} of shape {v.shape}, but the "
                        f"first batch set {want}: give every batch the same "
                        "size and shapes")
    return batch

  def iterator(self, *, epoch=0, state=None, process_index=0,
               process_count=1) -> StreamIterator:
    if state is not None:
      raise DataError(
          f"stream {self._name!r} was built from a plain iterable, which "
          "cannot resume mid-run: build it with from_grain to resume "
          "exactly, or restart the epoch with iterator(epoch=...)")
    rows = _process_rows(self.batch_size, process_index, process_count)
    return _IterableIterator(self, rows, _start_epoch(epoch))


class _IterableIterator(StreamIterator):
  """Takes steps_per_epoch batches of make_batches(epoch), then moves on."""

  def __init__(self, stream: _IterableStream, rows: slice, epoch: int):
    self._stream, self._rows = stream, rows
    self.epoch, self._step, self._batches = epoch, 0, None

  def __next__(self) -> Batch:
    if self._batches is None:
      # Opened at the first batch, so that an epoch nobody reads from is
      # never made.
      self._batches = iter(self._stream._make_batches(self.epoch))
    try:
      batch = next(self._batches)
    except StopIteration:
      raise DataError(
          f"make_batches({self.epoch}) gave {self._step} batches, but "
          f"{self._stream.steps_per_epoch} (steps_per_epoch) were expected: "
          "give that many per epoch or lower steps_per_epoch") from None
    batch = self._stream.check_batch(batch, self.epoch, self._step)
    self._step += 1
    if self._step == self._stream.steps_per_epoch:
      self.close()
      self.epoch, self._step = self.epoch + 1, 0
    return {k: v[self._rows] for k, v in batch.items()}

  def get_state(self) -> None:
    return None

  def close(self) -> None:
    _close(self._batches)
    self._batches = None


def _close(batches) -> None:
  # A generator left open would keep its files open.
  if hasattr(batches, "close"):
    batches.close()


def from_iterable(make_batches: Callable[[int], Iterable[Mapping]], *,
                  steps_per_epoch: int, name: str | None = None,
                  description: Mapping | None = None) -> Stream:
  """A stream over a user's iterable of global batches; it cannot resume.

  Keys, shapes and the batch size come from the first batch of epoch 0:
  the first time one of them is asked for, `make_batches(0)` is called once
  to look at it. Every process calls `make_batches(epoch)` and keeps its
  rows of each batch, so each reads all the data: use `from_grain` where
  that costs too much.

  Args:
    make_batches: `make_batches(epoch)` returns an iterable of global batch
      dicts of numpy arrays (holding "x"), at least `steps_per_epoch` long;
      batches past that are not taken.
    steps_per_epoch: batches per epoch.
    name: a name for config.json (default: make_batches's name).
    description: JSON-able facts about the data recorded with it.

  Returns:
    A `Stream` whose iterators' `get_state()` is None.

  Examples:
    >>> import numpy as np
    >>> def batches(epoch):
    ...   for step in range(3):
    ...     yield {"x": np.full((4, 2), 10 * epoch + step, np.float32)}
    >>> stream = from_iterable(batches, steps_per_epoch=2)
    >>> stream.batch_size, stream.element_spec["x"].shape
    (4, (2,))
    >>> it = stream.iterator(process_index=0, process_count=2)
    >>> [float(next(it)["x"][0, 0]) for _ in range(3)], it.epoch
    ([0.0, 1.0, 10.0], 1)
  """
  return _IterableStream(make_batches, steps_per_epoch=steps_per_epoch,
                         name=name, description=description)


# ------------------------------------------------------------- files on disk

def hash_files(paths: list[pathlib.Path]) -> str:
  """sha256 over the files' names and contents, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  for path in paths:
    digest.update(path.name.encode() + b"\0")
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


class ArrayFiles:
  """A random-access source over a directory of one .npy file per key.

  The files (`x.npy`, and e.g. `y.npy`, `mask.npy`; all share their first
  axis) are memory-mapped, so reading an example touches only its row.

  Examples:
    >>> import tempfile
    >>> import numpy as np
    >>> root = save_arrays(tempfile.mkdtemp(), x=np.eye(3, dtype=np.float32),
    ...                    y=np.arange(3))
    >>> files = ArrayFiles(root)
    >>> len(files), files[1]["x"].tolist(), int(files[1]["y"])
    (3, [0.0, 1.0, 0.0], 1)
    >>> from_grain(files, batch_size=2).description["keys"]
    ['x', 'y']
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    self._paths = sorted(self.directory.glob("*.npy"))
    if not any(p.stem == "x" for p in self._paths):
      raise DataError(f"{self.directory} holds no x.npy (found: "
                      f"{', '.join(p.name for p in self._paths) or 'none'}): "
                      "write the arrays with save_arrays(directory, x=..., "
                      "y=...)")
    try:
      self._arrays = {p.stem: np.load(p, mmap_mode="r", allow_pickle=False)
                      for p in self._paths}
    except ValueError as e:
      raise DataError(f"cannot memory-map the arrays in {self.directory} "
                      f"({e}): save them with save_arrays") from None
    self._len = _common_length(self._arrays, str(self.directory))

  def __len__(self) -> int:
    return self._len

  @property
  def columns(self) -> dict[str, np.ndarray]:
    """The memory-mapped arrays, read-only, by key."""
    return dict(self._arrays)

  def __getitem__(self, index: int | slice) -> dict[str, np.ndarray]:
    """One example (an index), or the rows of a slice."""
    # Copies, so that a batch does not pin the memory-mapped files.
    return {k: np.array(a[index]) for k, a in self._arrays.items()}

  @functools.cached_property
  def description(self) -> dict:
    return {"path": str(self.directory.resolve()),
            "keys": sorted(self._arrays), "sha256": hash_files(self._paths)}


def _common_length(arrays: Mapping[str, np.ndarray], where: str) -> int:
  lengths = {k: len(a) if np.ndim(a) else None for k, a in arrays.items()}
  if None in lengths.values() or len(set(lengths.values())) != 1:
    raise DataError(f"{where}: the arrays have rows {lengths}; give arrays "
                    "that share their first axis, one row per example")
  return lengths["x"]


def save_arrays(directory: str | os.PathLike, **arrays: np.ndarray
                ) -> pathlib.Path:
  """Writes one .npy file per key into `directory`, for `ArrayFiles`.

  Args:
    directory: created if missing.
    **arrays: "x" and any other keys, sharing their first axis.

  Returns:
    The directory.
  """
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if "x" not in arrays:
    raise DataError(f"save_arrays got keys {sorted(arrays)} but no x: the "
                    "model reads its inputs from x; pass x=...")
  _common_length(arrays, "save_arrays")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for key, value in arrays.items():
    np.save(directory / f"{key}.npy", value, allow_pickle=False)
  return directory


SPLITS = ("train", "val", "test")


def split_files(root: str | os.PathLike) -> dict[str, ArrayFiles]:
  """The splits of a data set kept on disk: `ArrayFiles` over the
  subdirectories train/ (required), val/ and test/ of `root`, each written
  with `save_arrays`. What `jaxaccel train --dataset DIR` streams.

  Examples:
    >>> import tempfile
    >>> import numpy as np
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_arrays(root / "train", x=np.zeros((8, 2)), y=np.arange(8))
    >>> _ = save_arrays(root / "test", x=np.ones((3, 2)), y=np.arange(3))
    >>> {k: len(v) for k, v in split_files(root).items()}
    {'train': 8, 'test': 3}
  """
  root = pathlib.Path(root)
  if not (root / "train" / "x.npy").is_file():
    raise DataError(f"{root} holds no train/x.npy: a data set on disk is a "
                    "directory with train/ (and val/, test/) subdirectories "
                    "of .npy arrays, written with "
                    "jaxaccel.data.save_arrays(DIR / 'train', x=..., y=...)")
  return {split: ArrayFiles(root / split) for split in SPLITS
          if (root / split / "x.npy").is_file()}
