"""Artifacts: StableHLO and ONNX, float32 and int8, from the command line and
Python, for registry, linen and NNX models."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import model_zoo as zoo
from jaxaccel import data, export, models, onnx_graph, train
from jaxaccel.checkpoint import RunDir
from jaxaccel.compress import int8
from jaxaccel.errors import ConfigError, DataError

from conftest import last_json, run_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
STATS = {"scale": np.float32(16.0), "mean": np.float32(0.3),
         "std": np.float32(0.4)}       # raw digits (0..16) to standardized


@pytest.fixture(scope="module")
def raw(digits):
  """Raw test inputs, in the units `jaxaccel predict` takes."""
  return (digits.x_test * digits.stats["scale"]).astype(np.float32)


def normalized(x):
  return (x / STATS["scale"] - STATS["mean"]) / STATS["std"]


USERS = {
    "linen_examples_cnn": lambda: zoo.ExamplesCNN(),
    "nnx_cnn_batch_norm": lambda: zoo.NNXCNN(rngs=nnx.Rngs(0)),
    "nnx_vit": lambda: zoo.ViT(rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", list(USERS))
def test_float_artifacts_match_the_model(name, raw, tmp_path):
  model = USERS[name]()
  adapter = models.adapt(model)
  params, state = adapter.init(jax.random.key(0), raw[:1])
  variables = {"params": params, **state}
  want = np.asarray(adapter.logits(variables, normalized(raw)))
  for fmt in export.FORMATS:
    path = export.export(model, variables, input_shape=raw.shape[1:],
                         num_classes=10, format=fmt, normalization=STATS,
                         out=tmp_path / f"m.{fmt}")
    artifact = export.load(path)
    assert artifact.format == fmt and artifact.header["num_classes"] == 10
    if fmt == "stablehlo":    # one file for the CPU, GPUs and TPUs
      assert artifact.header["platforms"] == ["cpu", "cuda", "tpu"]
    assert artifact.header["normalization"] == "standardize"
    # any batch size: the batch dimension is symbolic
    for n in (1, 7, len(raw)):
      np.testing.assert_allclose(artifact(raw[:n]), want[:n], atol=1e-4,
                                 rtol=1e-4)


@pytest.mark.parametrize("name", ["linen_examples_cnn", "nnx_cnn_batch_norm"])
def test_int8_artifacts_predict_what_the_int8_path_predicts(name, raw, digits,
                                                            tmp_path):
  model = USERS[name]()
  adapter = models.adapt(model)
  params, state = adapter.init(jax.random.key(1), raw[:1])
  variables = {"params": params, **state}
  calibration = export.calibration_inputs(digits.x_train * 16.0, STATS)
  program = int8.convert(model, variables, calibration)
  want = np.asarray(program(normalized(raw)))
  floats = np.asarray(adapter.logits(variables, normalized(raw)))
  assert len(program.sites) == 4 and not program.float_sites
  for fmt in export.FORMATS:
    path = export.export(model, variables, input_shape=raw.shape[1:],
                         num_classes=10, format=fmt, normalization=STATS,
                         int8=True, calibration=calibration,
                         out=tmp_path / f"m8.{fmt}")
    artifact = export.load(path)
    assert artifact.header["int8"] and artifact.header["int8_layers"] == [
        s.name for s in program.sites]
    got = artifact(raw)
    if fmt == "onnx":
      # the second convolution, read by an int8 product after a ReLU and
      # an average pool, is a QLinearConv: requantized, then pooled, so a
      # value may round differently. The graph stays nearer the int8
      # program than that is to float32 (near-ties of an untrained model's
      # logits flip on 1-2% of the images).
      assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.97
      assert np.abs(got - want).max() < np.abs(want - floats).max()
    else:
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # the ONNX graph runs integer products on int8 weights and no float kernel
  proto = onnx_graph.build(model, variables, input_shape=raw.shape[1:],
                           prepare=lambda x: data.preprocess(x, STATS),
                           program=program)
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count("ConvInteger") == 1 and ops.count("QLinearConv") == 1
  assert ops.count("MatMulInteger") == 2
  assert "Conv" not in ops and "MatMul" not in ops
  # convolutions: u8 x u8 (int8 + 128, TensorProto.UINT8); the dense layers
  # read ReLU outputs, never negative: u8 x s8 (TensorProto.INT8)
  assert [s.unsigned for s in program.sites][2:] == [True, True]
  assert {i.data_type for i in proto.graph.initializer
          if i.name.startswith("kernel")} == {2, 3}


@pytest.mark.parametrize("sign", ["signed", "unsigned"])
def test_int8_onnx_keeps_the_integer_arithmetic_exact(sign):
  """Weights and inputs at the edges of the int8 range: ONNX Runtime's
  u8 x s8 kernel saturates on u8 values above 127, so signed inputs go
  through u8 x u8; inputs never negative in calibration take [0, 127] and
  the u8 x s8 kernel, exact there."""
  import flax.linen as nn
  rng = np.random.default_rng(0)
  conv = nn.Sequential([nn.Conv(16, (3, 3)), lambda y: y.reshape(y.shape[0], -1)])
  for model, shape in ((nn.Dense(16), (256,)), (conv, (8, 8, 4))):
    x = rng.normal(size=(64, *shape)).astype(np.float32)
    calibration = np.abs(x) if sign == "unsigned" else x
    variables = model.init(jax.random.key(0), x)
    program = int8.convert(model, variables, [calibration], percentile=90.0)
    assert program.sites[0].unsigned == (sign == "unsigned")
    proto = onnx_graph.build(model, variables, input_shape=shape,
                             program=program)
    run = onnx_graph.session(proto.SerializeToString())
    # inputs never seen in calibration (negative ones for an unsigned
    # input, clipped to 0 by both) give the same logits too
    for inputs in (calibration, x):
      np.testing.assert_allclose(run.run(None, {"x": inputs})[0],
                                 np.asarray(program(inputs)), atol=1e-4)


def test_the_zoo_max_pool_exports_as_one_onnx_max_pool():
  model = models.create("cnn", num_classes=10, features=(8, 16), hidden=16)
  x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), x[:1])
  proto = onnx_graph.build(model, variables, input_shape=(8, 8, 1))
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count("MaxPool") == 2 and "ReduceMax" not in ops
  got = onnx_graph.session(proto.SerializeToString()).run(None, {"x": x})[0]
  np.testing.assert_allclose(got, model.apply(variables, x), atol=1e-5,
                             rtol=1e-5)


def _flax_style_cnn():
  """flax's MNIST tutorial CNN, small: `avg_pool` after each ReLU."""
  import flax.linen as nn
  pool = lambda y: nn.avg_pool(y, (2, 2), (2, 2))
  return nn.Sequential([nn.Conv(8, (3, 3)), nn.relu, pool,
                        nn.Conv(16, (3, 3)), nn.relu, pool,
                        lambda y: y.reshape(y.shape[0], -1), nn.Dense(16),
                        nn.relu, nn.Dense(10)])


