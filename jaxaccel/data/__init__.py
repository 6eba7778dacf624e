"""Data sets, cleaning, normalization, splits, batching and augmentation.

Everything returns plain numpy arrays on the host: images are float32 NHWC,
labels are int32 class indices; `from_arrays` takes inputs and targets of
any dtype and shape (token ids stay integers, regression targets floats).
Every `Dataset` carries a `description` of how it was made (source, file
hash, split, cleaning, normalization), which `fit` writes to a run's
config.json and `rebuild` reads back, so everything that needs a run's data
later (int8 calibration, compression's fine-tuning) gets it exactly as the
run saw it. Augmentations are pure jax functions so they can run inside a
compiled train step.

Examples:
  >>> from jaxaccel import data
  >>> ds = data.load("digits", validation=0.1, seed=0)
  >>> ds.x_train.shape[1:], ds.num_classes
  ((8, 8, 1), 10)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.errors import DataError
from jaxaccel.data import streams
from jaxaccel.data.streams import (ArrayFiles, Stream, from_grain,
                                   from_iterable, save_arrays, split_files)
from jaxaccel.data import text
from jaxaccel.data.text import TEXT_SETS, is_text, load_text

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
DATASETS = ("digits", "fashion_mnist")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train / validation / test arrays of one data set, ready to train on."""
  name: str
  x_train: np.ndarray      # float32 (n, h, w, c) or (n, features); any dtype
  y_train: np.ndarray      # int32 (n,) labels; or a target per position, floats
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int | None  # None for regression targets
  report: dict             # what cleaning and normalization did
  stats: dict = dataclasses.field(default_factory=dict)  # see `preprocess`
  # How the data was made (see `rebuild`); {} for arrays built by hand.
  description: dict = dataclasses.field(default_factory=dict)
  # More arrays with a row per example, by split: {"mask": {"train": ...}}.
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  @property
  def input_dtype(self) -> np.dtype:
    return self.x_train.dtype

  def arrays(self, split: str) -> dict[str, np.ndarray]:
    """One split as the batch dict a task sees: "x", "y" and the extras."""
    return {"x": getattr(self, f"x_{split}"), "y": getattr(self, f"y_{split}"),
            **{k: v[split] for k, v in self.extras.items()}}


# ---------------------------------------------------------------- raw loaders

def _read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads one gzip-compressed IDX file (the MNIST family's format)."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read IDX file {path}: {e}; reinstall the data "
                    "set (apt-get install --reinstall dataset-fashion-mnist)")
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise DataError(f"{path} is not an unsigned-byte IDX file")
  ndim = raw[3]
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} "
                    f"values for shape {dims}, found {data.size}")
  return data.reshape(dims)


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where Fashion-MNIST is read from: the argument, $JAXACCEL_DATA_DIR, or
  the Debian package's directory, first that is given."""
  return pathlib.Path(data_dir or os.environ.get("JAXACCEL_DATA_DIR")
                      or FASHION_MNIST_DIR)


def load_raw(name: str, *, data_dir=None,
             regression: bool = False) -> dict[str, np.ndarray]:
  """Loads a data set as raw arrays with keys x_train, y_train, x_test, y_test.

  Args:
    name: "digits", "fashion_mnist", or a path to a .npz file holding the
      four keys above.
    data_dir: directory of the Fashion-MNIST IDX files (optional).
    regression: keep a .npz file's float targets as they are (otherwise
      floats holding whole numbers are class labels).
  """
  if name == "digits":
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = bunch.images.astype(np.float32)[..., None]   # (1797, 8, 8, 1), 0..16
    y = bunch.target.astype(np.int64)
    # A fixed split, the same everywhere: 1500 to train, 297 to test.
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[:1500], order[1500:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te],
            "y_test": y[te], "scale": np.float32(16.0)}
  if name == "fashion_mnist":
    root = fashion_mnist_dir(data_dir)
    missing = [f for f in FASHION_MNIST_FILES.values()
               if not (root / f).is_file()]
    if missing:
      raise DataError(
          f"Fashion-MNIST not found: looked in {root} for {', '.join(missing)}; "
          "install it with `apt-get install dataset-fashion-mnist`, or point "
          "--data-dir / JAXACCEL_DATA_DIR at a directory with the four IDX .gz "
          "files")
    out = {k: _read_idx(root / f) for k, f in FASHION_MNIST_FILES.items()}
    out["x_train"] = out["x_train"][..., None]
    out["x_test"] = out["x_test"][..., None]
    out["scale"] = np.float32(255.0)
    return out
  if str(name).endswith(".npz"):
    return _load_npz(pathlib.Path(name), regression=regression)
  raise DataError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}, "
                  "a path to a .npz file with x_train, y_train, x_test, "
                  "y_test, or text: pycode, fortunes, a .txt file or a folder")


