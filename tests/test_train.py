import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import core, data, models, optim, train
from jaxaccel.checkpoint import RunDir
from jaxaccel.errors import CheckpointError, ConfigError, DataError

from conftest import requires_fashion_mnist


def small_mlp(num_classes=10):
  return models.create("mlp", num_classes=num_classes, widths=(32,))


def test_fit_learns_digits(digits):
  model = models.create("mlp", num_classes=10, widths=(64, 64))
  result = train.fit(model, optax.adam(1e-3), digits, epochs=15, batch_size=32,
                     progress=False)
  test = train.evaluate(model, result.state, digits.x_test, digits.y_test)
  assert test["accuracy"] > 0.95
  losses = [r["train_loss"] for r in result.history]
  assert losses[-1] < 0.25 * losses[0]
  assert int(result.state.step) == 15 * (1350 // 32)
  assert all(r["skipped_steps"] == 0 for r in result.history)


def test_scan_and_stream_epochs_agree(digits):
  model = small_mlp()
  runs = [train.fit(model, optax.sgd(0.1, momentum=0.9), digits, epochs=2,
                    batch_size=64, epoch_mode=mode, progress=False)
          for mode in ("scan", "stream")]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               runs[0].state.params, runs[1].state.params)


def test_any_optax_transformation_works(digits):
  # A user's own chain, stateful and with its own injected hyperparameter,
  # must train exactly as a hand-written optax loop over the same batches.
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(optax.sgd)(learning_rate=0.05),
                   optax.apply_every(2))
  model = small_mlp()
  result = train.fit(model, tx, digits, epochs=2, progress=False)

  init_key, _ = jax.random.split(jax.random.key(0))
  params = model.init(init_key, jnp.zeros((1, *digits.input_shape)),
                      train=False)["params"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x, train=True), y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  for epoch in range(2):
    for idx in np.asarray(train.epoch_order(0, epoch, len(digits.x_train), 128)):
      params, opt_state = step(params, opt_state, digits.x_train[idx],
                               digits.y_train[idx])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               result.state.params, params)
  assert [r["learning_rate"] for r in result.history] == pytest.approx([0.05] * 2)


def test_fit_logs_the_scheduled_learning_rate(digits):
  result = train.fit(small_mlp(), "sgd(linear_schedule(0.1, 0.0, 100))", digits,
                     epochs=3, progress=False)
  steps = [r["step"] for r in result.history]
  assert steps == [10, 20, 30]
  assert [r["learning_rate"] for r in result.history] == pytest.approx(
      [0.1 * (1 - (s - 1) / 100) for s in steps], rel=1e-5)


def test_plateau_reduction_is_fed_the_validation_loss_by_fit(digits):
  # With a zero learning rate the validation loss never improves, so the
  # scale halves after every `patience` epochs once the first sets the best.
  result = train.fit(small_mlp(), "sgd(0.0) | reduce_on_plateau(0.5, patience=1)",
                     digits, epochs=4, progress=False)
  assert [r["lr_scale"] for r in result.history] == [1.0, 0.5, 0.25, 0.125]
  no_val = dataclasses.replace(digits, x_val=digits.x_val[:0], y_val=digits.y_val[:0])
  with pytest.raises(ConfigError, match="reduce_on_plateau watches the validation"):
    train.fit(small_mlp(), "adam(1e-3) | reduce_on_plateau()", no_val, epochs=1,
              progress=False)


def test_transfer_keeps_a_frozen_body_and_trains_a_new_head(digits):
  # The body learns digits 0-4; a new 10-class head learns all ten on top.
  low = digits.y_train < 5
  first_half = dataclasses.replace(
      digits, x_train=digits.x_train[low], y_train=digits.y_train[low],
      x_val=digits.x_val[digits.y_val < 5], y_val=digits.y_val[digits.y_val < 5],
      x_test=digits.x_test[digits.y_test < 5], y_test=digits.y_test[digits.y_test < 5],
      num_classes=5)
  source = models.create("mlp", num_classes=5, widths=(64,))
  trained = train.fit(source, "adam(1e-2)", first_half, epochs=10, progress=False)

  target = models.create("mlp", num_classes=10, widths=(64,))
  variables, copied = core.warm_start(target, core.variables_of(trained.state),
                                       digits.input_shape, seed=1)
  assert copied == ["params/Dense_0/bias", "params/Dense_0/kernel"]
  tx = "adam(1e-2) | freeze('Dense_0')"
  state = core.init_state(target, optim.build(tx), digits.input_shape,
                           variables=variables)
  result = train.fit(target, tx, digits, epochs=10, progress=False, state=state)
  jax.tree.map(np.testing.assert_array_equal, result.state.params["Dense_0"],
               trained.state.params["Dense_0"])
  assert not np.allclose(result.state.params["Dense_1"]["kernel"],
                         variables["params"]["Dense_1"]["kernel"])
  accuracy = train.evaluate(target, result.state, digits.x_test, digits.y_test)
  assert accuracy["accuracy"] > 0.85
  with pytest.raises(CheckpointError, match="copied nothing"):
    core.warm_start(target, {"params": {"Other": {"w": jnp.zeros(3)}}},
                     digits.input_shape)