@pytest.mark.parametrize("sign", ["signed", "unsigned"])
@pytest.mark.parametrize("pool", ["MaxPool", "AveragePool"])
def test_int8_onnx_pools_a_convolution_in_nchw(pool, sign):
  """Each convolution's output stays in NCHW and is pooled there, with one
  transpose into each convolution and one out of each pool. The zoo CNN's
  max pool waits for the rescale (only the pooled values are rescaled); an
  average pool (flax's MNIST tutorial CNN) follows it. On unsigned inputs
  each convolution is a QLinearConv requantizing to the next layer's input
  scale, so the graph and the int8 program may round a value differently
  (an average pool's uint8 mean is rounded again); otherwise a ConvInteger
  whose int32 sums give the int8 program's logits."""
  model = (models.create("cnn", num_classes=10, features=(8, 16), hidden=16)
           if pool == "MaxPool" else _flax_style_cnn())
  x = np.random.default_rng(0).uniform(size=(256, 8, 8, 1)).astype(np.float32)
  x = x if sign == "unsigned" else x - 0.5
  variables = model.init(jax.random.key(0), x[:1])
  program = int8.convert(model, variables, [x])
  proto = onnx_graph.build(model, variables, input_shape=(8, 8, 1),
                           program=program)
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count(pool) == 2 and "ReduceMax" not in ops
  assert ops.count("Transpose") == 4
  # every stored constant is read by a node (no initializer left unused)
  read = {name for node in proto.graph.node for name in node.input}
  assert {t.name for t in proto.graph.initializer} <= read
  got = onnx_graph.session(proto.SerializeToString()).run(None, {"x": x})[0]
  want = np.asarray(program(x))
  agree, bound = (0.995, 0.02) if pool == "MaxPool" else (0.98, 0.03)
  if sign == "unsigned":
    assert ops.count("QLinearConv") == 2 and "ConvInteger" not in ops
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= agree
  else:      # the second convolution reads a ReLU output: unsigned
    assert ops.count("ConvInteger") == 1 and ops.count("QLinearConv") == 1
  np.testing.assert_allclose(got, want, atol=bound * np.abs(want).max())


