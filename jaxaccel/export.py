"""Artifacts that run a trained model without its Python code.

`export_run(RUN, format=..., out=PATH)` (or `export(model, variables, ...)`)
writes one file that takes the raw inputs `jaxaccel predict` takes (the run's
normalization is part of the exported function), with any batch size, and
returns logits:

- "stablehlo": the compiled function through `jax.export`, behind a short
  JSON header with what inference needs (input shape and dtype, class count,
  normalization, versions). `load(PATH)` runs it with jax alone.
- "onnx": an ONNX graph (`jaxaccel.onnx_graph`) for ONNX Runtime and other
  ONNX runtimes; the same header goes into the model's metadata.

An `out` name ending in `.gz` (`model.onnx.gz`) writes the artifact gzip
compressed: pruned weights are runs of zeros, so a 90%-sparse int8 model
shrinks several times more; `load`, `describe` and `jaxaccel predict
--artifact` read either encoding, and `gunzip` gives the plain file.

With `int8=True` every matmul and convolution on a weight runs int8 x int8
-> int32 with jaxaccel's own per-channel weight scales and calibrated input
scales (`compress.int8`), so the artifact predicts what jaxaccel's int8 path
predicts.

Examples:
  >>> import tempfile, pathlib, jax, numpy as np
  >>> from jaxaccel import export, models
  >>> model = models.create("mlp", num_classes=3, widths=(8,))
  >>> variables = model.init(jax.random.key(0), np.zeros((1, 4), np.float32))
  >>> path = pathlib.Path(tempfile.mkdtemp()) / "mlp.stablehlo"
  >>> _ = export.export(model, variables, input_shape=(4,), num_classes=3,
  ...                   out=path)
  >>> artifact = export.load(path)
  >>> x = np.ones((5, 4), np.float32)
  >>> bool(np.allclose(artifact(x), model.apply(variables, x), atol=1e-6))
  True
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
from typing import Any, Callable

import numpy as np

from jaxaccel.errors import ConfigError, DataError

FORMATS = ("stablehlo", "onnx")
MAGIC = b"JAXACCEL-STABLEHLO 1\n"
GZIP_MAGIC = b"\x1f\x8b"
CALIBRATION_ROWS = 1024      # training inputs that set the int8 input scales
PLATFORMS = ("cpu", "cuda", "tpu")   # what a StableHLO artifact is lowered for


@dataclasses.dataclass
class Artifact:
  """A loaded artifact: call it on raw inputs of shape `(n, *input_shape)`."""
  path: pathlib.Path
  format: str
  header: dict
  run: Callable[[np.ndarray], np.ndarray]

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.header["input_shape"])

  def check_input(self, x: np.ndarray) -> np.ndarray:
    """x as float32 rows of the artifact's input shape (a missing trailing
    channel axis of 1 is added); a DataError naming both shapes otherwise."""
    from jaxaccel import data
    return data.check_rows(x, self.input_shape, self.path.name).astype(
        np.float32)

  def __call__(self, x, *, batch_size: int = 1024) -> np.ndarray:
    """Logits of raw inputs, run `batch_size` rows at a time (the last
    batch padded, so a program sees at most two batch shapes)."""
    from jaxaccel import data
    x = self.check_input(x)
    batch_size = max(1, min(batch_size, len(x)))
    return np.concatenate([np.asarray(self.run(xb))[:n] for xb, n in
                           data.padded_batches(x, batch_size)])


def _normalizer(stats: dict | None) -> Callable:
  """The run's input normalization (`data.preprocess`) as a function of raw
  inputs that an exported program can trace."""
  from jaxaccel import data
  return ((lambda x: data.preprocess(x, stats)) if stats
          else (lambda x: x.astype(np.float32)))


def calibration_inputs(x_train: np.ndarray, stats: dict | None,
                       rows: int = CALIBRATION_ROWS) -> list[np.ndarray]:
  """The first `rows` training inputs, normalized, in batches of 256 (what
  `compress.int8.calibration_batches` gives)."""
  from jaxaccel import data
  from jaxaccel.compress import int8
  x = np.asarray(x_train[:rows], np.float32)
  return int8.calibration_batches(
      data.preprocess(x, stats) if stats else x, examples=rows, batch_size=256)


def _check_format(format: str) -> None:
  if format not in FORMATS:
    raise ConfigError(f"unknown export format {format!r}; choose one of "
                      f"{', '.join(FORMATS)}")


def _header(fmt: str, input_shape, num_classes: int, stats: dict | None,
            int8_summary: dict | None) -> dict:
  import jax
  import jaxaccel
  return {
      "format": fmt,
      "input_shape": [int(d) for d in input_shape],
      "input_dtype": "float32",
      "num_classes": int(num_classes),
      "output": "logits",
      "normalization": ("standardize" if stats and "mean" in stats
                        else "scale" if stats else "none"),
      "int8": int8_summary is not None,
      **({"int8_layers": int8_summary["int8"],
          "float_layers": int8_summary["float"]} if int8_summary else {}),
      "jaxaccel_version": jaxaccel.__version__,
      "jax_version": jax.__version__,
  }


def export(model, variables: dict, *, input_shape, num_classes: int,
           out, format: str = "stablehlo", normalization: dict | None = None,
           int8: bool = False, calibration=None) -> pathlib.Path:
  """Writes `model` at `variables` as an artifact; returns its path.

  Args:
    model: any model `jaxaccel.models.adapt` takes (registry, linen, NNX,
      plain functions).
    variables: `{"params": ..., **model_state}`.
    input_shape: one raw input's shape, without the batch axis.
    num_classes: the logits' width (recorded in the header).
    out: the file to write.
    format: "stablehlo" or "onnx".
    normalization: the run's `Dataset.stats` (`{"scale", "mean", "std"}`),
      applied inside the artifact to raw inputs; None for none.
    int8: integer products for every matmul and convolution on a weight.
    calibration: with int8, batches of normalized training inputs for the
      input scales (`calibration_inputs`).

  Raises:
    ConfigError: an unknown format, int8 without calibration batches, or a
      model with no quantizable layer (said by `compress.int8.convert`).
  """
  _check_format(format)
  if int8 and not calibration:
    raise ConfigError("int8 export needs calibration batches of training "
                      "inputs (export.calibration_inputs)")
  from jaxaccel.models import adapt
  input_shape = tuple(int(d) for d in input_shape)
  program = None
  if int8:
    from jaxaccel.compress import int8 as int8_lib
    program = int8_lib.convert(model, variables, calibration)
  header = _header(format, input_shape, num_classes, normalization,
                   program.summary() if program else None)
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if format == "onnx":
    from jaxaccel import onnx_graph
    _write(out, onnx_graph.build(
        model, variables, input_shape=input_shape,
        prepare=_normalizer(normalization), program=program,
        metadata=header).SerializeToString())
    return out
  import jax
  normalize = _normalizer(normalization)
  adapter = adapt(model)
  logits = (program.forward if program is not None
            else lambda x: adapter.logits(variables, x))
  fn = jax.jit(lambda x: logits(normalize(x)))
  batch, = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *input_shape), np.float32)
  try:    # one artifact for the CPU, GPUs and TPUs where the model lowers
    exported = jax.export.export(fn, platforms=PLATFORMS)(spec)
  except Exception:   # noqa: BLE001 - a lowering rule one platform lacks
    exported = jax.export.export(fn)(spec)
  header["platforms"] = list(exported.platforms)
  header["calling_convention_version"] = exported.calling_convention_version
  _write(out, MAGIC + json.dumps(header).encode() + b"\n"
         + bytes(exported.serialize()))
  return out


def _write(out: pathlib.Path, payload: bytes) -> None:
  """Writes `payload` whole or not at all, gzip compressed (level 9, no
  time stamp, so the same model gives the same bytes) when `out` ends in
  `.gz`."""
  if out.suffix == ".gz":
    payload = gzip.compress(payload, compresslevel=9, mtime=0)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_bytes(payload)
  tmp.replace(out)


def export_run(run, *, out, format: str = "stablehlo", int8: bool = False,
               model=None, data=None) -> pathlib.Path:
  """Exports the model of a `jaxaccel train` run directory. NNX and other
  models config.json cannot rebuild are given as `model`, as for
  `train.load_run`. An int8 export calibrates on the run's training data,
  rebuilt from its config.json, or `data` (a `Dataset`) for data built in
  Python."""
  from jaxaccel import train
  from jaxaccel.checkpoint import RunDir
  _check_format(format)      # before the run is loaded
  task = RunDir(run).read_config().get("task", "classification")
  if task not in ("classification", "lm"):
    raise ConfigError(f"export writes classifiers and language models; {run} "
                      f"was trained for the {task} task: use its run directory "
                      "(predict --run) instead")
  model, variables, config = train.load_run(run, model=model)
  if task == "lm":
    calibration = None
    if int8:
      ds = train.load_run_data(config, data)
      calibration = [ds.x_train[i:i + 64]
                     for i in range(0, min(len(ds.x_train), 256), 64)]
    return export_decoder(model, variables, out=out, format=format,
                          int8=int8, calibration=calibration)
  stats = RunDir(run).read_normalization() or None
  calibration = None
  if int8:
    ds = train.load_run_data(config, data)
    calibration = calibration_inputs(ds.x_train, None)   # already normalized
  return export(model, variables, input_shape=config["input_shape"],
                num_classes=config["num_classes"], out=out, format=format,
                normalization=stats, int8=int8, calibration=calibration)


def export_decoder(model, variables: dict, *, out, format: str = "stablehlo",
                   int8: bool = False, calibration=None) -> pathlib.Path:
  """Writes a language model's cached decoder (`generate.decoder`) as a
  StableHLO artifact: `(ids, *cache) -> (logits, *cache)`, with ids (batch,
  length) the positions after the cached ones and the cache's arrays as the
  header lists them (`DecoderArtifact` runs it), batch and length symbolic.
  So serving costs one token's work per new token, in a process that needs
  no model code.

  Args:
    model: a model with a key/value cache (`generate.has_cache`: the
      registry's gpt).
    variables: its `{"params": ...}`.
    out: the file to write.
    format: "stablehlo" (ONNX decoders are not written: a ConfigError).
    int8: every product of an activation and a weight int8
      (`compress.int8.convert_function`); the attention products stay float
      and are listed in the header.
    calibration: with int8, batches of training windows (n, context) of byte
      ids, decoded from position 0 to set the input scales.
  """
  import jax
  import jaxaccel
  from jaxaccel.generate import context_of, decoder, init_cache
  _check_format(format)
  if format != "stablehlo":
    raise ConfigError("a language model exports as a cached decoder in "
                      "StableHLO only: use --format stablehlo")
  if int8 and not calibration:
    raise ConfigError("int8 export needs calibration batches of training "
                      "windows (byte ids, one row per window)")
  step = decoder(model)
  context = context_of(model)
  empty = init_cache(model, 1)
  leaves, tree = jax.tree.flatten(empty)
  program = None
  if int8:
    from jaxaccel.compress import int8 as int8_lib
    program = int8_lib.convert_function(
        step, variables, [(np.asarray(w, np.int32),
                           init_cache(model, len(w)))
                          for w in calibration])
  run = (program.forward if program is not None
         else lambda ids, cache: step(variables, ids, cache))

  def decode(ids, *cache):
    logits, cache = run(ids, jax.tree.unflatten(tree, cache))
    return (logits, *jax.tree.leaves(cache))
  batch, length = jax.export.symbolic_shape(
      "batch, length", constraints=[f"length <= {context}"])
  specs = [jax.ShapeDtypeStruct((batch, length), np.int32)] + [
      jax.ShapeDtypeStruct((batch, *a.shape[1:]) if a.ndim else (), a.dtype)
      for a in leaves]
  try:    # one artifact for the CPU, GPUs and TPUs where the model lowers
    exported = jax.export.export(jax.jit(decode), platforms=PLATFORMS)(*specs)
  except Exception:   # noqa: BLE001 - a lowering rule one platform lacks
    exported = jax.export.export(jax.jit(decode))(*specs)
  summary = program.summary() if program else None
  header = {
      "format": "stablehlo", "kind": "decoder", "context": context,
      "num_classes": 256, "output": "logits and cache",
      "cache": [{"shape": list(a.shape[1:]) if a.ndim else [],
                 "batched": bool(a.ndim), "dtype": str(a.dtype)}
                for a in leaves],
      "int8": program is not None,
      **({"int8_layers": summary["int8"], "float_layers": summary["float"]}
         if summary else {}),
      "jaxaccel_version": jaxaccel.__version__, "jax_version": jax.__version__,
      "platforms": list(exported.platforms),
      "calling_convention_version": exported.calling_convention_version,
  }
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  _write(out, MAGIC + json.dumps(header).encode() + b"\n"
         + bytes(exported.serialize()))
  return out


@dataclasses.dataclass
class DecoderArtifact:
  """A loaded language-model decoder (`export_decoder`): `step(ids, cache)
  -> (logits, cache)` on arrays, `init_cache(batch)`, and
  `generate(prompt, tokens=...)` as `jaxaccel.generate` gives it."""
  path: pathlib.Path
  format: str
  header: dict
  exported: Any                 # the deserialized `jax.export.Exported`

  def __post_init__(self):
    import jax
    self.call = jax.jit(self.exported.call)
    self._loops: dict = {}

  @property
  def context(self) -> int:
    return int(self.header["context"])

  def init_cache(self, batch: int = 1) -> list[np.ndarray]:
    """The empty cache for `batch` sequences."""
    return [np.zeros(((batch,) if c["batched"] else ()) + tuple(c["shape"]),
                     c["dtype"]) for c in self.header["cache"]]

  def step(self, ids, cache: list) -> tuple[np.ndarray, list]:
    """Logits (batch, length, 256) of the byte ids (batch, length) that
    follow the cached positions, and the cache that holds them too."""
    out = self.call(np.asarray(ids, np.int32), *cache)
    return out[0], list(out[1:])

  def generate(self, prompt, *, tokens: int, temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0) -> dict:
    """Continues `prompt` by `tokens` bytes in one compiled loop around the
    decoder (see `jaxaccel.generate`); the loop is built once per sampling
    rule."""
    import jax.numpy as jnp
    from jaxaccel.generate import continue_with, decoding_loop
    key = (float(temperature), top_k)
    if key not in self._loops:
      def step(ids, cache):
        out = self.exported.call(ids, *cache)
        return out[0], list(out[1:])
      self._loops[key] = decoding_loop(
          step, lambda: [jnp.asarray(c) for c in self.init_cache(1)],
          temperature=temperature, top_k=top_k)
    return continue_with(self._loops[key], self.context, prompt,
                         tokens=tokens, temperature=temperature, top_k=top_k,
                         seed=seed)


def _read(path) -> tuple[pathlib.Path, str, dict, bytes]:
  """(path, format, header, raw bytes) of an artifact written by `export`,
  the header with the file's `encoding` ("gzip" or "none") added; a
  DataError names a missing, corrupt or foreign file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"artifact {path} does not exist; write one with "
                    "`jaxaccel export`")
  raw = path.read_bytes()
  encoding = "gzip" if raw.startswith(GZIP_MAGIC) else "none"
  if encoding == "gzip":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise DataError(f"{path} is a corrupt gzip file ({e}); export it "
                      "again") from None
  if raw.startswith(MAGIC):
    end = raw.find(b"\n", len(MAGIC))
    try:
      header = json.loads(raw[len(MAGIC):end])
    except ValueError as e:
      raise DataError(f"{path} is a corrupt StableHLO artifact "
                      f"({type(e).__name__}); export it again") from None
    return path, "stablehlo", {**header, "encoding": encoding}, raw[end + 1:]
  if raw.startswith(b"JAXACCEL-"):
    raise DataError(f"{path} is a jaxaccel artifact of a newer kind than this "
                    f"version reads ({raw.split(b' ')[0].decode(errors='replace')})")
  from jaxaccel import onnx_graph
  return path, "onnx", {**onnx_graph.header(path, raw),
                        "encoding": encoding}, raw


