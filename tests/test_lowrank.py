import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import core, models, train
from jaxaccel.compress import lowrank
from jaxaccel.errors import ConfigError


def mlp_params(key, widths=(12,), inputs=10, classes=4):
  model = models.create("mlp", num_classes=classes, widths=widths)
  return model, model.init(key, jnp.ones((1, inputs)))["params"]


def test_full_rank_is_exact_and_truncation_is_the_best_approximation(key):
  model, params = mlp_params(key)
  full, ranks = lowrank.factorize(params, rank=[10, 4])
  assert ranks == (10, 4)
  for name in ("Dense_0", "Dense_1"):
    np.testing.assert_allclose(full[name]["kernel_u"] @ full[name]["kernel_v"],
                               params[name]["kernel"], atol=1e-5)
  low, _ = lowrank.factorize(params, rank=3)
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  s = np.linalg.svd(w, compute_uv=False)
  approx = np.asarray(low["Dense_0"]["kernel_u"] @ low["Dense_0"]["kernel_v"])
  # Eckart-Young: the error is exactly the dropped singular values
  np.testing.assert_allclose(np.linalg.norm(w - approx), np.sqrt((s[3:] ** 2).sum()),
                             rtol=1e-4)
  x = jax.random.normal(key, (5, 10))
  lr_model = lowrank.lowrank_model(model, [10, 4])
  np.testing.assert_allclose(lr_model.apply({"params": full}, x),
                             model.apply({"params": params}, x), atol=1e-5)


def test_energy_picks_the_fewest_singular_values():
  s = np.array([3.0, 2.0, 1.0, 0.5])
  total = (s ** 2).sum()
  assert lowrank.rank_for_energy(s, 9 / total) == 1
  assert lowrank.rank_for_energy(s, 9.01 / total) == 2
  assert lowrank.rank_for_energy(s, 1.0) == 4


def test_factorized_model_fine_tunes_in_fit(digits):
  model = models.create("mlp", num_classes=10, widths=(64,))
  result = train.fit(model, optax.adam(3e-3), digits, epochs=4, batch_size=64,
                     progress=False)
  acc = train.evaluate(model, result.state, digits.x_test, digits.y_test)["accuracy"]
  low, ranks = lowrank.factorize(result.state.params, energy=0.8)
  assert ranks[0] < 32 and ranks[1] < 10, ranks
  small = lowrank.lowrank_model(model, ranks)
  assert models.count_params(low) < models.count_params(result.state.params)
  tx = optax.adam(3e-3)
  state = core.init_state(small, tx, digits.input_shape)._replace(
      params=low, opt_state=tx.init(low))
  before = train.evaluate(small, state, digits.x_test, digits.y_test)["accuracy"]
  tuned = train.fit(small, tx, digits, epochs=3, batch_size=64, progress=False,
                    state=state)
  after = train.evaluate(small, tuned.state, digits.x_test, digits.y_test)["accuracy"]
  assert after >= before and after >= acc - 0.03, (acc, before, after)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=11), r"rank 11 does not fit layer Dense_0 of shape \(10, 12\): use a rank from 1 to 10"),
    (dict(rank=[3, 5]), r"rank 5 does not fit layer Dense_1 of shape \(12, 4\)"),
    (dict(rank=0), "rank 0 does not fit"),
    (dict(rank=[2]), "got 1 ranks for 2 dense layers"),
    (dict(energy=1.5), r"energy must lie in \(0, 1\]; got 1.5"),
    (dict(), "exactly one of rank"),
])
def test_bad_factorization_arguments(key, kwargs, message):
  _, params = mlp_params(key)
  with pytest.raises(ConfigError, match=message):
    lowrank.factorize(params, **kwargs)


def test_only_mlps_are_factorized(key):
  cnn = models.create("cnn", num_classes=3, features=(4, 4), hidden=8)
  params = cnn.init(key, jnp.ones((1, 8, 8, 1)))["params"]
  with pytest.raises(ConfigError, match="factorize takes MLP params"):
    lowrank.factorize(params, rank=2)
  with pytest.raises(ConfigError, match="supports the MLP; got CNN"):
    lowrank.lowrank_model(cnn, [2, 2])