def test_int8_onnx_pooled_integer_sums_keep_the_logits():
  """A convolution whose pooled output no unsigned int8 product reads
  (no ReLU: the Dense layer's input is signed) stays a ConvInteger, pooled
  on its sums before the rescale: the int8 program's logits."""
  import flax.linen as nn
  model = nn.Sequential([nn.Conv(8, (3, 3)),
                         lambda y: nn.max_pool(y, (2, 2), (2, 2)),
                         lambda y: y.reshape(y.shape[0], -1), nn.Dense(4)])
  x = np.random.default_rng(1).normal(size=(64, 8, 8, 2)).astype(np.float32)
  variables = model.init(jax.random.key(0), x[:1])
  program = int8.convert(model, variables, [x])
  proto = onnx_graph.build(model, variables, input_shape=(8, 8, 2),
                           program=program)
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count("ConvInteger") == 1 and ops.count("MaxPool") == 1
  got = onnx_graph.session(proto.SerializeToString()).run(None, {"x": x})[0]
  np.testing.assert_allclose(got, program(x), atol=1e-5, rtol=1e-5)


def test_pruned_int8_lenet_gzip_onnx_is_over_8x_smaller(tmp_path):
  """LeNet-300-100 at 90% sparsity: int8 gives 4x, gzip on the zero runs
  the rest; the .gz artifact predicts what the plain one predicts."""
  from jaxaccel.compress import pruning
  model = models.create("mlp", num_classes=10, widths=(300, 100))
  x = np.random.default_rng(0).uniform(0, 1, (512, 784)).astype(np.float32)
  variables = model.init(jax.random.key(0), x[:1])
  pruned, _ = pruning.prune(variables["params"], 0.9, scope="global")
  pruned = {"params": pruned}
  write = lambda v, name, **kw: export.export(
      model, v, input_shape=(784,), num_classes=10, format="onnx",
      out=tmp_path / name, **kw)
  dense = write(variables, "dense.onnx")
  calibration = [x[:256], x[256:]]
  plain = write(pruned, "p90.int8.onnx", int8=True, calibration=calibration)
  packed = write(pruned, "p90.int8.onnx.gz", int8=True,
                 calibration=calibration)
  size = lambda p: p.stat().st_size
  assert size(dense) / size(plain) == pytest.approx(4.0, rel=0.02)
  assert size(dense) / size(packed) >= 8.0, (size(dense), size(packed))
  assert export.describe(packed)["encoding"] == "gzip"
  assert export.describe(plain)["encoding"] == "none"
  np.testing.assert_array_equal(export.load(packed)(x), export.load(plain)(x))
  hlo = export.export(model, pruned, input_shape=(784,), num_classes=10,
                      out=tmp_path / "p90.stablehlo.gz")
  np.testing.assert_allclose(export.load(hlo)(x), model.apply(pruned, x),
                             atol=1e-5)


