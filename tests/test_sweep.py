import jax
import numpy as np
import pytest

from jaxaccel import models, sweep, train
from jaxaccel.errors import ConfigError, SpecError


def small_mlp():
  return models.create("mlp", num_classes=10, widths=(32,))


def test_each_swept_configuration_equals_its_own_fit(digits):
  out = sweep.sweep(small_mlp(), "sgd(0.1, momentum=0.9)", digits, epochs=3,
                    grid={"learning_rate": [0.01, 0.1], "momentum": [0.0, 0.9]},
                    seeds=(0, 1), progress=False)
  assert len(out.results) == 8
  assert [r["hyperparams"] for r in out.results[::2]] == [
      {"learning_rate": 0.01, "momentum": 0.0}, {"learning_rate": 0.01, "momentum": 0.9},
      {"learning_rate": 0.1, "momentum": 0.0}, {"learning_rate": 0.1, "momentum": 0.9}]
  assert len({r["val_accuracy"] for r in out.results}) > 2
  assert out.best["val_accuracy"] == max(r["val_accuracy"] for r in out.results)
  # The concrete spec of a configuration, run alone with its seed, gives
  # the same parameters and validation accuracy.
  for i in (3, 6):
    entry = out.results[i]
    assert entry["spec"] == ("sgd(learning_rate={learning_rate}, momentum={momentum})"
                             .format(**entry["hyperparams"]))
    alone = train.fit(small_mlp(), entry["spec"], digits, epochs=3,
                      seed=entry["seed"], progress=False)
    swept = jax.tree.map(lambda a: a[i], out.states[0].params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5),
                 swept, alone.state.params)
    assert entry["val_accuracy"] == pytest.approx(
        alone.history[-1]["val_accuracy"], abs=1 / len(digits.x_val) + 1e-6)
    assert entry["val_accuracy_history"] == pytest.approx(
        [h["val_accuracy"] for h in alone.history], abs=1 / len(digits.x_val) + 1e-6)


def test_successive_halving_across_optimizer_families(digits):
  out = sweep.sweep(small_mlp(), ["sgd(0.05)", "adam(1e-3)"], digits, epochs=3,
                    grid={"learning_rate": [1e-3, 1e-2]}, halving_every=1,
                    progress=False)
  assert len(out.results) == 4
  assert sorted(r["epochs"] for r in out.results) == [1, 1, 2, 3]
  assert [r["family"] for r in out.results] == [0, 0, 1, 1]
  # Each halving kept the better half by the accuracy seen at that moment.
  after_one = sorted(out.results, key=lambda r: -r["val_accuracy_history"][0])
  assert {id(r) for r in after_one[:2]} == {id(r) for r in out.results
                                            if r["epochs"] > 1}
  assert out.best["epochs"] == 3
  # The heat map has one column per family, labelled by its optimizer.
  rows, cols, table = sweep.accuracy_table(out)
  assert rows == [1e-3, 1e-2] and cols == ["sgd", "adam"]
  assert table[1, 1] == [r["val_accuracy"] for r in out.results][3]


def test_sweep_errors(digits):
  with pytest.raises(SpecError, match="no transformation in 'adam.*' takes 'momentum'"):
    sweep.sweep(small_mlp(), "adam(1e-3)", digits, epochs=1,
                grid={"momentum": [0.9]}, progress=False)
  with pytest.raises(SpecError, match="needs a non-empty list"):
    sweep.sweep(small_mlp(), "adam(1e-3)", digits, epochs=1,
                grid={"learning_rate": []}, progress=False)
  no_val = digits.__class__(**{**digits.__dict__, "x_val": digits.x_val[:0],
                               "y_val": digits.y_val[:0]})
  with pytest.raises(ConfigError, match="validation > 0"):
    sweep.sweep(small_mlp(), "adam(1e-3)", no_val, epochs=1, progress=False)
  with pytest.raises(SpecError, match="reduce_on_plateau needs fit"):
    sweep.sweep(small_mlp(), "adam(1e-3) | reduce_on_plateau()", digits,
                epochs=1, progress=False)
  with pytest.raises(ConfigError, match="sequential_sample must be >= 0"):
    sweep.sweep(small_mlp(), "adam(1e-3)", digits, epochs=1, progress=False,
                sequential_sample=-1)


def test_batch_size_search_scales_the_learning_rate(digits):
  out = sweep.sweep_batch_sizes(small_mlp(), "sgd(0.05)", digits,
                                batch_sizes=[32, 128], base_batch_size=32,
                                epochs=3, progress=False)
  lrs = [r["learning_rate"] for r in out["results"]]
  assert lrs == pytest.approx([0.05, 0.2])
  assert [r["spec"] for r in out["results"]] == ["sgd(learning_rate=0.05)",
                                                  "sgd(learning_rate=0.2)"]
  assert out["target"] == pytest.approx(
      0.99 * max(r["val_accuracy"] for r in out["results"]))
  reached = [r for r in out["results"] if r["seconds_to_target"] is not None]
  assert out["best"] == min(reached, key=lambda r: r["seconds_to_target"])
  with pytest.raises(SpecError, match="scales a constant learning rate"):
    sweep.sweep_batch_sizes(small_mlp(), "sgd(linear_schedule(0.1, 0.0, 10))",
                            digits, batch_sizes=[32], epochs=1, progress=False)