def _load_npz(path: pathlib.Path, *, regression: bool = False
              ) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise DataError(f"data file {path} does not exist: give the path of a .npz "
                    "file with x_train, y_train, x_test, y_test")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # zipfile, pickle refusal, truncated data
    raise DataError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); "
                    "save it with numpy.savez")
  missing = [k for k in NPZ_KEYS if k not in arrays]
  if missing:
    raise DataError(f"{path} is missing key(s) {', '.join(missing)} (found: "
                    f"{', '.join(sorted(arrays)) or 'none'}); save it with "
                    "numpy.savez(path, x_train=..., y_train=..., x_test=..., "
                    "y_test=...)")
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
      raise DataError(f"{path}: x_{split} has {len(x) if x.ndim else 0} rows "
                      f"but y_{split} has shape {y.shape}; give one target "
                      "per row")
    if len(x) == 0:
      raise DataError(f"{path}: x_{split} is empty; give at least one example")
    if x.dtype.kind not in "biuf":
      raise DataError(f"{path}: x_{split} has dtype {x.dtype}; give numbers "
                      "(save the inputs as floats or integers)")
  xtr, xte = arrays["x_train"], arrays["x_test"]
  if xtr.shape[1:] != xte.shape[1:]:
    raise DataError(f"{path}: x_train rows have shape {xtr.shape[1:]} but "
                    f"x_test rows {xte.shape[1:]}; both must match")
  if xtr.ndim == 3:   # (n, h, w): add the channel axis
    arrays["x_train"], arrays["x_test"] = xtr[..., None], xte[..., None]
  elif xtr.ndim not in (2, 4):
    raise DataError(f"{path}: x_train has shape {xtr.shape}; use (n, features), "
                    "(n, h, w) or (n, h, w, c)")
  floats = [k for k in ("y_train", "y_test")
            if np.issubdtype(arrays[k].dtype, np.floating)]
  whole = all(np.all(np.isfinite(arrays[k])) and np.all(arrays[k] == np.round(arrays[k]))
              for k in floats)
  if floats and (regression or not whole):
    for k in ("y_train", "y_test"):   # regression targets
      arrays[k] = arrays[k].astype(np.float32)
  else:
    for k in ("y_train", "y_test"):
      y = arrays[k]
      if not np.issubdtype(y.dtype, np.number) or y.ndim != 1:
        raise DataError(f"{path}: {k} has shape {y.shape} and dtype "
                        f"{y.dtype}; give one class index (or float target) "
                        "per row")
      arrays[k] = y.astype(np.int64)
  x_max = max(_finite_max(arrays["x_train"]), _finite_max(arrays["x_test"]))
  scale = 255.0 if arrays["x_train"].dtype == np.uint8 or x_max > 1.0 else 1.0
  arrays["scale"] = np.float32(scale if x_max <= 255.0 else x_max)
  return arrays


def _finite_max(x: np.ndarray) -> float:
  x = np.asarray(x, dtype=np.float64)
  finite = x[np.isfinite(x)]
  return float(np.abs(finite).max()) if finite.size else 0.0


# ------------------------------------------------------------- preprocessing