def test_non_finite_step_is_skipped_and_counted(digits, key):
  model = small_mlp()
  tx = optax.adam(1e-2)
  state = core.init_state(model, tx, digits.input_shape)
  step = jax.jit(core.make_train_step(model, tx))
  x = jnp.asarray(digits.x_train[:8])
  y = jnp.asarray(digits.y_train[:8])
  bad_x = x.at[0, 0, 0, 0].set(jnp.nan)
  new, metrics = step(state, {"x": bad_x, "y": y})
  assert float(metrics["finite"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)
  assert int(new.step) == 1
  good, metrics = step(new, {"x": x, "y": y})
  assert float(metrics["finite"]) == 1.0
  assert not np.array_equal(good.params["Dense_0"]["kernel"],
                            state.params["Dense_0"]["kernel"])


def test_fit_counts_skipped_steps(digits):
  def exploding_loss(logits, labels):   # infinite on every other step's batch
    loss = core.cross_entropy(logits, labels)
    return jnp.where(labels[0] % 2 == 0, jnp.inf, loss)
  result = train.fit(small_mlp(), optax.sgd(0.1), digits, epochs=1,
                     batch_size=32, loss_fn=exploding_loss, progress=False)
  rec = result.history[0]
  assert 0 < rec["skipped_steps"] < rec["steps"]
  assert np.isfinite(rec["train_loss"])
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(result.state.params))


def test_batch_norm_statistics_live_in_model_state(digits):
  model = models.create("resnet18", num_classes=10, stage_sizes=(1,), width=4)
  result = train.fit(model, optax.adam(1e-2), digits, epochs=1, batch_size=64,
                     progress=False)
  state = result.state
  assert "batch_stats" in state.model_state
  assert not any("batch_stats" in str(p) for p in
                 jax.tree_util.tree_flatten_with_path(state.params)[0])
  fresh = core.init_state(model, optax.adam(1e-2), digits.input_shape)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       state.model_state, fresh.model_state)
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_evaluate_pads_the_last_batch_exactly(digits):
  model = small_mlp()
  state = core.init_state(model, optax.sgd(0.1), digits.input_shape)
  full = train.evaluate(model, state, digits.x_test, digits.y_test, batch_size=297)
  padded = train.evaluate(model, state, digits.x_test, digits.y_test, batch_size=64)
  # Means times counts in float32: equal to rounding; a padding row counted
  # would move the accuracy by 1/297.
  assert full["accuracy"] == pytest.approx(padded["accuracy"], abs=1e-6)
  assert abs(full["loss"] - padded["loss"]) < 1e-5
  logits = train.predict(model, state, digits.x_test, batch_size=50)
  assert logits.shape == (297, 10)
  assert np.mean(logits.argmax(-1) == digits.y_test) == pytest.approx(full["accuracy"])


def test_early_stopping_stops_and_records(digits):
  stop = core.EarlyStopping(metric="val_loss", patience=1, min_delta=10.0)
  result = train.fit(small_mlp(), optax.adam(1e-3), digits, epochs=10,
                     early_stopping=stop, progress=False)
  assert result.stopped_early and len(result.history) == 2
  with pytest.raises(ConfigError, match="watches a validation metric .*; got 'loss'"):
    core.EarlyStopping(metric="loss")
  with pytest.raises(ConfigError, match="watches val_loss or val_accuracy .*; got 'val_mse'"):
    train.fit(small_mlp(), optax.adam(1e-3), digits, epochs=1, progress=False,
              early_stopping=core.EarlyStopping(metric="val_mse"))