def test_command_line_export_and_predict_without_the_model_code(
    digits, raw, tmp_path, capsys):
  """A user linen model from a module of their own: the artifacts predict
  exactly what `predict --run` predicts, in a process that cannot import
  that module."""
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "user_nets.py").write_text(
      "import flax.linen as nn\n\n"
      "class Net(nn.Module):\n"
      "  @nn.compact\n"
      "  def __call__(self, x):\n"
      "    x = nn.relu(nn.Conv(8, (3, 3))(x))\n"
      "    x = nn.max_pool(x, (2, 2), strides=(2, 2))\n"
      "    return nn.Dense(10)(x.reshape(x.shape[0], -1))\n")
  sys.path.insert(0, str(pkg))
  try:
    import user_nets
    # The whole training split: `export --int8` rebuilds it to calibrate.
    train.fit(user_nets.Net(), "adam(3e-3)", digits, epochs=1, batch_size=64,
              out=tmp_path / "run", progress=False)
    np.save(tmp_path / "x.npy", raw)
    code, out, _ = run_cli(capsys, "predict", "--run", str(tmp_path / "run"),
                           "--input", str(tmp_path / "x.npy"), "--json")
    assert code == 0
    want = last_json(out)["predictions"]
    for fmt, extra in (("stablehlo", []), ("onnx", []), ("onnx", ["--int8"])):
      path = tmp_path / f"net{'8' if extra else ''}.{fmt}"
      code, out, err = run_cli(capsys, "export", "--run", str(tmp_path / "run"),
                               "--format", fmt, *extra, "--out", str(path),
                               "--json")
      assert code == 0, err
      info = last_json(out)
      assert info["bytes"] == path.stat().st_size
      assert info["input_shape"] == [8, 8, 1] and info["int8"] == bool(extra)
    # what jaxaccel's int8 program predicts, calibrated as export calibrates
    model, variables, config = train.load_run(tmp_path / "run")
    program = int8.convert(model, variables, export.calibration_inputs(
        train.load_run_data(config).x_train, None))
    stats = RunDir(tmp_path / "run").read_normalization()
    want8 = np.asarray(program(data.preprocess(raw, stats))).argmax(-1)
  finally:
    sys.path.remove(str(pkg))
    sys.modules.pop("user_nets", None)
  # One process runs the three commands (one jax start-up, not three).
  names = ("net.stablehlo", "net.onnx", "net8.onnx")
  script = ("import sys, json\n"
            "try:\n  import user_nets\nexcept ImportError:\n  pass\n"
            "else:\n  sys.exit('the model module is importable')\n"
            "from jaxaccel import cli\n"
            "for path in sys.argv[2:]:\n"
            "  if cli.main(['predict', '--artifact', path, '--input', sys.argv[1],\n"
            "               '--json']):\n"
            "    sys.exit(2)\n")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, "-c", script, str(tmp_path / "x.npy"),
       *(str(tmp_path / n) for n in names)],
      capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  got = {n: json.loads(l)["predictions"] for n, l in zip(names, lines)}
  assert len(got) == 3
  assert got["net.stablehlo"] == want and got["net.onnx"] == want
  # The int8 artifact predicts what the int8 program predicts (its
  # convolution requantizes to the Dense layer's input scale in one
  # QLinearConv, so the two may round a value differently); against float32
  # this barely trained model's close logits flip a few more.
  assert np.mean(np.asarray(got["net8.onnx"]) == want8) >= 0.995
  assert np.mean(np.asarray(got["net8.onnx"]) == np.asarray(want)) >= 0.97


