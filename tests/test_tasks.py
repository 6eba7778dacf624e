"""Tasks: the loss and metrics a run trains and ranks by, for classification,
sequences with a target per position, regression and a user's own."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxaccel import core, data, models, optim, sweep, tasks, train
from jaxaccel.errors import ConfigError, DataError


# ------------------------------------------------------------ exact checks

def test_masked_means_and_counts_on_hand_written_batches():
  logits = jnp.array([[[2.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [2.0, 0.0]]])
  batch = {"y": jnp.array([[0, 1], [1, 0]]),
           "mask": jnp.array([[1.0, 1.0], [0.0, 1.0]])}
  lm = tasks.get("lm")
  # Three valid positions, all predicted right; the masked one is wrong.
  assert float(lm.metrics(logits, batch)["accuracy"]) == 1.0
  assert float(lm.count(batch)) == 3.0
  ce = float(optax.softmax_cross_entropy_with_integer_labels(
      jnp.array([2.0, 0.0]), 0))
  assert float(lm.loss(logits, batch)) == pytest.approx(ce, rel=1e-6)
  assert float(lm.metrics(logits, batch)["bits_per_byte"]) == pytest.approx(
      ce / np.log(2), rel=1e-6)
  assert lm.summarize({"loss": ce})["perplexity"] == pytest.approx(np.exp(ce))
  # A row mask (as evaluate pads with) covers every position of the row.
  rows = {"y": batch["y"], "mask": jnp.array([1.0, 0.0])}
  assert float(lm.count(rows)) == 2.0
  reg = tasks.get("regression")
  out = {"y": jnp.array([1.0, 2.0, 4.0])}
  assert float(reg.loss(jnp.array([[2.0], [2.0], [2.0]]), out)) == pytest.approx(5 / 3)
  assert float(reg.metrics(jnp.array([2.0, 2.0, 2.0]), out)["mae"]) == pytest.approx(1.0)


def test_task_names_inference_and_errors():
  assert tasks.infer(np.zeros(3, np.int32)) == "classification"
  assert tasks.infer(np.zeros((3, 5), np.int32)) == "lm"
  assert tasks.infer(np.zeros((3, 2), np.float32)) == "regression"
  assert tasks.get(None).metric == "accuracy" and tasks.get(None).maximize
  with pytest.raises(ConfigError, match="unknown task 'ranking': use one of"):
    tasks.get("ranking")


# ------------------------------------------------------------- regression

def _regression_data(n=1200, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
  y = np.sin(3 * x[:, 0]) + x[:, 1] ** 2
  return data.from_arrays({"x": x[:1000], "y": y[:1000]},
                          {"x": x[1000:], "y": y[1000:]}, validation=0.2)


@pytest.fixture(scope="session")   # kept while its xdist group's worker lives
def regression_run(tmp_path_factory):
  """An MLP fit 30 epochs to a smooth function of two inputs, in a run
  directory: (data, model, result, run path)."""
  ds = _regression_data()
  model = models.create("mlp", num_classes=1, widths=(64, 64))
  out = tmp_path_factory.mktemp("reg") / "run"
  result = train.fit(model, "adam(3e-3)", ds, epochs=30, batch_size=50,
                     out=out, progress=False)
  return ds, model, result, out


@pytest.mark.xdist_group("regression_run")   # one worker builds regression_run once
def test_regression_trains_below_an_mse_bar_and_ranks_by_val_mse(regression_run):
  ds, model, result, out = regression_run
  assert ds.num_classes is None and ds.y_train.dtype == np.float32
  variance = float(np.var(ds.y_test))
  stop = core.EarlyStopping(patience=2, min_delta=1.0)   # only epoch 1 improves
  last = result.history[-1]
  assert {"train_mse", "train_mae", "val_mse", "val_mae"} <= set(last)
  test = train.evaluate(model, result.state, ds.x_test, ds.y_test,
                        task="regression")
  assert test["mse"] < 0.05 * variance          # the function is learned
  assert result.history[0]["val_mse"] > 3 * last["val_mse"]
  # Early stopping follows val_mse downward: with min_delta 1 nothing after
  # the first epoch counts as better, so it stops after 1 + patience epochs.
  stopped = train.fit(model, "adam(3e-3)", ds, epochs=30, batch_size=50,
                      early_stopping=stop, progress=False)
  assert stopped.stopped_early and len(stopped.history) == 3
  assert stop.metric == "val_mse" and not stop.maximize
  import json
  config = json.loads((out / "config.json").read_text())
  assert config["task"] == "regression" and config["data"]["source"] == "arrays"


def test_reduce_on_plateau_watches_the_regression_loss():
  ds = _regression_data()
  model = models.create("mlp", num_classes=1, widths=(16,))
  spec = "adam(1e-2) | reduce_on_plateau(factor=0.5, patience=1, rtol=0.5)"
  result = train.fit(model, spec, ds, epochs=4, batch_size=100, progress=False)
  # The loss a regression is validated by is its MSE, and the plateau rule
  # sees exactly those values: fed them by hand, it gives the same scales.
  assert all(r["val_loss"] == pytest.approx(r["val_mse"], rel=1e-6)
             for r in result.history)
  state = optim.build(spec).init({"w": jnp.zeros(1)})
  expected = []
  for r in result.history:
    state = optim.observe_plateau(state, r["val_loss"])
    expected.append(float(optim.hyperparams(state)["lr_scale"]))
  assert [r["lr_scale"] for r in result.history] == pytest.approx(expected)
  assert expected[-1] < 1.0          # it did reduce the rate


# ------------------------------------------- a target per position, masked

VOCAB, LENGTH = 8, 6


class SequenceNet(nnx.Module):
  """Embeds each token, mixes the whole sequence in one hidden layer and
  predicts a token per position: enough to reverse a short sequence."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, 16, rngs=rngs)
    self.hidden = nnx.Linear(LENGTH * 16, 128, rngs=rngs)
    self.out = nnx.Linear(128, LENGTH * VOCAB, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x).reshape(x.shape[0], -1)
    return self.out(nnx.relu(self.hidden(h))).reshape(x.shape[0], LENGTH, VOCAB)