def test_early_stopping_resumes_with_its_checkpointed_progress(digits, tmp_path):
  # With min_delta 10 only the first epoch improves: an uninterrupted run
  # stops after epoch 1 + patience 3 = 4. A run cut after 2 epochs must
  # resume with 1 bad epoch already counted and stop at 4 too, not at 6.
  stop = lambda: core.EarlyStopping(metric="val_loss", patience=3, min_delta=10.0)
  full = train.fit(small_mlp(), "adam(1e-3)", digits, epochs=10, batch_size=64,
                   early_stopping=stop(), progress=False)
  assert len(full.history) == 4 and full.stopped_early
  train.fit(small_mlp(), "adam(1e-3)", digits, epochs=2, batch_size=64,
            early_stopping=stop(), out=tmp_path, progress=False)
  resumed = train.fit(small_mlp(), "adam(1e-3)", digits, epochs=10, batch_size=64,
                      early_stopping=stop(), out=tmp_path, resume=True,
                      progress=False)
  assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
  assert resumed.stopped_early
  jax.tree.map(np.testing.assert_array_equal, full.state.params,
               resumed.state.params)


def test_fit_config_object_and_keywords_are_the_same_run(digits):
  config = train.FitConfig(epochs=2, batch_size=64, seed=3)
  a = train.fit(small_mlp(), "sgd(0.1)", digits, config, progress=False)
  b = train.fit(small_mlp(), "sgd(0.1)", digits, epochs=2, batch_size=64, seed=3,
                progress=False)
  c = train.fit(small_mlp(), "sgd(0.1)", digits, config, seed=4, progress=False)
  jax.tree.map(np.testing.assert_array_equal, a.state.params, b.state.params)
  assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
  assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]
  with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
    train.fit(small_mlp(), "sgd(0.1)", digits, epoch=2)


def test_resume_in_process_gives_identical_parameters(digits, tmp_path):
  model = small_mlp()
  full = train.fit(model, "adam(1e-3)", digits, epochs=4, batch_size=64,
                   out=tmp_path / "full", progress=False)
  train.fit(model, "adam(1e-3)", digits, epochs=2, batch_size=64,
            out=tmp_path / "part", progress=False)
  resumed = train.fit(model, "adam(1e-3)", digits, epochs=4, batch_size=64,
                      out=tmp_path / "part", resume=True, progress=False)
  jax.tree.map(np.testing.assert_array_equal, full.state.params,
               resumed.state.params)
  jax.tree.map(np.testing.assert_array_equal, full.state.opt_state,
               resumed.state.opt_state)
  lines = RunDir(tmp_path / "part").read_metrics()
  assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
  assert lines[3]["train_loss"] == full.history[3]["train_loss"]


def test_run_directory_contents(digits, tmp_path):
  train.fit(small_mlp(), "clip_by_global_norm(1.0) | adam(1e-3)", digits,
            epochs=2, out=tmp_path, progress=False)
  run = RunDir(tmp_path)
  config = run.read_config()
  assert config["optimizer"] == "clip_by_global_norm(1.0) | adam(0.001)"
  assert config["model_spec"] == {"name": "mlp", "num_classes": 10,
                                  "kwargs": {"widths": [32]}}
  assert run.latest_epoch() == 2
  model, variables, _ = train.load_run(tmp_path)
  assert model == small_mlp()
  with pytest.raises(CheckpointError, match="already holds a run"):
    train.fit(small_mlp(), "adam(1e-3)", digits, epochs=1, out=tmp_path,
              progress=False)
  with pytest.raises(CheckpointError, match="optimizer differ"):
    train.fit(small_mlp(), "sgd(0.1)", digits, epochs=3, out=tmp_path,
              resume=True, progress=False)


def test_corrupt_and_missing_checkpoints(digits, tmp_path):
  with pytest.raises(CheckpointError, match="config.json is missing"):
    train.load_run(tmp_path / "nothing")
  train.fit(small_mlp(), "adam(1e-3)", digits, epochs=1, out=tmp_path,
            progress=False)
  for f in (tmp_path / "checkpoint" / "1" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match="corrupt"):
    train.load_run(tmp_path)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(epochs=0), ConfigError, "epochs must be positive; got 0"),
    (dict(steps=-1), ConfigError, "steps must be positive; got -1"),
    (dict(epochs=1, steps=5), ConfigError, "give epochs or steps, not both"),
    (dict(), ConfigError, r"give either epochs or steps \(the length"),
    (dict(epochs=1, batch_size=0), ConfigError, "batch size must be positive"),
    (dict(epochs=1, batch_size=5000), ConfigError, "larger than the 1350"),
    (dict(epochs=1, epoch_mode="fast"), ConfigError, "unknown epoch_mode 'fast'"),
    (dict(epochs=1, resume=True), ConfigError, "resume needs the run directory"),
])
def test_fit_bad_arguments(digits, kwargs, error, message):
  with pytest.raises(error, match=message):
    train.fit(small_mlp(), optax.sgd(0.1), digits, progress=False, **kwargs)


