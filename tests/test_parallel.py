import dataclasses
import json
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxaccel import bench, models, parallel, train
from jaxaccel.errors import ConfigError

from conftest import run_cli

TINY_MODELS = {
    "mlp": dict(widths=(32,)),
    "cnn": dict(features=(4, 8), hidden=16),
    "resnet18": dict(stage_sizes=(1, 1), width=4),
}


@pytest.fixture(scope="module")
def small(digits):
  """256 training rows of digits: 4 steps of 64 per epoch."""
  return dataclasses.replace(digits, x_train=digits.x_train[:256],
                             y_train=digits.y_train[:256],
                             x_val=digits.x_val[:0], y_val=digits.y_val[:0])


def assert_same(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


def fit_tiny(name, ds, **kwargs):
  model = models.create(name, num_classes=10, **TINY_MODELS[name])
  return train.fit(model, optax.adam(1e-3), ds, epochs=2, batch_size=64,
                   progress=False, **kwargs)


# Every mode with each epoch mode for the MLP; one pairing each for the
# models that compile slowly (the pairings swap between the two).
RUNS = {
    "mlp": [("pmap", "scan"), ("pmap", "stream"), ("sharded", "scan"),
            ("sharded", "stream")],
    "cnn": [("pmap", "scan"), ("sharded", "stream")],
    "resnet18": [("pmap", "stream"), ("sharded", "scan")],
}


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_none_pmap_and_sharded_give_the_same_parameters(small, name):
  ref = fit_tiny(name, small)
  assert jax.device_count() == 8
  for mode, epoch_mode in RUNS[name]:
    got = fit_tiny(name, small, parallel=mode, epoch_mode=epoch_mode)
    assert int(got.state.step) == int(ref.state.step) == 8
    assert_same(got.state.params, ref.state.params)
    assert_same(got.state.model_state, ref.state.model_state)
    assert got.history[-1]["train_loss"] == pytest.approx(
        ref.history[-1]["train_loss"], rel=1e-5)


def spec_of(leaf):
  return leaf.sharding.spec


@pytest.mark.parametrize("fsdp", [False, True])
def test_model_axis_and_fsdp_match_one_device(small, fsdp):
  model = models.create("mlp", num_classes=10, widths=(32, 16))
  run = lambda **kw: train.fit(model, optax.adam(1e-3), small, epochs=2,
                               batch_size=64, progress=False, **kw)
  ref = run()
  got = run(parallel="sharded", mesh_shape=(2, 4), fsdp=fsdp)
  assert_same(got.state.params, ref.state.params)
  assert_same(got.state.opt_state, ref.state.opt_state)
  kernel = P("data", "model") if fsdp else P(None, "model")
  assert spec_of(got.state.params["Dense_0"]["kernel"]) == kernel
  assert spec_of(got.state.params["Dense_0"]["bias"]) == P("model")
  # The optimizer's moments follow their parameters.
  mu = got.state.opt_state[0].mu
  assert spec_of(mu["Dense_0"]["kernel"]) == kernel
  # 10 outputs do not split over 4 devices: that kernel keeps whole columns.
  assert spec_of(got.state.params["Dense_2"]["kernel"]) == (
      P("data", None) if fsdp else P(None, None))


def test_partition_spec_rules_by_path():
  mesh = parallel.make_mesh((2, 4))
  rules = parallel.TENSOR_PARALLEL_RULES
  spec = lambda path, shape, **kw: parallel.partition_spec(
      path, shape, mesh, rules=rules, **kw)
  assert spec("params/Dense_1/kernel", (8, 12)) == P(None, "model")
  assert spec("opt_state/0/nu/Dense_1/kernel", (8, 12)) == P(None, "model")
  assert spec("params/Dense_1/kernel", (8, 10)) == P(None, None)
  assert spec("params/Conv_0/kernel", (3, 3, 1, 8)) == P(None, None, None, None)
  assert spec("params/Conv_0/kernel", (3, 3, 1, 8), fsdp=True) == P(
      None, None, None, "data")
  assert spec("step", ()) == P()
  custom = parallel.partition_spec("params/Conv_0/kernel", (3, 3, 4, 8), mesh,
                                   rules=[(r"Conv_\d+/kernel$",
                                           P(None, None, "model", None))])
  assert custom == P(None, None, "model", None)


@pytest.mark.parametrize("call, message", [
    (lambda: parallel.make_engine(None, optax.sgd(0.1), mode="dp"),
     "unknown parallel mode 'dp': use one of none, pmap, sharded"),
    (lambda: parallel.make_mesh((16,)),
     r"asks for 16 devices but only 8 exist"),
    (lambda: parallel.make_mesh((3, 2)),
     r"multiplies to 6, not to the 8 devices"),
    (lambda: parallel.make_mesh((2, 2, 2)), r"must be \(data,\) or \(data, model\)"),
    (lambda: parallel.parse_mesh("2by4"), "mesh '2by4' is not a shape"),
    (lambda: parallel.make_engine(None, optax.sgd(0.1), mode="pmap",
                                  mesh_shape=(2, 4)), "pmap splits over one axis"),
    (lambda: parallel.make_engine(None, optax.sgd(0.1), mode="pmap",
                                  mesh_shape=(4,)), r"multiplies to 4, not to the 8"),
    (lambda: parallel.make_engine(None, optax.sgd(0.1), mesh_shape=(8,)),
     "need parallel='sharded'"),
    (lambda: parallel.make_engine(None, optax.sgd(0.1), mode="sharded",
                                  precision="fp8"), "unknown precision 'fp8'"),
    (lambda: parallel.make_engine(models.MLP(num_classes=10), optax.sgd(0.1),
                                  mode="sharded").check_batch(100),
     "batch size 100 does not split over the 8 devices.*e.g. 96 or 104"),
    (lambda: parallel.initialize("127.0.0.1:1234", num_processes=2, process_id=2),
     r"process id 2 is outside 0..1 for 2 processes"),
    (lambda: parallel.initialize("127.0.0.1:1234", num_processes=0, process_id=0),
     "num_processes must be at least 1; got 0"),
    (lambda: parallel.initialize("127.0.0.1:1234"),
     "needs num_processes and process_id"),
    (lambda: parallel.initialize(num_processes=2, process_id=0),
     "need the coordinator's address"),
    (lambda: parallel.initialize("localhost", num_processes=2, process_id=0),
     "coordinator 'localhost' is not HOST:PORT"),
])
def test_bad_parallel_settings(call, message):
  with pytest.raises(ConfigError, match=message):
    call()


def test_fit_refuses_a_batch_that_does_not_split(small):
  model = models.create("mlp", num_classes=10, widths=(8,))
  with pytest.raises(ConfigError, match="batch size 60 does not split over the 8"):
    train.fit(model, optax.sgd(0.1), small, epochs=1, batch_size=60,
              parallel="pmap", progress=False)


def test_cli_trains_sharded_over_a_mesh_and_predicts(capsys, tmp_path):
  code, out, err = run_cli(
      capsys, "train", "--model", "mlp:32", "--epochs", "2", "--batch-size", "64",
      "--parallel", "sharded", "--mesh", "2x4", "--precision", "bf16",
      "--out", str(tmp_path / "r"), "--json", "--no-progress")
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert (result["devices"], result["processes"]) == (8, 1)
  assert (result["parallel"], result["precision"]) == ("sharded", "bf16")
  assert result["test_accuracy"] > 0.5
  np.save(tmp_path / "x.npy", np.zeros((3, 8, 8), np.float32))
  code, out, err = run_cli(capsys, "predict", "--run", str(tmp_path / "r"),
                           "--input", str(tmp_path / "x.npy"), "--json")
  assert code == 0, err
  assert json.loads(out.strip().splitlines()[-1])["count"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "3x2", "--parallel", "sharded"], "multiplies to 6, not to the 8"),
    (["--mesh", "16", "--parallel", "sharded"], "asks for 16 devices but only 8"),
    (["--parallel", "pmap", "--batch-size", "36"], "batch size 36 does not split"),
    (["--num-processes", "2", "--process-id", "0"], "need the coordinator's address"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "5"],
     "process id 5 is outside 0..1"),
])
def test_cli_bad_parallel_flags(capsys, tmp_path, argv, message):
  code, _, err = run_cli(capsys, "train", "--epochs", "1", "--out",
                         str(tmp_path / "r"), "--no-progress", *argv)
  assert code == 2
  assert re.search(message, err), err