def _reverse_task(n, seed):
  """Sequences of 2..6 tokens in 1..7, zero-padded; the target reverses the
  tokens, and padded positions hold random targets that only a mask that is
  ignored would teach."""
  rng = np.random.default_rng(seed)
  x = np.zeros((n, LENGTH), np.int32)
  y = rng.integers(0, VOCAB, (n, LENGTH)).astype(np.int32)   # noise at pads
  mask = np.zeros((n, LENGTH), np.float32)
  for i, length in enumerate(rng.integers(2, LENGTH + 1, n)):
    tokens = rng.integers(1, VOCAB, length)
    x[i, :length], y[i, :length], mask[i, :length] = tokens, tokens[::-1], 1
  return {"x": x, "y": y, "mask": mask}


def test_sequence_task_with_a_padding_mask_reaches_a_token_accuracy_bar():
  ds = data.from_arrays(_reverse_task(3072, 0), _reverse_task(512, 1),
                        validation=0.1)
  assert ds.x_train.dtype == np.int32 and ds.num_classes == VOCAB
  model = SequenceNet(nnx.Rngs(0))
  result = train.fit(model, "adam(3e-3)", ds, epochs=12, batch_size=64,
                     progress=False)
  assert result.history[-1]["val_bits_per_byte"] < result.history[0]["val_bits_per_byte"]
  test = train.evaluate(model, result.state, ds.arrays("test"), task="lm")
  assert test["accuracy"] > 0.9
  # The figure is the accuracy over valid positions only, as computed by hand.
  predicted = train.predict(model, result.state, ds.x_test).argmax(-1)
  valid = ds.extras["mask"]["test"] == 1
  assert test["accuracy"] == pytest.approx(
      np.mean(predicted[valid] == ds.y_test[valid]), abs=1e-6)
  assert np.mean(predicted[~valid] == ds.y_test[~valid]) < 0.5
  assert test["perplexity"] == pytest.approx(np.exp(test["loss"]), rel=1e-6)