def test_bad_input_is_one_line_and_exit_2(digits, tmp_path, capsys):
  def fails(*argv, match):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err

  fails("export", "--run", str(tmp_path / "none"), "--format", "onnx",
        "--out", str(tmp_path / "a.onnx"), match="no run found at")
  code, _, _ = run_cli(capsys, "train", "--model", "mlp:16", "--epochs", "1",
                       "--out", str(tmp_path / "run"), "--no-progress")
  assert code == 0
  shutil.copytree(tmp_path / "run", tmp_path / "bare",
                  ignore=shutil.ignore_patterns("checkpoint"))
  fails("export", "--run", str(tmp_path / "bare"), "--format", "onnx",
        "--out", str(tmp_path / "a.onnx"), match="checkpoint")
  assert not (tmp_path / "a.onnx").exists()
  fails("export", "--run", str(tmp_path / "run"), "--format", "tflite",
        "--out", str(tmp_path / "a"),
        match="unknown export format 'tflite'; choose one of stablehlo, onnx")
  assert not (tmp_path / "a").exists()
  np.save(tmp_path / "x.npy", np.zeros((3, 8, 8), np.float32))
  (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
  fails("predict", "--artifact", str(tmp_path / "junk.onnx"), "--input",
        str(tmp_path / "x.npy"), match="is not an artifact of `jaxaccel export`")
  fails("predict", "--artifact", str(tmp_path / "x.npy"), "--input",
        str(tmp_path / "x.npy"), match="is not an artifact of `jaxaccel export`")
  path = tmp_path / "m.stablehlo"
  code, _, _ = run_cli(capsys, "export", "--run", str(tmp_path / "run"),
                       "--format", "stablehlo", "--out", str(path))
  assert code == 0
  path.write_bytes(path.read_bytes()[:-100])
  fails("predict", "--artifact", str(path), "--input", str(tmp_path / "x.npy"),
        match="is a corrupt StableHLO artifact")
  code, _, _ = run_cli(capsys, "export", "--run", str(tmp_path / "run"),
                       "--format", "onnx", "--out", str(tmp_path / "m.onnx.gz"))
  assert code == 0
  gz = tmp_path / "m.onnx.gz"
  gz.write_bytes(gz.read_bytes()[:-20])
  fails("predict", "--artifact", str(gz), "--input", str(tmp_path / "x.npy"),
        match="m.onnx.gz is a corrupt gzip file")
  run_cli(capsys, "export", "--run", str(tmp_path / "run"), "--format", "onnx",
          "--out", str(tmp_path / "m.onnx"))
  np.save(tmp_path / "wrong.npy", np.zeros((3, 9, 9), np.float32))
  fails("predict", "--artifact", str(tmp_path / "m.onnx"), "--input",
        str(tmp_path / "wrong.npy"),
        match="the input has shape (3, 9, 9), but m.onnx takes rows of shape "
              "(8, 8, 1)")


def test_a_model_with_nothing_to_quantize_is_refused(tmp_path):
  def init_fn(key, sample):
    return {"w": jax.numpy.ones(())}

  def apply_fn(params, x):
    return x.reshape(x.shape[0], -1)[:, :3] * params["w"]
  model = models.from_functions(init_fn, apply_fn)
  x = np.ones((4, 5), np.float32)
  with pytest.raises(ConfigError, match="no matmul or convolution on a "
                     "parameter to quantize"):
    export.export(model, {"params": {"w": np.float32(1.0)}}, input_shape=(5,),
                  num_classes=3, format="onnx", int8=True, calibration=[x],
                  out=tmp_path / "m.onnx")
  assert not (tmp_path / "m.onnx").exists()
  with pytest.raises(DataError, match="does not exist"):
    export.load(tmp_path / "m.onnx")


@pytest.fixture(scope="session")   # kept while its xdist group's worker lives
def served(tmp_path_factory, digits):
  """A small run, its two artifacts, and the logits every valid input must
  get: (run dir, {format: artifact}, reference logits of raw inputs)."""
  from jaxaccel import cli
  root = tmp_path_factory.mktemp("served")
  run = root / "run"
  assert cli.main(["train", "--model", "mlp:16", "--epochs", "1", "--out",
                   str(run), "--no-progress"]) == 0
  artifacts = {}
  for fmt in export.FORMATS:
    assert cli.main(["export", "--run", str(run), "--format", fmt, "--out",
                     str(root / f"m.{fmt}")]) == 0
    artifacts[fmt] = export.load(root / f"m.{fmt}")
  model, variables, _ = train.load_run(run)
  stats = RunDir(run).read_normalization()

  def reference(x):
    x = np.asarray(x, np.float32).reshape(len(x), 8, 8, 1)
    return train.predict(model, variables, data.preprocess(x, stats))
  return run, artifacts, reference


def _predict_run(run, x, path):
  """`jaxaccel predict --run RUN --input X.npy --json` in this process:
  (exit code, stdout, stderr)."""
  import contextlib
  import io
  from jaxaccel import cli
  np.save(path, x)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(["predict", "--run", str(run), "--input", str(path),
                     "--json"])
  return code, out.getvalue(), err.getvalue()


def _inputs():
  """Input arrays a user might hand to `predict`: numbers of every dtype,
  strings, good and bad shapes, empty, with NaN or infinities planted."""
  from hypothesis import strategies as st
  from hypothesis.extra import numpy as hnp
  good = st.sampled_from([(1, 8, 8), (3, 8, 8), (2, 8, 8, 1)])
  shapes = st.one_of(good, st.sampled_from([(0, 8, 8), (8, 8), (2, 64),
                                            (3, 9, 9), (2, 8, 8, 3), (4,), ()]))
  numbers = st.sampled_from([np.float32, np.float64, np.int32, np.uint8,
                             np.bool_]).flatmap(
      lambda t: st.just(np.dtype(t)))

  def array(dtype, shape):
    if dtype.kind == "f":
      elements = st.floats(-20, 20, width=32)
    elif dtype.kind == "b":
      elements = st.booleans()
    else:
      elements = st.integers(0, 16)
    return hnp.arrays(dtype, shape, elements=elements)
  numeric = st.tuples(numbers, shapes).flatmap(lambda a: array(*a))
  valid = st.tuples(numbers, good).flatmap(lambda a: array(*a))
  texts = shapes.flatmap(lambda s: hnp.arrays(np.dtype("<U3"), s))
  planted = st.tuples(numeric, st.sampled_from([np.nan, np.inf, -np.inf]),
                      st.integers(0, 10 ** 6))

  def plant(args):
    x, value, where = args
    if x.dtype.kind == "f" and x.size:
      x = x.copy()
      x.reshape(-1)[where % x.size] = value
    return x
  return st.one_of(valid, numeric, texts, planted.map(plant))


@pytest.mark.xdist_group("served")   # one worker builds served once
def test_any_input_array_is_answered_or_refused_in_one_line(served, tmp_path):
  """Property: every array into `predict --run` and into both artifact
  formats gets the model's answer or one line that says what is wrong."""
  from hypothesis import HealthCheck, given, settings
  run, artifacts, reference = served
  seen = {True: 0, False: 0}

  @settings(max_examples=40, deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow])
  @given(_inputs())
  def check(x):
    valid = (x.dtype.kind in "biuf" and x.ndim >= 2 and len(x) > 0
             and x.shape[1:] in ((8, 8), (8, 8, 1))
             and bool(np.isfinite(x.astype(np.float64)).all()))
    seen[valid] += 1
    code, out, err = _predict_run(run, x, tmp_path / "x.npy")
    for artifact in artifacts.values():
      try:
        logits = artifact(x)
      except DataError as e:
        assert not valid and len(str(e).splitlines()) == 1, (x, e)
      else:
        assert valid, x
        np.testing.assert_allclose(logits, reference(x), atol=1e-4, rtol=1e-4)
    if valid:
      assert code == 0, err
      assert last_json(out)["predictions"] == reference(x).argmax(-1).tolist()
    else:
      assert code == 2 and out == "", (x, out)
      assert len(err.strip().splitlines()) == 1, err
      assert err.startswith("jaxaccel: error: the input "), err
  check()
  assert min(seen.values()) >= 5, seen     # both kinds were tried


