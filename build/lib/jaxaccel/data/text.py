"""Byte-level text corpora: real text that ships with the machine, or a
user's own files, cut into windows for next-byte prediction.

* `pycode`: the running Python's standard library sources (`.py` files
  under `sysconfig`'s stdlib path, tests and site-packages left out), a
  fixed sorted file list; the text changes between Python versions, so the
  version and the list's hash go into the data's description.
* `fortunes`: the Debian package `fortunes` (`apt-get install fortunes`).
* a path: one text file, or a folder of them (every regular file below it).

A corpus is split by file (a shuffled file list: validation files, test
files, the rest to train), so no window straddles two splits; a corpus of
one or two files is split by position instead. Each split's bytes are cut into
windows of `context` inputs, each target the byte after its input: 256
symbols, no tokenizer.

Examples:
  >>> import pathlib, tempfile
  >>> from jaxaccel.data import text
  >>> path = pathlib.Path(tempfile.mkdtemp()) / "poem.txt"
  >>> _ = path.write_text("the quick brown fox jumps over the lazy dog\\n" * 20)
  >>> ds = text.load_text(str(path), context=8)
  >>> ds.x_train.shape[1], ds.num_classes, bytes(ds.x_train[0]).decode()
  (8, 256, 'the quic')
  >>> bytes(ds.y_train[0]).decode()
  'he quick'
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import sysconfig

import numpy as np

from jaxaccel.errors import DataError

TEXT_SETS = ("pycode", "fortunes")
FORTUNES_DIR = "/usr/share/games/fortunes"
# Parts of the standard library that are not its sources: test suites, and
# what pip installs beside it.
_PYCODE_SKIP = {"test", "tests", "site-packages", "dist-packages", "idle_test"}


def is_text(name: str) -> bool:
  """Whether `name` names a text corpus: pycode, fortunes, a .txt file, or
  a folder that is not a data set of .npy splits."""
  path = pathlib.Path(name)
  return (name in TEXT_SETS or (path.is_file() and path.suffix == ".txt")
          or (path.is_dir() and not (path / "train" / "x.npy").is_file()))


def fortunes_dir() -> pathlib.Path:
  """Where the fortunes are read from: $JAXACCEL_FORTUNES_DIR or the Debian
  package's folder."""
  return pathlib.Path(os.environ.get("JAXACCEL_FORTUNES_DIR") or FORTUNES_DIR)


def corpus_files(name: str) -> list[pathlib.Path]:
  """The files of a corpus, in a fixed order."""
  if name == "pycode":
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py")
                  if not _PYCODE_SKIP & set(f.relative_to(root).parts))
  if name == "fortunes":
    root = fortunes_dir()
    files = sorted(f for f in root.glob("*") if f.is_file()
                   and not f.is_symlink() and f.suffix != ".dat")
    if not files:
      raise DataError(f"the fortunes corpus is not installed: looked in {root}; "
                      "install it with `apt-get install fortunes`")
    return files
  path = pathlib.Path(name)
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(f for f in path.rglob("*") if f.is_file()
                   and not any(p.startswith(".") for p in f.relative_to(path).parts))
    if not files:
      raise DataError(f"text folder {path} holds no files")
    return files
  raise DataError(f"unknown text corpus {name!r}: use {', '.join(TEXT_SETS)}, "
                  "a text file or a folder of text files")


def files_hash(files: list[pathlib.Path]) -> str:
  """A hash of the corpus's file list: names and sizes (the standard
  library's files are fixed per Python version; a user's are hashed whole
  by `load_text`)."""
  digest = hashlib.sha256()
  for f in files:
    digest.update(f"{f.name}:{f.stat().st_size}\0".encode())
  return digest.hexdigest()


def _split_files(files, validation: float, test: float, seed: int):
  order = np.random.default_rng(seed).permutation(len(files))
  n_val = int(round(len(files) * validation))
  n_test = int(round(len(files) * test))
  pick = lambda idx: [files[i] for i in sorted(idx)]
  return {"val": pick(order[:n_val]), "test": pick(order[n_val:n_val + n_test]),
          "train": pick(order[n_val + n_test:])}


