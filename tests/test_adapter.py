"""Every capability on the models users already have (tests/model_zoo.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model_zoo as zoo
from jaxaccel import core, models, train
from jaxaccel.compress import pruning, quantization
from jaxaccel.errors import CheckpointError, ConfigError

from conftest import last_json, run_cli

# name -> (builder taking a dropout rate, epochs, optimizer spec of its run;
# COSINE is replaced by the run's step count)
ZOO = {
    "linen_cnn_no_train_arg": (lambda rate: zoo.ExamplesCNN(), 10, "adam(3e-3)"),
    "linen_training_bn_dropout": (lambda rate: zoo.TrainingMLP(rate), 10,
                                  "adam(3e-3)"),
    "nnx_cnn_bn_dropout": (lambda rate: zoo.NNXCNN(dropout_rate=rate,
                                                   rngs=nnx.Rngs(0)), 10,
                           "adam(3e-3)"),
    "nnx_mlp": (lambda rate: zoo.NNXMLP(64, (64,), 10, rngs=nnx.Rngs(0)), 10,
                "adam(3e-3)"),
    "nnx_vit": (lambda rate: zoo.ViT(rngs=nnx.Rngs(0)), 20,
                "adamw(cosine_decay_schedule(5e-3, COSINE))"),
    "plain_functions": (lambda rate: (zoo.mlp_init, zoo.mlp_apply), 10,
                        "adam(3e-3)"),
}
DROPOUT = ("linen_training_bn_dropout", "nnx_cnn_bn_dropout")


def build(name, rate=0.1):
  return ZOO[name][0](rate)


@pytest.fixture(scope="session")   # kept while its xdist group's worker lives
def trained(digits):
  """Each zoo model trained once on digits: name -> (model, FitResult)."""
  cache = {}

  def get(name):
    if name not in cache:
      _, epochs, spec = ZOO[name]
      steps = epochs * (len(digits.x_train) // 32)
      model = build(name)
      cache[name] = model, train.fit(model, spec.replace("COSINE", str(steps)),
                                     digits, epochs=epochs, batch_size=32,
                                     progress=False)
    return cache[name]
  return get


@pytest.mark.xdist_group("zoo_trained")   # one worker trains each model once
@pytest.mark.parametrize("name", list(ZOO))
def test_each_zoo_model_trains_and_predicts(name, trained, digits):
  model, result = trained(name)
  test = train.evaluate(model, result.state, digits.x_test, digits.y_test)
  assert test["accuracy"] >= 0.93, (name, test)
  logits = train.predict(model, result.state, digits.x_test)
  assert logits.shape == (len(digits.x_test), 10)
  assert np.mean(logits.argmax(-1) == digits.y_test) == pytest.approx(
      test["accuracy"])


def _first_steps(ds, steps, batch):
  """The first `steps` batches of training data, no validation split."""
  return dataclasses.replace(ds, x_train=ds.x_train[:steps * batch],
                             y_train=ds.y_train[:steps * batch],
                             x_val=ds.x_val[:0], y_val=ds.y_val[:0])


# The placements touch what differs between kinds of model: linen and NNX
# batch statistics and dropout keys, NNX lists of layers, plain functions.
# (The ViT and the plain linen CNN add nothing a placement sees.)
@pytest.mark.parametrize("name", ["linen_training_bn_dropout",
                                  "nnx_cnn_bn_dropout", "nnx_mlp",
                                  "plain_functions"])
def test_one_device_pmap_and_sharded_agree(name, digits):
  # 8 steps of batch 64 on 8 forced devices. Dropout draws are per device
  # under pmap, so the pmap leg runs the dropout models at rate 0; batch
  # statistics are over the global batch in every mode. SGD, because Adam
  # turns last-bit differences of near-zero gradients into whole steps.
  sub = _first_steps(digits, 8, 64)
  has_dropout = name in DROPOUT
  legs = [("none", 0.1), ("sharded", 0.1), ("pmap", 0.0)] + (
      [("none", 0.0)] if has_dropout else [])
  params = {}
  for mode, rate in legs:
    result = train.fit(build(name, rate), optax.sgd(0.1), sub, epochs=1,
                       batch_size=64, parallel=mode, progress=False)
    assert result.history[0]["steps"] == 8
    params[mode, rate] = result.state.params
  # 8 rows per device sum a convolution's kernel gradient in another order
  # than 64 rows on one device: after 8 steps at learning rate 0.1 the NNX
  # CNN's parameters (magnitudes ~0.1) differed by up to 1.4e-5 and 3.2e-5
  # in two runs with Eigen's kernels; a wrong average would be off by 1e-2.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  jax.tree.map(close, params["sharded", 0.1], params["none", 0.1])
  jax.tree.map(close, params["pmap", 0.0],
               params["none", 0.0 if has_dropout else 0.1])


@pytest.mark.parametrize("name", ["linen_training_bn_dropout",
                                  "nnx_cnn_bn_dropout", "plain_functions"])
def test_resume_ends_with_the_uninterrupted_parameters(name, digits, tmp_path):
  sub = _first_steps(digits, 10, 32)
  full = train.fit(build(name), "adam(1e-3)", sub, epochs=3, batch_size=32,
                   progress=False)
  train.fit(build(name), "adam(1e-3)", sub, epochs=1, batch_size=32,
            out=tmp_path, progress=False)
  resumed = train.fit(build(name), "adam(1e-3)", sub, epochs=3, batch_size=32,
                      out=tmp_path, resume=True, progress=False)
  chex_equal = lambda a, b: np.testing.assert_array_equal(np.asarray(a),
                                                          np.asarray(b))
  jax.tree.map(chex_equal, resumed.state.params, full.state.params)
  jax.tree.map(chex_equal, resumed.state.model_state, full.state.model_state)
  assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


@pytest.mark.xdist_group("zoo_trained")   # one worker trains each model once
def test_nnx_batch_norm_statistics_live_in_the_model_state(trained):
  model, result = trained("nnx_cnn_bn_dropout")
  stats = result.state.model_state["bn1"]
  assert sorted(stats) == ["mean", "var"]
  # Trained statistics moved away from their (0, 1) start.
  assert float(jnp.abs(stats["mean"]).max()) > 1e-3
  assert "rngs" not in str(jax.tree_util.tree_structure(result.state.model_state))
  # The user's module itself is left as it was built.
  np.testing.assert_array_equal(model.bn1.mean[...], np.zeros(16))


def test_nnx_dropout_follows_the_train_state_key(digits):
  model = models.adapt(zoo.NNXCNN(dropout_rate=0.5, rngs=nnx.Rngs(0)))
  params, state = model.init(jax.random.key(0), digits.x_train[:1])
  x = digits.x_train[:16]
  run = lambda k: model.apply(params, state, x, train=True,
                              rng=jax.random.key(k))[0]
  np.testing.assert_array_equal(run(1), run(1))
  assert float(jnp.abs(run(1) - run(2)).max()) > 1e-3
  eval_logits = model.apply(params, state, x, train=False)[0]
  np.testing.assert_array_equal(eval_logits, model.apply(params, state, x,
                                                         train=False)[0])


def test_linen_mode_arguments_are_found(key):
  import flax.linen as nn

  class Deterministic(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
      return nn.Dropout(0.5, deterministic=deterministic)(nn.Dense(4)(x))

  model = models.adapt(Deterministic())
  params, state = model.init(key, jnp.ones((1, 3)))
  x = jnp.ones((64, 3))
  eval_out, _ = model.apply(params, state, x, train=False)
  train_out, _ = model.apply(params, state, x, train=True, rng=key)
  # train=True means deterministic=False: about half the units are dropped.
  dropped = float(jnp.mean(train_out == 0.0)) - float(jnp.mean(eval_out == 0.0))
  assert 0.3 < dropped < 0.7


@pytest.mark.xdist_group("zoo_trained")   # one worker trains each model once
def test_pruning_and_quantization_on_nnx_and_transformer_params(trained, digits):
  for name, sparsity in (("nnx_cnn_bn_dropout", 0.5), ("nnx_vit", 0.3)):
    model, result = trained(name)
    params = result.state.params
    pruned, masks = pruning.prune(params, sparsity, scope="global")
    assert pruning.sparsity_report(pruned)["sparsity"] == pytest.approx(
        sparsity, abs=0.01)
    acc = train.evaluate(model, {"params": pruned, **result.state.model_state},
                         digits.x_test, digits.y_test)["accuracy"]
    assert acc > 0.85, (name, acc)
    q = quantization.quantize(params, bits=8)
    deq = {"params": quantization.dequantize(q), **result.state.model_state}
    q_acc = train.evaluate(model, deq, digits.x_test, digits.y_test)["accuracy"]
    base = train.evaluate(model, result.state, digits.x_test, digits.y_test)
    assert q_acc >= base["accuracy"] - 0.01, (name, q_acc, base)


def test_gradual_pruning_and_qat_train_an_nnx_model(digits):
  model = zoo.NNXCNN(rngs=nnx.Rngs(0))
  steps = 8 * (len(digits.x_train) // 32)
  tx = optax.chain(optax.adam(3e-3), pruning.prune_gradually(
      0.8, begin_step=0, end_step=steps // 2, every=10))
  result = train.fit(quantization.QuantAwareModel(model), tx, digits,
                     epochs=8, batch_size=32, progress=False)
  params = result.state.params
  kernels = [p for p in jax.tree.leaves(params) if p.ndim >= 2]
  zeros = sum(int(jnp.sum(k == 0)) for k in kernels)
  assert zeros / sum(k.size for k in kernels) == pytest.approx(0.8, abs=0.01)
  q = quantization.quantize(params, bits=8)
  acc = train.evaluate(model, {"params": quantization.dequantize(q),
                               **result.state.model_state},
                       digits.x_test, digits.y_test)["accuracy"]
  assert acc >= 0.93


@pytest.mark.xdist_group("zoo_trained")   # one worker trains each model once
def test_distillation_between_nnx_and_linen(trained, digits):
  from jaxaccel.compress import distillation
  nnx_teacher, nnx_result = trained("nnx_mlp")
  linen_teacher, linen_result = trained("linen_training_bn_dropout")
  pairs = [(models.MLP(num_classes=10, widths=(16,)),
            (nnx_teacher, core.variables_of(nnx_result.state))),
           (zoo.NNXMLP(64, (16,), 10, rngs=nnx.Rngs(1)),
            (linen_teacher, core.variables_of(linen_result.state)))]
  for student, teacher in pairs:
    result = distillation.distill(student, [teacher], optax.adam(3e-3), digits,
                                  epochs=10, batch_size=32, temperature=2.0,
                                  alpha=0.9, progress=False)
    assert result.history[-1]["train_agreement"] > 0.9
    acc = train.evaluate(student, result.state, digits.x_test,
                         digits.y_test)["accuracy"]
    assert acc >= 0.9


@pytest.mark.xdist_group("zoo_trained")   # one worker trains each model once
def test_distillation_pmap_and_sharded_equal_one_device(trained, digits):
  from jaxaccel.compress import distillation
  teacher, result = trained("nnx_mlp")
  sub = _first_steps(digits, 8, 64)
  params = {}
  for mode in ("none", "pmap", "sharded"):
    student = models.MLP(num_classes=10, widths=(16,))
    params[mode] = distillation.distill(
        student, [(teacher, core.variables_of(result.state))],
        optax.adam(1e-3), sub, epochs=1, batch_size=64, parallel=mode,
        progress=False).state.params
  for mode in ("pmap", "sharded"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-6),
                 params[mode], params["none"])


def test_user_linen_run_reloads_from_its_import_path(digits, tmp_path, capsys):
  model = zoo.ExamplesCNN()
  sub = _first_steps(digits, 4, 32)
  result = train.fit(model, "adam(1e-3)", sub, epochs=1, batch_size=32,
                     out=tmp_path, progress=False)
  loaded, variables, config = train.load_run(tmp_path)
  assert config["model_spec"] == {"import": "model_zoo:ExamplesCNN", "kwargs": {}}
  np.testing.assert_array_equal(train.predict(loaded, variables, digits.x_test),
                                train.predict(model, result.state, digits.x_test))
  raw = digits.x_test * digits.stats["scale"]
  np.save(tmp_path / "x.npy", raw)
  code, out, _ = run_cli(capsys, "predict", "--run", str(tmp_path), "--input",
                         str(tmp_path / "x.npy"), "--json")
  assert code == 0
  assert last_json(out)["predictions"] == train.predict(
      model, result.state, digits.x_test).argmax(-1).tolist()


def test_nnx_run_loads_with_the_model_object(digits, tmp_path):
  model = zoo.NNXMLP(64, (32,), 10, rngs=nnx.Rngs(0))
  sub = _first_steps(digits, 4, 32)
  result = train.fit(model, "adam(1e-3)", sub, epochs=1, batch_size=32,
                     out=tmp_path, progress=False)
  with pytest.raises(CheckpointError, match=r"load it in Python with the "
                     r"model object: jaxaccel.train.load_run\(path, model=...\)"):
    train.load_run(tmp_path)
  _, variables, _ = train.load_run(tmp_path, model=model)
  np.testing.assert_array_equal(train.predict(model, variables, digits.x_test),
                                train.predict(model, result.state, digits.x_test))


def test_a_run_of_a_class_defined_in_a_notebook_says_so_in_one_line(digits,
                                                                   tmp_path):
  import flax.linen as nn

  class Local(nn.Module):        # as in a notebook: not importable
    width: int = 8

    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
  train.fit(Local(), "adam(1e-3)", _first_steps(digits, 2, 32), epochs=1,
            batch_size=32, out=tmp_path, progress=False)
  with pytest.raises(CheckpointError) as e:
    train.load_run(tmp_path)
  assert len(str(e.value).splitlines()) == 1
  assert "cannot rebuild (Local( # attributes width = 8 )); load it" in str(e.value)


def test_anything_else_is_refused_with_what_is_accepted():
  with pytest.raises(ConfigError, match="cannot use a model of type int: give "
                     "a flax linen module, a flax NNX module, an "
                     r"\(init_fn, apply_fn\) pair"):
    models.adapt(3)
  with pytest.raises(ConfigError, match="from_functions takes two functions"):
    models.from_functions(zoo.mlp_init, "apply")


def test_a_model_that_cannot_take_the_data_says_so(digits):
  with pytest.raises(ConfigError, match=r"cannot take inputs of shape \(8, 8, 1\)"):
    train.fit(zoo.NNXMLP(10, (8,), 10, rngs=nnx.Rngs(0)), "adam(1e-3)", digits,
              epochs=1, progress=False)


@pytest.mark.xdist_group("zoo_trained")   # one worker trains each model once
def test_shrink_stage_on_the_trained_transformer(trained, digits):
  from jaxaccel import compress
  model, result = trained("nnx_vit")
  _, _, records = compress.run(
      model, core.variables_of(result.state), digits,
      [{"stage": "shrink", "fraction": 0.5, "epochs": 3}],
      settings=compress.Settings(latency=False))
  record = records[-1]
  assert record["name"] == "shrunk to 0.5 of each hidden layer +3 ep"
  # half of the two MLP blocks' hidden units: 2 x (32 x 32 + 32 + 32 x 32)
  assert record["parameters_before"] - record["parameters"] == 4160
  assert record["flops"] < record["flops_before"]
  assert record["accuracy"] >= records[0]["accuracy"] - 0.02, records