def test_parallel_bench_sides_train_the_same_model():
  """The bench times one device, pmap and the sharded mesh on the same
  model and batches: their losses agree, bf16's to its precision."""
  report = bench.run_parallel_suite(dataset="digits", model_names=["mlp"],
                                    steps=2, repeats=1, progress=False)
  assert report["devices"] == 8 and report["batch_size"] == 128
  entry = report["models"]["mlp"]
  losses = entry["train_loss"]
  assert set(losses) == {"none", "pmap", "sharded", "none_bf16"}
  for mode in ("pmap", "sharded"):
    assert losses[mode] == pytest.approx(losses["none"], rel=1e-5)
  assert losses["none_bf16"] == pytest.approx(losses["none"], rel=2e-2)
  assert losses["none"] < 2.3          # trained: below chance's 2.30
  assert len(entry["one_device_ratios"]) == 1
  text = bench.format_parallel_report(report)
  assert "test correctness only" in text


def test_sharded_run_resumes_to_the_uninterrupted_result(small, tmp_path):
  model = models.create("mlp", num_classes=10, widths=(16,))
  run = lambda epochs, out, **kw: train.fit(
      model, "adam(1e-3)", small, epochs=epochs, batch_size=64, out=out,
      parallel="sharded", progress=False, **kw)
  full = run(3, tmp_path / "full")
  run(2, tmp_path / "part")
  resumed = run(3, tmp_path / "part", resume=True)
  assert_same(resumed.state.params, full.state.params, rtol=0, atol=0)
  assert_same(resumed.state.opt_state, full.state.opt_state, rtol=0, atol=0)