@pytest.mark.xdist_group("served")   # one worker builds served once
def test_a_batch_larger_than_the_artifacts_batch_runs_in_pieces(served):
  run, artifacts, reference = served
  x = np.random.default_rng(0).uniform(0, 16, (2500, 8, 8)).astype(np.float32)
  want = reference(x)
  for artifact in artifacts.values():
    np.testing.assert_allclose(artifact(x, batch_size=1024), want, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.xdist_group("served")   # one worker builds served once
def test_an_artifact_outside_this_jaxs_window_names_both_versions(served,
                                                                   tmp_path):
  run, artifacts, _ = served
  raw = artifacts["stablehlo"].path.read_bytes()
  end = raw.index(b"\n", len(export.MAGIC))
  header = json.loads(raw[len(export.MAGIC):end])
  header.update(calling_convention_version=1, jax_version="0.4.1")
  old = tmp_path / "old.stablehlo"
  old.write_bytes(export.MAGIC + json.dumps(header).encode() + raw[end:])
  with pytest.raises(DataError) as e:
    export.load(old)
  message = str(e.value)
  assert len(message.splitlines()) == 1
  assert (f"was exported by jax 0.4.1 (calling convention 1); this jax "
          f"{jax.__version__} runs versions "
          f"{jax.export.minimum_supported_calling_convention_version} to ") in message


def test_the_vit_exports_to_int8_onnx_with_its_attention_projections(digits):
  """The NNX ViT's attention kernels are 3-D ((in, heads, head_dim) and
  (heads, head_dim, out)): each is one MatMulInteger on the kernel as a
  matrix; the two attention products of activations stay float."""
  model = zoo.ViT(rngs=nnx.Rngs(0))
  adapter = models.adapt(model)
  params, state = adapter.init(jax.random.key(0), digits.x_train[:1])
  variables = {"params": params, **state}
  program = int8.convert(model, variables,
                         int8.calibration_batches(digits.x_train))
  assert len(program.sites) == 14 and len(program.float_sites) == 4
  proto = onnx_graph.build(model, variables, input_shape=(8, 8, 1),
                           program=program)
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count("MatMulInteger") == 13 and ops.count("ConvInteger") == 1
  got = onnx_graph.session(proto.SerializeToString()).run(
      None, {"x": digits.x_test})[0]
  want = np.asarray(program(digits.x_test))
  assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.99
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_hand_written_attention_exports_to_float_onnx(digits, tmp_path):
  """jnp.split, basic slicing (a gather at constant offsets once the batch
  is symbolic) and lax.slice_in_dim become Slice nodes."""
  model = zoo.HandViT(rngs=nnx.Rngs(0))
  adapter = models.adapt(model)
  params, state = adapter.init(jax.random.key(0), digits.x_train[:1])
  variables = {"params": params, **state}
  path = export.export(model, variables, input_shape=(8, 8, 1),
                       num_classes=10, format="onnx", out=tmp_path / "h.onnx")
  want = np.asarray(adapter.logits(variables, digits.x_test))
  np.testing.assert_allclose(export.load(path)(digits.x_test), want,
                             atol=1e-5, rtol=1e-5)
  ops = [n.op_type for n in onnx_graph.build(
      model, variables, input_shape=(8, 8, 1)).graph.node]
  # the split's three pieces, three slices a head, one that reads the batch
  # size from the input's shape
  assert "Gather" not in ops and ops.count("Slice") == 3 + 2 * 3 + 1
  # every product, attention's too, is a MatMul (ONNX Runtime's Einsum is
  # slower: the graph ran 1.41x faster at batch 256 without it)
  assert "Einsum" not in ops and ops.count("MatMul") == 8