# -------------------------------------------------------------- user tasks

def test_a_user_task_is_two_functions_and_ranks_a_sweep(digits):
  """A hinge-style task of the user's: it trains, and the sweep ranks by its
  metric, lower first."""
  def loss(logits, batch):   # multiclass hinge: the best wrong class by 1
    right = jnp.take_along_axis(logits, batch["y"][:, None], -1)[:, 0]
    wrong = jnp.where(jax.nn.one_hot(batch["y"], 10) > 0, -jnp.inf, logits)
    return tasks.masked_mean(jax.nn.relu(1 + wrong.max(-1) - right), batch)

  def metrics(logits, batch):
    wrong = (jnp.argmax(logits, -1) != batch["y"]).astype(jnp.float32)
    return {"error": tasks.masked_mean(wrong, batch)}
  task = tasks.Task(loss=loss, metrics=metrics, metric="error")
  model = models.create("mlp", num_classes=10, widths=(32,))
  result = train.fit(model, "adam(1e-2)", digits, epochs=3, batch_size=64,
                     task=task, progress=False)
  assert result.history[-1]["val_error"] < 0.2
  out = sweep.sweep(model, "adam(1e-2)", digits, epochs=2, batch_size=64,
                    grid={"learning_rate": [1e-4, 1e-2]}, task=task,
                    progress=False)
  assert out.metric == "val_error" and not out.maximize
  assert out.best["hyperparams"]["learning_rate"] == 1e-2
  assert out.best["val_error"] == min(e["val_error"] for e in out.results)


def test_classification_targets_must_be_integers(digits):
  ds = data.from_arrays({"x": digits.x_train, "y": digits.y_train.astype(np.float32)})
  with pytest.raises(DataError, match="needs integer class ids .* task='regression'"):
    train.fit(models.create("mlp", num_classes=10, widths=(8,)), "sgd(0.1)", ds,
              epochs=1, task="classification", progress=False)


@pytest.mark.xdist_group("regression_run")   # one worker builds regression_run once
def test_compression_records_a_regression_by_its_mse(regression_run):
  """The compress stages measure and compare with the task's metric: MSE,
  lower is better, for a regression run."""
  from jaxaccel.compress import report, stages
  ds, model, result, _ = regression_run
  state = result.state
  _, _, records = stages.run(model, core.variables_of(state), ds,
                             [{"stage": "prune", "sparsity": 0.5, "epochs": 2}],
                             settings=stages.Settings(latency=False))
  mse = train.evaluate(model, state, ds.x_test, ds.y_test)["mse"]
  assert records[0]["metric"] == "mse" and "accuracy" not in records[0]
  assert records[0]["mse"] == pytest.approx(mse, rel=1e-5)
  payload = report.compare(records[0], records[-1])
  assert payload["test_mse_before"] == records[0]["mse"]
  assert payload["test_mse_after"] < 0.25 * np.var(ds.y_test)   # still learned
  # The better of two records of equal size is the one of lower MSE.
  worse = dict(records[0], mse=records[0]["mse"] + 1.0, name="worse")
  assert [r["name"] for r in report.pareto_front([records[0], worse])] == ["original"]


@pytest.mark.parametrize("task, message", [
    ("regression", "the regression task takes float targets; y_train has "
                   "dtype int32"),
    ("lm", r"the lm task takes a target per position, \(n, length\); y_train "
           r"has shape \(1350,\)"),
])
def test_a_task_that_does_not_fit_the_targets_is_refused(digits, task, message):
  with pytest.raises(DataError, match=message):
    train.fit(models.create("mlp", num_classes=10, widths=(8,)), "sgd(0.1)",
              digits, epochs=1, task=task, progress=False)
