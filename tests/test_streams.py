import json
import os

import numpy as np
import pytest

from jaxaccel.data import streams
from jaxaccel.errors import ConfigError, DataError


class CountingRows:
  """n examples whose x holds their index; records every index read."""

  def __init__(self, n: int):
    self.n, self.reads = n, []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.reads.append(int(i))
    return {"x": np.full(2, i, np.float32), "y": np.int32(i % 3)}


def take(it, n):
  return [next(it) for _ in range(n)]


def ids(batch):
  return batch["x"][:, 0].astype(int).tolist()


def test_each_epoch_is_a_seeded_permutation_without_the_last_partial_batch():
  stream = streams.from_grain(CountingRows(10), batch_size=4, seed=3)
  assert stream.steps_per_epoch == 2 and stream.checkpointable
  epochs = [sum(map(ids, take(stream.iterator(epoch=e), 2)), [])
            for e in range(3)]
  for order in epochs:
    assert len(set(order)) == 8 and set(order) <= set(range(10))
  assert epochs[0] != epochs[1] != epochs[2]
  # The order depends on (seed, epoch) only: one iterator crossing epochs
  # and another stream with the same seed agree; another seed does not.
  crossing = sum(map(ids, take(stream.iterator(), 6)), [])
  assert crossing == sum(epochs, [])
  again = streams.from_grain(CountingRows(10), batch_size=4, seed=3)
  assert sum(map(ids, take(again.iterator(epoch=1), 2)), []) == epochs[1]
  other = streams.from_grain(CountingRows(10), batch_size=4, seed=4)
  assert sum(map(ids, take(other.iterator(), 2)), []) != epochs[0]
  in_order = streams.from_grain(CountingRows(10), batch_size=4, shuffle=False)
  assert [ids(b) for b in take(in_order.iterator(epoch=5), 2)] == [
      [0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("k", [0, 1, 3, 4, 6, 8])
def test_resume_gives_the_batches_of_an_uninterrupted_run(k):
  stream = streams.from_grain(CountingRows(10), batch_size=3, seed=7)
  reference = [ids(b) for b in take(stream.iterator(), 9)]   # 3 epochs
  it = stream.iterator()
  assert [ids(b) for b in take(it, k)] == reference[:k]
  state = json.loads(json.dumps(it.get_state()))
  assert it.epoch == state["epoch"] == k // 3 and state["step"] == k % 3
  resumed = stream.iterator(state=state)
  assert resumed.epoch == k // 3
  assert [ids(b) for b in take(resumed, 9 - k)] == reference[k:]
  assert [ids(b) for b in take(it, 9 - k)] == reference[k:]
  it.close()
  resumed.close()


@pytest.mark.parametrize("process_count", [2, 4])
def test_each_process_reads_only_its_rows_of_the_global_batch(process_count):
  reference = [ids(b) for b in take(streams.from_grain(
      CountingRows(13), batch_size=4, seed=5).iterator(), 6)]   # 2 epochs
  local = 4 // process_count
  slices = []
  for p in range(process_count):
    source = CountingRows(13)
    stream = streams.from_grain(source, batch_size=4, seed=5, prefetch=0)
    mine = [ids(b) for b in take(stream.iterator(
        process_index=p, process_count=process_count), 6)]
    assert source.reads == sum(mine, [])   # its rows, once each, in order
    assert mine == [r[p * local:(p + 1) * local] for r in reference]
    slices.append(mine)
  assert [sum(parts, []) for parts in zip(*slices)] == reference


def test_prefetch_reads_ahead_only_this_process_rows():
  reference = [ids(b) for b in take(streams.from_grain(
      CountingRows(13), batch_size=4, seed=5).iterator(), 9)]
  source = CountingRows(13)
  it = streams.from_grain(source, batch_size=4, seed=5, prefetch=2).iterator(
      process_index=1, process_count=2)
  assert [ids(b) for b in take(it, 4)] == [r[2:] for r in reference[:4]]
  it.close()
  # Batches 0..3 were taken; at most two more were read ahead.
  assert set(sum((r[2:] for r in reference[:4]), [])) <= set(source.reads)
  assert len(source.reads) <= 2 * 6


def test_a_position_saved_by_two_processes_resumes_on_one():
  stream = streams.from_grain(CountingRows(13), batch_size=4, seed=5)
  reference = [ids(b) for b in take(stream.iterator(), 6)]
  it = stream.iterator(process_index=0, process_count=2)
  take(it, 4)
  assert [ids(b) for b in take(stream.iterator(state=it.get_state()), 2)] == (
      reference[4:])


def test_process_and_state_errors():
  stream = streams.from_grain(CountingRows(12), batch_size=6)
  with pytest.raises(ConfigError, match="batch size 6 does not split evenly "
                     "over 4 processes: use a batch size that is a multiple"):
    stream.iterator(process_count=4)
  with pytest.raises(ConfigError, match=r"process_index must lie in \[0, 2\); "
                     "got 2"):
    stream.iterator(process_index=2, process_count=2)
  with pytest.raises(ConfigError, match="epoch must be a non-negative "
                     "integer; got -1"):
    stream.iterator(epoch=-1)
  with pytest.raises(DataError, match="is not a saved stream position"):
    stream.iterator(state={"next_index": 3})
  other = streams.from_grain(CountingRows(12), batch_size=6, seed=1)
  it = other.iterator()
  next(it)
  with pytest.raises(DataError, match="'seed': 1.*'seed': 0.*resume with the "
                     "same source, batch size, seed"):
    stream.iterator(state=it.get_state())


def test_from_grain_validation():
  rows = [{"x": np.zeros(2, np.float32), "y": 0}] * 3
  with pytest.raises(ConfigError, match="batch_size must be a positive "
                     "integer; got 0"):
    streams.from_grain(rows, batch_size=0)
  with pytest.raises(DataError, match="the source has 3 examples, fewer than "
                     "one batch of 4: use a batch size of at most 3"):
    streams.from_grain(rows, batch_size=4)
  with pytest.raises(ConfigError, match="random-access source.*from_iterable"):
    streams.from_grain(iter(rows), batch_size=1)
  no_x = streams.from_grain([{"image": np.zeros(2)}] * 4, batch_size=2)
  with pytest.raises(DataError, match=r"keys \['image'\] but no 'x'"):
    no_x.element_spec
  mixed = [{"x": np.zeros(2)}, {"x": np.zeros(2), "mask": 1}] * 2
  with pytest.raises(DataError, match=r"examples have different keys: \['x'\] "
                     r"and \['mask', 'x'\]"):
    next(streams.from_grain(mixed, batch_size=2, prefetch=0).iterator())
  ragged = [{"x": np.zeros(2)}, {"x": np.zeros(3)}]
  with pytest.raises(DataError, match=r"'x' of different shapes \[\(2,\), "
                     r"\(3,\)\]"):
    next(streams.from_grain(ragged, batch_size=2, prefetch=0).iterator())
  with pytest.raises(ConfigError, match="must be JSON-able"):
    streams.from_grain(rows, batch_size=1, description={"when": object()})


def test_grain_spec_and_description():
  import grain
  source = grain.MapDataset.source(CountingRows(10)).map(
      lambda r: {**r, "x": r["x"] * 2})
  stream = streams.from_grain(source, batch_size=4, seed=2, name="doubled",
                              description={"version": 3})
  spec = stream.element_spec
  assert {k: (v.shape, str(v.dtype)) for k, v in spec.items()} == {
      "x": ((2,), "float32"), "y": ((), "int32")}
  assert stream.description == {
      "source": "grain", "name": "doubled", "len": 10, "batch_size": 4,
      "seed": 2, "shuffle": True, "version": 3}
  batch = next(stream.iterator())
  assert batch["x"].shape == (4, 2) and batch["y"].dtype == np.int32
  assert np.all(batch["x"][:, 0] % 2 == 0)


def global_batches(epoch):
  """Epoch e gives 3 batches of 4 rows whose x is 100 e + 4 step + row."""
  for step in range(3):
    x = 100 * epoch + 4 * step + np.arange(4, dtype=np.float32)
    yield {"x": x[:, None], "y": np.arange(4, dtype=np.int32)}


def test_from_iterable_crosses_epochs_and_slices_rows():
  calls = []

  def make_batches(epoch):
    calls.append(epoch)
    return global_batches(epoch)
  stream = streams.from_iterable(make_batches, steps_per_epoch=2,
                                 description={"kind": "synthetic"})
  assert not stream.checkpointable and calls == []
  assert stream.batch_size == 4 and stream.element_spec["x"].shape == (1,)
  assert calls == [0]   # one look at the first batch
  assert json.loads(json.dumps(stream.description)) == {
      "source": "iterable", "name": "make_batches", "steps_per_epoch": 2,
      "kind": "synthetic"}
  whole = [b["x"][:, 0].tolist() for b in take(stream.iterator(), 5)]
  assert whole == [[0, 1, 2, 3], [4, 5, 6, 7], [100, 101, 102, 103],
                   [104, 105, 106, 107], [200, 201, 202, 203]]
  assert calls == [0, 0, 1, 2]
  halves = [stream.iterator(process_index=p, process_count=2) for p in (0, 1)]
  for want in whole:
    got = sum((next(it)["x"][:, 0].tolist() for it in halves), [])
    assert got == want
  assert halves[0].epoch == 2 and halves[0].get_state() is None


def test_from_iterable_errors():
  short = streams.from_iterable(global_batches, steps_per_epoch=4)
  it = short.iterator(epoch=1)
  take(it, 3)
  with pytest.raises(DataError, match=r"make_batches\(1\) gave 3 batches, but "
                     r"4 \(steps_per_epoch\) were expected"):
    next(it)
  with pytest.raises(DataError, match="was built from a plain iterable, which "
                     "cannot resume mid-run"):
    short.iterator(state={"epoch": 1})
  with pytest.raises(ConfigError, match="steps_per_epoch must be a positive "
                     "integer; got 0"):
    streams.from_iterable(global_batches, steps_per_epoch=0)
  no_x = streams.from_iterable(lambda e: [{"inputs": np.zeros((2, 1))}],
                               steps_per_epoch=1)
  with pytest.raises(DataError, match=r"first batch of make_batches\(0\) has "
                     r"keys \['inputs'\] but no 'x'"):
    no_x.batch_size
  scalar = streams.from_iterable(
      lambda e: [{"x": np.zeros((2, 1)), "w": np.float32(1)}],
      steps_per_epoch=1)
  with pytest.raises(DataError, match=r"rows per key \{'x': 2, 'w': None\}: "
                     "give arrays that share their first axis"):
    scalar.element_spec

  def drifting(epoch):
    yield {"x": np.zeros((4, 1)), "y": np.zeros(4)}
    yield {"x": np.zeros((4, 1))}
    yield {"x": np.zeros((3, 1)), "y": np.zeros(3)}
  with pytest.raises(DataError, match=r"batch 1 of make_batches\(0\) has keys "
                     r"\['x'\], but the first batch had \['x', 'y'\]"):
    take(streams.from_iterable(drifting, steps_per_epoch=3).iterator(), 2)

  def shrinking(epoch):
    yield {"x": np.zeros((4, 1))}
    yield {"x": np.zeros((3, 1))}
  with pytest.raises(DataError, match=r"batch 1 of make_batches\(0\) has 'x' "
                     r"of shape \(3, 1\), but the first batch set \(4, 1\)"):
    take(streams.from_iterable(shrinking, steps_per_epoch=2).iterator(), 2)


def test_array_files_roundtrip_and_content_hash(tmp_path):
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  root = streams.save_arrays(tmp_path / "d", x=x, y=np.arange(4),
                             mask=np.ones(4, bool))
  files = streams.ArrayFiles(root)
  assert len(files) == 4
  row = files[2]
  assert type(row["x"]) is np.ndarray and row["x"].tolist() == [6, 7, 8]
  assert int(row["y"]) == 2 and bool(row["mask"])
  before = files.description
  assert before["keys"] == ["mask", "x", "y"] and len(before["sha256"]) == 64
  # Same size and mtime, one value changed: the hash still tells them apart.
  stat = os.stat(root / "x.npy")
  x[0, 0] = 99
  np.save(root / "x.npy", x)
  os.utime(root / "x.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.stat(root / "x.npy").st_size == stat.st_size
  assert streams.ArrayFiles(root).description["sha256"] != before["sha256"]
  stream = streams.from_grain(files, batch_size=2, name="tiny")
  assert stream.description["path"] == str(root.resolve())
  with pytest.raises(DataError, match=r"rows \{'x': 4, 'y': 3\}"):
    streams.save_arrays(tmp_path / "e", x=x, y=np.arange(3))
  with pytest.raises(DataError, match="holds no x.npy.*save_arrays"):
    streams.ArrayFiles(tmp_path)


class CountingFiles(streams.ArrayFiles):
  def __init__(self, directory):
    super().__init__(directory)
    self.reads = []

  def __getitem__(self, index):
    self.reads.append(int(index))
    return super().__getitem__(index)


def anonymous_rss_bytes() -> int:
  """Memory this process holds. Mapped file pages are left out: they are
  page cache the kernel may drop, and it maps them in large folios (about
  1 MiB per row touched here), which measures the kernel, not the reader."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["RssAnon"].split()[0]) * 1024


def test_a_40mb_file_source_reads_only_the_rows_taken(tmp_path):
  n, width = 10_000, 1_000   # 40 MB of float32; row i holds i * width + j
  x = np.arange(n * width, dtype=np.float32).reshape(n, width)
  root = streams.save_arrays(tmp_path, x=x, y=np.arange(n, dtype=np.int32))
  del x
  files = CountingFiles(root)
  start = anonymous_rss_bytes()
  it = streams.from_grain(files, batch_size=16, seed=1).iterator(
      process_index=1, process_count=2)
  batches = take(it, 3)
  it.close()
  grown = anonymous_rss_bytes() - start
  taken = sum((b["y"].tolist() for b in batches), [])
  assert all(np.array_equal(b["x"][:, 0], b["y"] * width) for b in batches)
  assert set(taken) <= set(files.reads) and len(files.reads) <= 8 * (3 + 2)
  assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


# ------------------------------------------------------ fit over streams

def _digits_rows(ds):
  arrays = ds.arrays("train")
  return [{k: a[i] for k, a in arrays.items()} for i in range(len(arrays["x"]))]


def test_fit_over_an_iterable_equals_fit_over_the_same_batches_in_memory(digits):
  """The stream path runs the same step: fed exactly the batches the
  in-memory path picks, it ends with the same parameters, and a plain
  iterable resumed after 2 epochs starts epoch 3 again from its function."""
  import jax
  from jaxaccel import models, train
  model = models.create("mlp", num_classes=10, widths=(32,))
  arrays = digits.arrays("train")

  def batches(epoch):
    for idx in np.asarray(train.epoch_order(0, epoch, len(arrays["x"]), 64)):
      yield {k: a[idx] for k, a in arrays.items()}
  stream = streams.from_iterable(batches, steps_per_epoch=len(arrays["x"]) // 64)
  ref = train.fit(model, "adam(1e-3)", digits, epochs=3, batch_size=64,
                  epoch_mode="stream", progress=False)
  got = train.fit(model, "adam(1e-3)", stream, epochs=3, progress=False,
                  val_data=digits.arrays("val"))
  jax.tree.map(np.testing.assert_array_equal, ref.state.params, got.state.params)
  assert got.history[-1]["val_accuracy"] == pytest.approx(
      ref.history[-1]["val_accuracy"])
  assert ref.history[-1]["train_loss"] == pytest.approx(got.history[-1]["train_loss"])


def test_a_plain_iterable_resumes_by_starting_the_epoch_again(digits, tmp_path):
  import jax
  from jaxaccel import models, train
  model = models.create("mlp", num_classes=10, widths=(16,))
  calls = []

  def batches(epoch):
    calls.append(epoch)
    rng = np.random.default_rng(epoch)
    for _ in range(10):
      idx = rng.integers(0, len(digits.x_train), 32)
      yield {"x": digits.x_train[idx], "y": digits.y_train[idx]}
  stream = streams.from_iterable(batches, steps_per_epoch=10)
  full = train.fit(model, "sgd(0.1)", stream, epochs=4, progress=False)
  train.fit(model, "sgd(0.1)", stream, epochs=2, out=tmp_path / "r",
            progress=False)
  calls.clear()
  resumed = train.fit(model, "sgd(0.1)", stream, epochs=4, out=tmp_path / "r",
                      resume=True, progress=False)
  assert calls[:2] == [2, 3]
  jax.tree.map(np.testing.assert_array_equal, full.state.params,
               resumed.state.params)
  with pytest.raises(ConfigError, match="batch_size=64 differs from the stream's "
                                        "batch size 32"):
    train.fit(model, "sgd(0.1)", stream, epochs=1, batch_size=64, progress=False)


def _anon_kib() -> int:
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))


class PeakMemory:
  """A source over files that samples this process's anonymous memory as
  it reads."""

  def __init__(self, files):
    self.files, self.peak = files, 0

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    if i % 500 == 0:
      self.peak = max(self.peak, _anon_kib())
    return self.files[i]


def _random_files(root, rows, seed=0):
  rng = np.random.default_rng(seed)
  x = np.lib.format.open_memmap(root / "x.npy", mode="w+", dtype=np.float32,
                                shape=(rows, 64, 64, 1))
  for start in range(0, rows, 1000):
    x[start:start + 1000] = rng.standard_normal(x[start:start + 1000].shape,
                                                np.float32)
  x.flush()
  np.save(root / "y.npy", rng.integers(0, 2, rows).astype(np.int32))
  return streams.ArrayFiles(root)


def test_fit_streams_files_larger_than_it_ever_holds(tmp_path):
  """131 MB of rows on disk train one epoch while the process's own memory
  grows by less than 100 MB (a fixed cost of about 70 MB: read-ahead,
  batches in flight, allocator arenas; the same for files of 160 and 320
  MB): nothing loads the files whole."""
  from jaxaccel import models, train
  model = models.create("mlp", num_classes=2, widths=(8,))
  (tmp_path / "small").mkdir()
  (tmp_path / "big").mkdir()
  warm = streams.from_grain(_random_files(tmp_path / "small", 500), batch_size=250)
  train.fit(model, "sgd(0.01)", warm, epochs=1, progress=False)   # compiles
  source = PeakMemory(_random_files(tmp_path / "big", 8000))
  stream = streams.from_grain(source, batch_size=250, seed=0)
  before = _anon_kib()
  result = train.fit(model, "sgd(0.01)", stream, epochs=1, progress=False)
  assert result.history[0]["steps"] == 32
  assert (tmp_path / "big" / "x.npy").stat().st_size > 130e6
  assert source.peak - before < 100 * 1024


def test_a_sweep_over_a_stream_ranks_configurations_like_fit(digits, tmp_path):
  """Every configuration trains on the stream's batches; each one's
  validation accuracy equals what `fit` reaches with it alone."""
  from jaxaccel import models, sweep, train
  model = models.create("mlp", num_classes=10, widths=(32,))
  rows = streams.save_arrays(tmp_path / "train", x=digits.x_train, y=digits.y_train)
  stream = streams.from_grain(streams.ArrayFiles(rows), batch_size=64, seed=1)
  val = digits.arrays("val")
  out = sweep.sweep(model, "adam(1e-3)", stream, epochs=2, val_data=val,
                    grid={"learning_rate": [1e-4, 3e-3]}, progress=False)
  assert [e["hyperparams"]["learning_rate"] for e in out.results] == [1e-4, 3e-3]
  assert out.best["hyperparams"]["learning_rate"] == 3e-3
  alone = train.fit(model, "adam(learning_rate=0.003)", stream, epochs=2,
                    val_data=val, progress=False)
  assert out.best["val_accuracy"] == pytest.approx(
      alone.history[-1]["val_accuracy"], abs=1e-6)
  with pytest.raises(ConfigError, match="give val_data"):
    sweep.sweep(model, "adam(1e-3)", stream, epochs=1, progress=False)