def test_prefetch_issues_the_next_batch_before_yielding():
  produced = []

  def batches():
    for i in range(4):
      produced.append(i)
      yield i
  it = parallel.prefetch(batches(), size=2)
  assert next(it) == 0 and produced == [0, 1]
  assert list(it) == [1, 2, 3]


def test_a_gpt_split_over_heads_and_mlp_and_by_fsdp_equals_one_device():
  """8 steps of a tiny GPT: a (data 2, model 4) mesh with the transformer
  rules, and FSDP over 8, give one device's parameters."""
  from jaxaccel import data
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (128, 17)).astype(np.int32)
  ds = data.from_arrays({"x": tokens[:, :-1], "y": tokens[:, 1:]},
                        validation=0.0, num_classes=256)
  model = models.create("gpt", num_classes=256, layers=1, heads=4, width=32,
                        context=16)
  # SGD: Adam would blow float noise in the key bias's gradient (zero in
  # exact arithmetic: softmax ignores a shift shared by all keys) up to
  # whole steps of the learning rate.
  run = lambda **kw: train.fit(model, "sgd(0.3, momentum=0.9)", ds, epochs=1,
                               batch_size=16, progress=False, **kw)
  one = run()
  tp = run(parallel="sharded", mesh_shape=(2, 4))
  fsdp = run(parallel="sharded", fsdp=True)
  assert one.history[0]["steps"] == 8
  for got in (tp, fsdp):
    assert_same(got.state.params, one.state.params, rtol=1e-5, atol=1e-6)
  attention = tp.state.params["block_0"]["attention"]
  assert spec_of(attention["query"]["kernel"]) == P(None, "model", None)
  assert spec_of(attention["out"]["kernel"]) == P("model", None, None)
  assert spec_of(tp.state.params["block_0"]["mlp_out"]["kernel"]) == P("model", None)
