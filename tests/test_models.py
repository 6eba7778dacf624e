import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel import models
from jaxaccel.errors import ConfigError, DataError


@pytest.mark.parametrize("name, kwargs, n_params", [
    ("mlp", {"widths": (300, 100)}, 784 * 300 + 300 + 300 * 100 + 100 + 1010),
    ("mlp", {"widths": (64, 64)}, 784 * 64 + 64 + 64 * 64 + 64 + 650),
    ("cnn", {}, 320 + 18496 + 3136 * 128 + 128 + 1290),
])
def test_output_shapes_and_parameter_counts(key, name, kwargs, n_params):
  model = models.create(name, num_classes=10, **kwargs)
  v = model.init(key, jnp.zeros((1, 28, 28, 1)))
  assert model.apply(v, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)
  assert models.count_params(v["params"]) == n_params


def test_resnet18_layout_and_batch_stats(key):
  model = models.create("resnet18", num_classes=10)
  v = jax.eval_shape(model.init, key, jnp.zeros((1, 28, 28, 1)))
  # ResNet-18 for small images: 11.17M parameters with a 10-class head.
  assert 11_100_000 < models.count_params(v["params"]) < 11_250_000
  assert "batch_stats" in v and "batch_stats" not in v["params"]


def test_tiny_resnet_train_vs_eval_mode(key):
  model = models.create("resnet18", num_classes=3, stage_sizes=(1, 1), width=4)
  x = jax.random.normal(key, (6, 8, 8, 1))
  v = jax.jit(model.init)(key, x)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  out, new_state = apply(v, x, train=True, mutable=("batch_stats",))
  assert out.shape == (6, 3)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"],
                         new_state["batch_stats"])
  assert any(jax.tree.leaves(changed))
  # Eval mode uses running statistics: a row's output ignores its batch mates.
  alone = apply(v, x[:1], train=False)
  together = apply(v, x, train=False)[:1]
  np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)


def test_reshape_max_pool_equals_flax_max_pool(key):
  """Values and gradients, also where the window holds ties."""
  x = jax.random.normal(key, (2, 7, 6, 3))
  np.testing.assert_array_equal(models.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), (2, 2)))
  g1 = jax.grad(lambda x: jnp.sum(models.max_pool_2x2(x) ** 2))(x)
  g2 = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)) ** 2))(x)
  np.testing.assert_array_equal(g1, g2)
  ties = jnp.maximum(x, 0).at[:, :2].set(1.0)     # zeros and equal rows
  g1 = jax.grad(lambda x: jnp.sum(jnp.sin(models.max_pool_2x2(x))))(ties)
  g2 = jax.grad(lambda x: jnp.sum(jnp.sin(nn.max_pool(x, (2, 2), (2, 2)))))(ties)
  np.testing.assert_array_equal(g1, g2)


def test_model_specs_and_errors():
  assert models.parse_model_spec("mlp:300,100") == ("mlp", {"widths": (300, 100)})
  assert models.parse_model_spec("resnet18:16") == ("resnet18", {"width": 16})
  with pytest.raises(ConfigError, match="unknown model 'vgg'"):
    models.parse_model_spec("vgg")
  with pytest.raises(ConfigError, match="comma-separated integers"):
    models.parse_model_spec("mlp:a,b")
  with pytest.raises(ConfigError, match="no option 'depth'"):
    models.create("mlp", num_classes=10, depth=3)
  with pytest.raises(DataError, match=r"needs images.*\(64,\)"):
    models.check_input("cnn", (64,))


def test_describe_round_trip():
  model = models.create("mlp", num_classes=7, widths=(5, 4))
  assert models.from_description(models.describe(model)) == model


@pytest.mark.parametrize("shape, kernel, strides", [
    ((2, 8, 8, 3), (3, 3), 1), ((2, 7, 9, 2), (3, 3), 2), ((1, 6, 6, 4), (1, 1), 2),
    ((2, 5, 5, 1), (3, 3), 1),
    # 36 and 72 inputs per output: the kernel gradient as a convolution
    ((2, 6, 6, 4), (3, 3), 1), ((2, 7, 9, 8), (3, 3), 2),
    # even sizes at stride 2: padding on one side only (a ResNet stage)
    ((2, 8, 6, 16), (3, 3), 2), ((2, 8, 8, 16), (1, 1), 2),
])
def test_conv_equals_flax_conv(key, shape, kernel, strides):
  """Values and gradients (conv2d's own, in a compiled scan as fit runs it)
  equal nn.Conv's; with fewer than `backends.SMALL_KERNEL_INPUTS` inputs per output
  the kernel gradient is an im2col matmul."""
  x = jax.random.normal(key, shape)
  ours = models.Conv(5, kernel, strides)
  ref = nn.Conv(5, kernel, (strides, strides), padding="SAME")
  v = ours.init(key, x)
  v = jax.tree.map(lambda p: p + 0.1, v)    # a non-zero bias too
  for train in (False, True):
    np.testing.assert_allclose(ours.apply(v, x, train=train), ref.apply(v, x),
                               rtol=1e-5, atol=1e-5)

  def scanned_grads(apply):
    loss = lambda v, x: jnp.sum(jnp.sin(apply(v, x)))
    body = lambda c, x: (c, jax.grad(loss, argnums=(0, 1))(v, x))
    return jax.jit(lambda xs: jax.lax.scan(body, 0, xs)[1])(x[None])
  g1 = scanned_grads(lambda v, x: ours.apply(v, x, train=True))
  g2 = scanned_grads(ref.apply)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               g1, g2)