def _windows(raw: bytes, context: int) -> tuple[np.ndarray, np.ndarray]:
  """Consecutive windows of `context` bytes and, for each, the `context`
  bytes one position later."""
  data = np.frombuffer(raw, np.uint8)
  n = (len(data) - 1) // context
  x = data[:n * context].reshape(n, context)
  y = data[1:n * context + 1].reshape(n, context)
  return x.copy(), y.copy()


def load_text(name: str, *, context: int = 128, validation: float = 0.1,
              test: float = 0.1, seed: int = 0, max_bytes: int | None = None):
  """Loads a byte-level corpus as a `Dataset` of windows (next-byte
  prediction: the `lm` task).

  Args:
    name: "pycode", "fortunes", a text file or a folder of text files.
    context: bytes per window (the model's context).
    validation, test: fractions of the files (of the bytes, for a corpus of
      one or two files) held out.
    seed: the order files are dealt to the splits in.
    max_bytes: keep at most this many bytes of each split (a quick slice).

  Returns:
    A `Dataset`: uint8 inputs (n, context), uint8 targets (n, context), 256
    classes, and the description `data.rebuild` makes it again from.
  """
  from jaxaccel.data import Dataset   # the package imports this module
  if not isinstance(context, int) or context < 1:
    raise DataError(f"context must be a positive number of bytes; got {context!r}")
  for what, f in (("validation", validation), ("test", test)):
    if not 0.0 <= f < 1.0:
      raise DataError(f"{what} fraction must lie in [0, 1); got {f}")
  if validation + test >= 1.0:
    raise DataError(f"validation {validation} and test {test} leave nothing "
                    "to train on")
  files = corpus_files(name)
  if len(files) > 2:
    splits = {k: b"".join(f.read_bytes() for f in v)
              for k, v in _split_files(files, validation, test, seed).items()}
  else:    # one file (or two): split by position
    raw = b"".join(f.read_bytes() for f in files)
    a = int(len(raw) * (1 - validation - test))
    b = int(len(raw) * (1 - test))
    splits = {"train": raw[:a], "val": raw[a:b], "test": raw[b:]}
  if max_bytes is not None:
    splits = {k: v[:max_bytes] for k, v in splits.items()}
  arrays = {k: _windows(v, context) for k, v in splits.items()}
  if not len(arrays["train"][0]):
    raise DataError(f"{name}: {len(splits['train'])} training bytes make no "
                    f"window of {context + 1}; give more text or a shorter "
                    "--context")
  description = {"source": name if name in TEXT_SETS else "text",
                 "context": context, "validation": validation, "test": test,
                 "seed": seed, "max_bytes": max_bytes,
                 "files": len(files), "files_sha256": files_hash(files)}
  if name == "pycode":
    description["python"] = sys.version.split()[0]
  if name not in TEXT_SETS:
    from jaxaccel.data.streams import hash_files
    description.update(path=str(pathlib.Path(name).absolute()),
                       sha256=hash_files(files))
  return Dataset(
      name=str(name), x_train=arrays["train"][0], y_train=arrays["train"][1],
      x_val=arrays["val"][0], y_val=arrays["val"][1],
      x_test=arrays["test"][0], y_test=arrays["test"][1], num_classes=256,
      report={"bytes": {k: len(v) for k, v in splits.items()},
              "files": len(files)},
      description=description)


def rebuild_text(description: dict):
  """The corpus a run trained on, from its description; a DataError when
  its files changed (another Python version's standard library, edited
  text)."""
  source = description["source"]
  name = description.get("path", source)
  files = corpus_files(name)
  from jaxaccel.data.streams import hash_files
  if files_hash(files) != description["files_sha256"] or (
      "sha256" in description and hash_files(files) != description["sha256"]):
    raise DataError(f"the {source} corpus differs from the one the run trained "
                    "on (its file list changed"
                    + (f"; the run used Python {description['python']}"
                       if "python" in description else "")
                    + "): pass the data set (data=...)")
  return load_text(name, context=description["context"],
                   validation=description["validation"], test=description["test"],
                   seed=description["seed"], max_bytes=description["max_bytes"])