def test_fit_rejects_labels_beyond_the_model(digits):
  with pytest.raises(DataError, match=r"must lie in \[0, 5\)"):
    train.fit(small_mlp(num_classes=5), optax.sgd(0.1), digits, epochs=1,
              progress=False)
  bad = dataclasses.replace(digits, x_train=digits.x_train.copy())
  bad.x_train[0, 0, 0, 0] = np.nan
  with pytest.raises(DataError, match="x_train holds NaN"):
    train.fit(small_mlp(), optax.sgd(0.1), bad, epochs=1, progress=False)


@pytest.mark.slow
@pytest.mark.xdist_group("fashion_lenet")   # one worker trains it once
@requires_fashion_mnist
def test_fashion_mnist_mlp_reaches_the_bar(fashion_lenet):
  """LeNet-300-100 on Fashion-MNIST: >= 0.885 test accuracy in 10 epochs."""
  model, ds, trained = fashion_lenet
  assert int(trained.step) == 10 * (60000 // 128)
  acc = train.evaluate(model, trained, ds.x_test, ds.y_test)["accuracy"]
  assert acc >= 0.885, acc


@pytest.mark.slow
@requires_fashion_mnist
def test_fashion_mnist_cnn_learns_real_images():
  """The 2-conv CNN on a 12,000-image slice of Fashion-MNIST, 2 epochs:
  >= 0.86 on the full test set (0.8721 measured; a linear model gets about
  0.84). The README's 5-epoch figure (0.9190) comes from its command."""
  ds = data.load("fashion_mnist", validation=0.0, normalize="standardize")
  ds = dataclasses.replace(ds, x_train=ds.x_train[:12000], y_train=ds.y_train[:12000])
  model = models.create("cnn", num_classes=10)
  steps = 2 * (12000 // 128)
  result = train.fit(model, f"adam(cosine_decay_schedule(2e-3, {steps}))", ds,
                     epochs=2, batch_size=128, progress=False)
  acc = train.evaluate(model, result.state, ds.x_test, ds.y_test)["accuracy"]
  assert acc >= 0.86, acc


def test_a_python_built_chain_resumes_in_a_new_process(digits, tmp_path):
  # Function addresses differ per process, so a fresh but identical chain
  # must be accepted; the optimizer state's structure is checked on restore.
  make = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  full = train.fit(small_mlp(), make(), digits, epochs=3, progress=False,
                   out=tmp_path / "a")
  train.fit(small_mlp(), make(), digits, epochs=2, progress=False,
            out=tmp_path / "b")
  resumed = train.fit(small_mlp(), make(), digits, epochs=3, progress=False,
                      out=tmp_path / "b", resume=True)
  jax.tree.map(np.testing.assert_array_equal, full.state.params,
               resumed.state.params)
  with pytest.raises(CheckpointError):
    train.fit(small_mlp(), optax.sgd(0.1), digits, epochs=4, progress=False,
              out=tmp_path / "b", resume=True)


def test_tensorboard_scalars_read_back_and_callbacks_can_stop(digits, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import (
      EventAccumulator)

  class StopAfterTwo(core.Callback):
    def __init__(self):
      self.seen = []

    def on_epoch_end(self, loop, record):
      self.seen.append((record["epoch"], int(loop.state.step)))
      loop.stop = record["epoch"] == 2

  stop = StopAfterTwo()
  model = small_mlp()
  result = train.fit(model, "adam(1e-3)", digits, epochs=5, batch_size=64,
                     progress=False,
                     callbacks=[core.TensorBoard(tmp_path / "tb"), stop])
  assert result.stopped_early and len(result.history) == 2
  steps = len(digits.x_train) // 64
  assert stop.seen == [(1, steps), (2, 2 * steps)]
  events = EventAccumulator(str(tmp_path / "tb"))
  events.Reload()
  for name in ("train_loss", "val_accuracy", "learning_rate"):
    scalars = events.Scalars(name)
    assert [s.step for s in scalars] == [1, 2]
    np.testing.assert_allclose([s.value for s in scalars],
                               [r[name] for r in result.history], rtol=1e-6)