def clean(x: np.ndarray, y: np.ndarray, *, policy: str = "drop"
          ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Removes or repairs rows holding NaN or infinite values.

  Args:
    x: features, any shape with rows first.
    y: labels, one per row.
    policy: "drop" removes such rows; "impute" replaces each non-finite
      value with its feature's mean over the finite rows; "raise" refuses.

  Returns:
    (x, y, report) where report counts the affected rows and values.
  """
  x = np.asarray(x, dtype=np.float32)
  bad = ~np.isfinite(x)
  bad_rows = bad.reshape(len(x), -1).any(axis=1)
  report = {"policy": policy, "rows": int(bad_rows.sum()),
            "values": int(bad.sum())}
  if not bad_rows.any():
    return x, y, report
  if policy == "raise":
    raise DataError(f"{report['rows']} rows hold NaN or inf values; clean them "
                    "or choose policy 'drop' or 'impute'")
  if policy == "drop":
    return x[~bad_rows], y[~bad_rows], report
  if policy == "impute":
    masked = np.where(bad, 0.0, x)
    counts = np.maximum((~bad).sum(axis=0), 1)
    means = masked.sum(axis=0) / counts
    return np.where(bad, means, x).astype(np.float32), y, report
  raise DataError(f"unknown cleaning policy {policy!r}: use drop, impute or "
                  "raise")


def check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
  """Raises DataError unless every label lies in [0, num_classes)."""
  y = np.asarray(y)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise DataError(f"{what} must lie in [0, {num_classes}); found values from "
                    f"{int(y.min())} to {int(y.max())}: relabel them or set "
                    f"num_classes to at least {int(y.max()) + 1}")


def standardize(x_train: np.ndarray, *others: np.ndarray, eps: float = 1e-6):
  """Zero mean, unit variance per feature, with statistics of x_train only.

  Returns the standardized arrays and the (mean, std) used.
  """
  mean = x_train.mean(axis=0)
  std = x_train.std(axis=0) + eps
  out = tuple(((x - mean) / std).astype(np.float32) for x in (x_train,) + others)
  return out, (mean.astype(np.float32), std.astype(np.float32))


def check_rows(x, shape, source: str) -> np.ndarray:
  """x as a numeric array of rows of `shape` (a missing trailing channel
  axis of 1 is added); a one-line DataError, naming `source` (what takes
  the rows), for anything else: values that are not numbers (strings,
  objects), no rows, the wrong shape, NaN or infinite values."""
  try:
    x = np.asarray(x)
  except (ValueError, TypeError) as e:     # ragged nested lists
    raise DataError(f"the input is not an array of numbers ({e})") from None
  if x.dtype.kind not in "biuf":
    raise DataError(f"the input holds {x.dtype} values, but {source} takes "
                    "numbers: save a numeric array (float32 or integers)")
  want = tuple(shape)
  if x.ndim >= 1 and x.shape[1:] != want and x.shape[1:] + (1,) == want:
    x = x[..., None]
  if x.ndim < 1 or x.shape[1:] != want:
    raise DataError(f"the input has shape {x.shape}, but {source} takes rows "
                    f"of shape {want}: give an array of shape "
                    f"(n, {', '.join(map(str, want))})")
  if len(x) == 0:
    raise DataError(f"the input has no rows: give {source} at least one of "
                    f"shape {want}")
  if x.dtype.kind == "f":
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
      raise DataError(f"the input holds NaN or infinite values in "
                      f"{int(bad.sum())} of its {len(x)} rows (the first is "
                      f"row {int(bad.argmax())}): {source} takes finite numbers")
  return x


def pad_rows(chunk: np.ndarray, batch_size: int) -> np.ndarray:
  """`chunk` with zero rows added up to `batch_size`."""
  if len(chunk) == batch_size:
    return chunk
  return np.concatenate(
      [chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])


def padded_batches(x: np.ndarray, batch_size: int):
  """Fixed-size batches of x (the last one padded with zero rows), each with
  its count of real rows, so one compiled program serves them all."""
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    yield pad_rows(chunk, batch_size), len(chunk)


def preprocess(x_raw, stats: dict):
  """Applies a data set's normalization (`Dataset.stats`) to raw inputs:
  numpy in, numpy out; a jax array (as inside an exported function) in, a
  jax array out, by the same operations. With no statistics (arrays built
  by hand, integer token ids) the inputs are returned as they are."""
  if not stats:
    return x_raw
  x = (x_raw.astype(np.float32) if isinstance(x_raw, jax.Array)
       else np.asarray(x_raw, np.float32)) / np.float32(stats["scale"])
  if "mean" in stats:
    x = (x - stats["mean"]) / stats["std"]
  return x.astype(np.float32)


def validation_rows(n: int, fraction: float, *, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(training rows, validation rows) of n, a shuffled fraction held out."""
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"validation fraction must lie in [0, 1); got {fraction}")
  order = np.random.default_rng(seed).permutation(n)
  n_val = int(round(n * fraction))
  return order[n_val:], order[:n_val]


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float, *,
                     seed: int = 0):
  """Splits off a shuffled validation fraction: (x_tr, y_tr, x_val, y_val)."""
  tr, val = validation_rows(len(x), fraction, seed=seed)
  return x[tr], y[tr], x[val], y[val]