def load(path) -> Artifact | DecoderArtifact:
  """Loads an artifact written by `export` (an `Artifact`) or by
  `export_decoder` (a `DecoderArtifact`), ready to run."""
  path, fmt, header, payload = _read(path)
  if fmt == "onnx":
    from jaxaccel import onnx_graph
    return Artifact(path, fmt, header, onnx_graph.runner(payload))
  import jax
  version = header.get("calling_convention_version")
  low = jax.export.minimum_supported_calling_convention_version
  high = jax.export.maximum_supported_calling_convention_version
  if isinstance(version, int) and not low <= version <= high:
    raise DataError(
        f"{path} was exported by jax {header.get('jax_version', '?')} "
        f"(calling convention {version}); this jax {jax.__version__} runs "
        f"versions {low} to {high}: export the run again with this jax, or "
        f"run it with jax {header.get('jax_version', '?')}")
  try:
    exported = jax.export.deserialize(bytearray(payload))
  except Exception as e:
    raise DataError(f"{path} is a corrupt StableHLO artifact "
                    f"({type(e).__name__}); export it again") from None
  platform = jax.default_backend()
  if platform not in exported.platforms:
    raise DataError(f"{path} was lowered for {', '.join(exported.platforms)}, "
                    f"not for {platform} (this machine's backend): export it "
                    "here")
  if header.get("kind") == "decoder":
    return DecoderArtifact(path, fmt, header, exported)
  call = jax.jit(exported.call)
  return Artifact(path, fmt, header, lambda x: np.asarray(call(x)))


def describe(path) -> dict[str, Any]:
  """An artifact's header plus its size on disk and its encoding ("gzip"
  or "none"), without loading it to run."""
  path, _, header, _ = _read(path)
  return {**header, "path": str(path), "bytes": path.stat().st_size}
