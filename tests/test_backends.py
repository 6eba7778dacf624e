"""The switch between the XLA:CPU formulations and the plain ones
(jaxaccel/backends.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel import backends, models
from jaxaccel.errors import ConfigError


class FlaxCNN(nn.Module):
  """The zoo CNN written with flax's own layers."""

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    for f in (8, 16):
      x = nn.max_pool(nn.relu(nn.Conv(f, (3, 3), padding="SAME")(x)),
                      (2, 2), (2, 2))
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def _zoo(name):
  if name == "cnn":
    return models.create("cnn", num_classes=10, features=(8, 16), hidden=16)
  return models.create("resnet18", num_classes=10, stage_sizes=(1, 1), width=4)


def _loss_and_grads(model, variables, x):
  def loss(params):
    out, _ = model.apply({**variables, "params": params}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out))
  return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_both_formulations_give_the_same_values_and_gradients(name):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  model = _zoo(name)
  variables = model.init(jax.random.key(1), x)
  out = {}
  for choice in ("cpu", "plain"):
    with backends.use(choice):
      out[choice] = _loss_and_grads(model, variables, x)
  np.testing.assert_allclose(out["cpu"][0], out["plain"][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               out["cpu"][1], out["plain"][1])


def _convolutions(model, x, platform) -> int:
  variables = model.init(jax.random.key(1), x)
  step = jax.jit(lambda params, x: jax.grad(lambda p: jnp.sum(
      model.apply({**variables, "params": p}, x, train=True)))(params))
  exported = jax.export.export(step, platforms=(platform,))(
      variables["params"], x)
  return exported.mlir_module().count("stablehlo.convolution")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_a_train_step_for_gpus_and_tpus_holds_flaxs_convolutions(platform):
  """Lowered for a GPU or TPU (no device needed), the zoo CNN's gradient
  step holds as many convolutions as the same network in flax's layers: the
  backend's own convolution gradients, not the CPU's workarounds."""
  x = jnp.zeros((4, 8, 8, 1))
  want = _convolutions(FlaxCNN(), x, platform)
  with backends.use("plain"):
    assert _convolutions(_zoo("cnn"), x, platform) == want == 5
  # The CPU formulation takes the first layer's kernel gradient as a matmul.
  with backends.use("cpu"):
    assert _convolutions(_zoo("cnn"), x, platform) == 4


def test_auto_follows_the_default_backend(monkeypatch):
  assert backends.formulation() == "cpu"      # this machine
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert backends.formulation() == "plain"
  with backends.use("cpu"):
    assert backends.formulation() == "cpu"
  with pytest.raises(ConfigError, match="unknown formulation 'gpu'; choose "
                     "one of auto, cpu, plain"):
    with backends.use("gpu"):
      pass