def load(name: str, *, data_dir=None, validation: float = 0.1, seed: int = 0,
         normalize: str = "unit", nan_policy: str = "drop",
         num_classes: int | None = None, regression: bool = False) -> Dataset:
  """Loads, cleans, normalizes and splits a data set.

  Args:
    name: "digits", "fashion_mnist" or a path to a .npz file.
    data_dir: directory of the Fashion-MNIST files (optional).
    validation: fraction of the training rows held out for validation.
    seed: seed of the validation split.
    normalize: "unit" scales to [0, 1]; "standardize" also centres each
      feature and divides by its standard deviation (train statistics).
    nan_policy: what to do with rows holding NaN or inf (see `clean`).
    num_classes: the number of classes; inferred from the labels if None.
    regression: a .npz file's float targets are a regression's even when
      they hold whole numbers (non-whole ones always are).

  Returns:
    A `Dataset` of float32 inputs and int32 labels (float32 targets for a
    regression), with the `description` that `rebuild` makes it again from.
  """
  if normalize not in ("unit", "standardize"):
    raise DataError(f"unknown normalization {normalize!r}: use unit or "
                    "standardize")
  raw = load_raw(name, data_dir=data_dir, regression=regression)
  x_tr, y_tr, rep_tr = clean(raw["x_train"], raw["y_train"], policy=nan_policy)
  x_te, y_te, rep_te = clean(raw["x_test"], raw["y_test"], policy=nan_policy)
  if len(x_tr) == 0:
    raise DataError(f"{name}: no training rows are left after cleaning")
  regression = np.issubdtype(y_tr.dtype, np.floating)
  if regression:
    num_classes = None
  else:
    if num_classes is None:
      num_classes = int(max(y_tr.max(), y_te.max(initial=0))) + 1
    check_labels(y_tr, num_classes, f"{name}: training labels")
    check_labels(y_te, num_classes, f"{name}: test labels")
  scale = float(raw["scale"])
  x_tr, x_te = x_tr / scale, x_te / scale
  x_tr, y_tr, x_val, y_val = split_validation(x_tr, y_tr, validation, seed=seed)
  stats = {"scale": np.float32(scale)}
  if normalize == "standardize":
    (x_tr, x_val, x_te), (stats["mean"], stats["std"]) = standardize(
        x_tr, x_val, x_te)
  as_labels = lambda y: np.asarray(y, np.float32 if regression else np.int32)
  description = {"source": name if name in DATASETS else "npz",
                 "validation": validation, "seed": seed,
                 "normalize": normalize, "nan_policy": nan_policy,
                 "num_classes": num_classes, "regression": regression}
  if name == "fashion_mnist" and data_dir is not None:
    description["data_dir"] = str(pathlib.Path(data_dir).absolute())
  if name not in DATASETS:
    path = pathlib.Path(name).absolute()
    description.update(path=str(path), sha256=file_hash(path))
  return Dataset(
      name=str(name), x_train=x_tr.astype(np.float32), y_train=as_labels(y_tr),
      x_val=x_val.astype(np.float32), y_val=as_labels(y_val),
      x_test=x_te.astype(np.float32), y_test=as_labels(y_te),
      num_classes=num_classes,
      report={"cleaned_train": rep_tr, "cleaned_test": rep_te,
              "scale": scale, "normalize": normalize},
      stats=stats, description=description)


