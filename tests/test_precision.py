import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import core, data, models, parallel, precision, train
from jaxaccel.errors import ConfigError

from conftest import requires_fashion_mnist


def test_overflow_is_skipped_and_the_scale_halves_then_grows():
  tx = precision.loss_scaled(optax.sgd(0.5), initial_scale=8.0,
                             growth_interval=3)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  bad = {"w": jnp.array([1.0, jnp.inf, 2.0])}
  updates, state = tx.update(bad, state, params)
  np.testing.assert_array_equal(updates["w"], np.zeros(3))
  assert float(state.scale) == 4.0 and int(state.good_steps) == 0
  scales = []
  for _ in range(3):
    grads = {"w": jnp.full(3, 4.0)}          # gradients of loss * 4
    updates, state = tx.update(grads, state, params)
    scales.append(float(state.scale))
  # Unscaled gradient 1.0 times the learning rate, on every good step.
  np.testing.assert_allclose(updates["w"], np.full(3, -0.5))
  assert scales == [4.0, 4.0, 8.0]
  assert int(state.good_steps) == 0


def test_scale_never_drops_below_its_floor():
  tx = precision.loss_scaled(optax.sgd(0.1), initial_scale=2.0, min_scale=1.0)
  state = tx.init({"w": jnp.ones(2)})
  for _ in range(3):
    _, state = tx.update({"w": jnp.full(2, jnp.nan)}, state)
  assert float(state.scale) == 1.0


def test_fp16_step_skips_an_overflow_and_keeps_the_params(digits):
  model, tx = precision.apply_policy(
      models.create("mlp", num_classes=10, widths=(16,)), optax.adam(1e-3), "fp16")
  assert model.module.dtype == jnp.float16
  # A scale this large overflows float16 in the backward pass.
  tx = precision.loss_scaled(optax.adam(1e-3), initial_scale=2.0 ** 30)
  state = core.init_state(model, tx, digits.input_shape)
  step = jax.jit(core.make_train_step(model, tx))
  batch = {"x": jnp.asarray(digits.x_train[:32]), "y": jnp.asarray(digits.y_train[:32])}
  new, metrics = step(state, batch)
  assert float(metrics["finite"]) == 0.0
  assert float(new.opt_state.scale) == 2.0 ** 29
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
  while float(metrics["finite"]) == 0.0:     # halves until it fits
    new, metrics = step(new, batch)
  # One halving per skipped step: every step but the last was skipped.
  skipped = int(new.step) - 1
  assert skipped > 1
  assert float(new.opt_state.scale) == 2.0 ** (30 - skipped)
  assert not np.array_equal(new.params["Dense_0"]["kernel"],
                            state.params["Dense_0"]["kernel"])


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_low_precision_keeps_float32_master_params(digits, name):
  model = models.create("mlp", num_classes=10, widths=(64,))
  result = train.fit(model, optax.adam(3e-3), digits, epochs=4, batch_size=32,
                     precision=name, progress=False)
  dtypes = {x.dtype for x in jax.tree.leaves((result.state.params,
                                               result.state.opt_state))}
  assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
  assert precision.is_loss_scaled(result.state.opt_state) == (name == "fp16")
  acc = train.evaluate(model, result.state, digits.x_test, digits.y_test)["accuracy"]
  assert acc > 0.9, acc


def test_policies_and_bad_names():
  assert precision.get_policy("bf16").compute_dtype == jnp.bfloat16
  assert not precision.get_policy("bf16").loss_scaling
  assert precision.get_policy("fp16").loss_scaling
  with pytest.raises(ConfigError, match="unknown precision 'half'"):
    precision.get_policy("half")
  with pytest.raises(ConfigError, match="factor > 1"):
    precision.loss_scaled(optax.sgd(0.1), factor=1.0)


@pytest.mark.slow
@requires_fashion_mnist
def test_fashion_mnist_bf16_matches_fp32():
  """LeNet-300-100, 3 epochs: bf16 within 0.5 points of fp32."""
  ds = data.load("fashion_mnist", validation=0.0, normalize="standardize")
  model = models.create("mlp", num_classes=10, widths=(300, 100))
  steps = 3 * (60000 // 128)
  acc = {}
  for name in ("fp32", "bf16"):
    result = train.fit(model, f"adam(cosine_decay_schedule(1e-3, {steps}))", ds,
                       epochs=3, batch_size=128, precision=name, progress=False)
    acc[name] = train.evaluate(model, result.state, ds.x_test, ds.y_test)["accuracy"]
  assert acc["fp32"] > 0.87, acc
  assert abs(acc["bf16"] - acc["fp32"]) <= 0.005, acc


def test_fit_refuses_a_state_built_without_loss_scaling(digits):
  from jaxaccel import optim
  model = models.create("mlp", num_classes=10, widths=(8,))
  state = core.init_state(model, optim.build("sgd(0.1)"), digits.input_shape)
  with pytest.raises(ConfigError, match="precision='fp16'.*apply_policy"):
    train.fit(model, "sgd(0.1)", digits, epochs=1, precision="fp16",
              state=state, progress=False)
  _, tx = precision.apply_policy(model, optim.build("sgd(0.1)"), "fp16")
  state = core.init_state(model, tx, digits.input_shape)
  result = train.fit(model, "sgd(0.1)", digits, epochs=1, precision="fp16",
                     state=state, progress=False)
  assert result.history[0]["steps"] == len(digits.x_train) // 128
  assert np.isfinite(result.history[0]["train_loss"])