def from_arrays(train: dict, test: dict | None = None, *,
                validation: float = 0.1, seed: int = 0,
                normalize: str = "none", nan_policy: str = "raise",
                num_classes: int | None = None, name: str = "arrays") -> Dataset:
  """A `Dataset` of arrays held in memory, of any dtype and shape.

  Args:
    train: {"x": inputs, "y": targets, ...}: a row per example in every
      array. Extra keys (a padding "mask" of shape (n,) or (n, positions))
      reach the task with each batch. Integer inputs (token ids) stay
      integers; integer targets are class ids (one per example, or one per
      position); float targets are a regression's.
    test: the same keys for the test split (default: none).
    validation: fraction of the training rows held out, shuffled by `seed`.
    normalize: for floating inputs: "none", or "standardize" with the
      training rows' statistics (integer inputs are never normalized).
    nan_policy: rows with NaN or inf in a float input or target: "raise"
      or "drop".
    num_classes: for integer targets (default: the largest plus one).
    name: what records call the data.

  Returns:
    A `Dataset` whose description says it was built in Python: a run
    trained on it is rebuilt by passing the data again (`data=`).

  Examples:
    >>> import numpy as np
    >>> x = np.linspace(-1, 1, 50, dtype=np.float32)[:, None]
    >>> ds = from_arrays({"x": x, "y": 2 * x[:, 0]}, validation=0.2)
    >>> ds.x_train.shape, ds.x_val.shape, ds.num_classes
    ((40, 1), (10, 1), None)
  """
  if normalize not in ("none", "standardize"):
    raise DataError(f"unknown normalization {normalize!r} for arrays: use "
                    "none or standardize")
  if nan_policy not in ("raise", "drop"):
    raise DataError(f"unknown nan_policy {nan_policy!r} for arrays: use raise "
                    "or drop")
  splits = {"train": _check_split(train, "train", nan_policy)}
  splits["test"] = (_check_split(test, "test", nan_policy) if test is not None
                    else {k: v[:0] for k, v in splits["train"].items()})
  if set(splits["test"]) != set(splits["train"]):
    raise DataError(f"train has keys {sorted(splits['train'])} but test "
                    f"{sorted(splits['test'])}; give both the same keys")
  full = splits.pop("train")
  tr, val = validation_rows(len(full["x"]), validation, seed=seed)
  splits["val"] = {k: v[val] for k, v in full.items()}
  splits["train"] = {k: v[tr] for k, v in full.items()}
  if len(splits["train"]["x"]) == 0:
    raise DataError(f"{name}: no training rows are left")
  y = splits["train"]["y"]
  if np.issubdtype(y.dtype, np.integer):
    if num_classes is None:
      num_classes = int(max(np.max(s["y"], initial=0) for s in splits.values())) + 1
    for split, arrays in splits.items():
      check_labels(arrays["y"], num_classes, f"{name}: {split} targets")
  else:
    num_classes = None
  stats = {}
  if normalize == "standardize" and np.issubdtype(full["x"].dtype, np.floating):
    xs, (stats["mean"], stats["std"]) = standardize(
        *(splits[s]["x"] for s in SPLITS))
    for split, x in zip(SPLITS, xs):
      splits[split]["x"] = x
    stats["scale"] = np.float32(1.0)
  extras = {k: {s: splits[s][k] for s in SPLITS} for k in full
            if k not in ("x", "y")}
  return Dataset(
      name=name, **{f"{k}_{s}": splits[s][k] for s in SPLITS for k in "xy"},
      num_classes=num_classes, report={"normalize": normalize}, stats=stats,
      description={"source": "arrays", "name": name, "validation": validation,
                   "seed": seed, "normalize": normalize},
      extras=extras)


def _check_split(arrays: dict, split: str, nan_policy: str) -> dict:
  if not isinstance(arrays, dict) or "x" not in arrays or "y" not in arrays:
    raise DataError(f"the {split} split must be a dict with 'x' and 'y' (and "
                    f"any extra per-example arrays); got {type(arrays).__name__}"
                    + (f" with keys {sorted(arrays)}" if isinstance(arrays, dict)
                       else ""))
  out = {}
  for k, v in arrays.items():
    v = np.asarray(v)
    if v.dtype.kind not in "biuf":
      raise DataError(f"{split} '{k}' has dtype {v.dtype}; give numbers "
                      "(integers, floats or booleans)")
    if v.ndim == 0 or len(v) != len(arrays["x"]):
      raise DataError(f"{split} '{k}' has shape {v.shape} but 'x' has "
                      f"{len(np.asarray(arrays['x']))} rows; give every array "
                      "one row per example")
    out[k] = v.astype(np.float32) if v.dtype == np.float64 else v
  bad = np.zeros(len(out["x"]), bool)
  for k in ("x", "y"):
    if np.issubdtype(out[k].dtype, np.floating):
      bad |= ~np.isfinite(out[k]).reshape(len(bad), -1).all(axis=1)
  if bad.any():
    if nan_policy == "raise":
      raise DataError(f"{int(bad.sum())} {split} rows hold NaN or inf values; "
                      "clean them or pass nan_policy='drop'")
    out = {k: v[~bad] for k, v in out.items()}
  return out


def file_hash(path) -> str:
  """The SHA-256 of a file's name and contents."""
  return streams.hash_files([pathlib.Path(path)])


def fingerprint(ds: Dataset) -> dict:
  """A cheap summary of a data set's contents: every split's shapes and a
  hash of up to 64 evenly spaced rows of each array. Equal fingerprints mean
  `rebuild` gave back the arrays a run trained on, not a cut or changed
  copy of them."""
  digest = hashlib.sha256()
  shapes = {}
  for split in SPLITS:
    for k, a in sorted(ds.arrays(split).items()):
      shapes[f"{k}_{split}"] = list(a.shape)
      rows = a[::max(1, len(a) // 64)]
      digest.update(np.ascontiguousarray(rows).tobytes())
  return {"shapes": shapes, "sample_sha256": digest.hexdigest()}


def describe(ds: Dataset) -> dict:
  """What a run's config.json records of its data: the data set's
  description (or, for arrays built by hand, that they were) and its
  fingerprint."""
  return {**(ds.description or {"source": "arrays", "name": ds.name}),
          "fingerprint": fingerprint(ds)}


def rebuild(description: dict) -> Dataset:
  """The data set a run was trained on, made again from the `describe`
  record in its config.json: the same file (checked by its hash), split,
  cleaning and normalization.

  Raises:
    DataError: when the data cannot be made again (it was built in Python,
      or a file changed); the message says to pass the data itself.
  """
  source = description.get("source")
  name = description.get("name", "arrays")
  if source in TEXT_SETS + ("text",):
    ds = text.rebuild_text(description)
    _check_fingerprint(ds, description)
    return ds
  if source not in DATASETS + ("npz",):
    raise DataError(
        f"the run was trained on data built in Python ({name!r}), which "
        "config.json cannot make again: pass it, e.g. export_run(run, ..., "
        "data=ds) or compress_run(run, stages, data=ds)")
  path = description.get("path")
  if path is not None and (not pathlib.Path(path).is_file()
                           or file_hash(path) != description.get("sha256")):
    raise DataError(f"the run's data file {path} is missing or has changed "
                    "since the run trained on it: restore it, or pass the data "
                    "in Python (data=...)")
  ds = load(path or source, data_dir=description.get("data_dir"),
            validation=description["validation"], seed=description["seed"],
            normalize=description["normalize"],
            nan_policy=description["nan_policy"],
            num_classes=description["num_classes"],
            regression=description["regression"])
  _check_fingerprint(ds, description)
  return ds


def _check_fingerprint(ds: Dataset, description: dict) -> None:
  if ("fingerprint" in description
      and fingerprint(ds) != description["fingerprint"]):
    raise DataError(
        f"the run trained on a changed copy of {description['source']!r} (its "
        "arrays differ from what loading it gives: "
        f"{description['fingerprint']['shapes']}), for example cut to fewer "
        "rows in Python: pass that data set (data=...)")


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
  """Flips each image of a NHWC batch left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1, :], x)


def random_shift(key: jax.Array, x: jax.Array, max_shift: int = 2) -> jax.Array:
  """Shifts each image of a NHWC batch by up to max_shift pixels, zero fill."""
  n, h, w, _ = x.shape
  shifts = jax.random.randint(key, (n, 2), -max_shift, max_shift + 1)
  padded = jnp.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))

  def shift_one(img, s):
    return jax.lax.dynamic_slice(img, (max_shift - s[0], max_shift - s[1], 0),
                                 (h, w, img.shape[-1]))
  return jax.vmap(shift_one)(padded, shifts)


def gaussian_noise(key: jax.Array, x: jax.Array, std: float = 0.05) -> jax.Array:
  """Adds zero-mean Gaussian noise of the given standard deviation."""
  return x + std * jax.random.normal(key, x.shape, x.dtype)


AUGMENTATIONS = {"flip": random_flip, "shift": random_shift,
                 "noise": gaussian_noise}


def make_augment(names: tuple[str, ...] | list[str]):
  """Composes augmentations by name into one pure `(key, x) -> x` function."""
  unknown = [n for n in names if n not in AUGMENTATIONS]
  if unknown:
    raise DataError(f"unknown augmentation {unknown[0]!r}: use "
                    f"{', '.join(AUGMENTATIONS)}")
  fns = [AUGMENTATIONS[n] for n in names]

  def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise DataError(f"augmentation needs NHWC images; got shape {x.shape}")
    for fn, k in zip(fns, jax.random.split(key, len(fns))):
      x = fn(k, x)
    return x
  return augment
