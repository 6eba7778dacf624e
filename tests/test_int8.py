"""Integer inference for any model (compress.int8) and shrink (units removed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_zoo as zoo
from jaxaccel import compress, core, models, train
from jaxaccel.compress import int8, quantization, shrink
from jaxaccel.errors import ConfigError

RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(64, 8, 8, 1)).astype(np.float32)


class LinenCNN(nn.Module):
  """Written as flax's examples write it: no train argument, nn.Conv."""
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="VALID")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4)(x)


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.linear = nnx.Linear(8 * 8 * 8, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.linear(x.reshape(x.shape[0], -1))


def _plain_model():
  def init_fn(key, x):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (64, 16)) / 8,
            "w2": jax.random.normal(k2, (16, 4)) / 4}

  def apply_fn(params, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"])
    return jnp.matmul(h, params["w2"])
  return models.from_functions(init_fn, apply_fn)


def _products(program, x) -> dict:
  """The lowered program's products: int8 x int8 -> int32 matmuls and
  convolutions ("int32"), float ones ("float"), and int32 multiplies (the
  taps of a direct int8 convolution, "int32_taps")."""
  text = program.forward.lower(jnp.asarray(x)).as_text().splitlines()
  product = [ln for ln in text if "dot_general" in ln or "convolution" in ln]
  return {"int32": sum("xi8>" in ln and "i32>" in ln for ln in product),
          "float": sum("xi8>" not in ln for ln in product),
          "int32_taps": sum("multiply" in ln and "xi32>" in ln for ln in text)}


@pytest.mark.parametrize("kind", ["linen", "nnx", "functions"])
def test_every_layer_of_any_model_runs_int8(kind):
  model = {"linen": LinenCNN(), "nnx": NNXCNN(nnx.Rngs(0)),
           "functions": _plain_model()}[kind]
  adapter = models.adapt(model)
  params, state = adapter.init(jax.random.key(0), IMAGES[:1])
  variables = {"params": params, **state}
  program = int8.convert(model, variables, [IMAGES[:32], IMAGES[32:]])
  expected = {"linen": ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"],
              "nnx": ["conv/kernel", "linear/kernel"],
              "functions": ["w1", "w2"]}[kind]
  assert [s.name for s in program.sites] == expected
  assert program.float_sites == []
  # Every product is int8 x int8 -> int32: the one-channel first
  # convolutions (9 inputs per output) as nine int32 multiply-adds, the
  # others as one int8 matmul or convolution each.
  direct = {"linen": 1, "nnx": 1, "functions": 0}[kind]
  assert _products(program, IMAGES) == {
      "int32": len(expected) - direct, "float": 0, "int32_taps": 9 * direct}
  ref = np.asarray(adapter.logits(variables, IMAGES))
  got = np.asarray(program(IMAGES))
  # random weights and inputs: 8 bits keep each logit within 10% of the
  # largest, 2% on average
  err = np.abs(got - ref) / np.abs(ref).max()
  assert err.max() < 0.1 and err.mean() < 0.02


def test_an_int8_dense_layer_equals_its_integer_arithmetic():
  model = nn.Dense(3)
  x = RNG.normal(size=(5, 6)).astype(np.float32)
  variables = model.init(jax.random.key(1), x)
  program = int8.convert(model, variables, [x], percentile=100.0)
  kernel = np.asarray(variables["params"]["kernel"])
  w_scale = np.abs(kernel).max(axis=0) / 127
  w_q = np.round(kernel / w_scale).astype(np.int64)
  s = np.abs(x).max() / 127
  x_q = np.clip(np.round(x * (1 / s)), -127, 127).astype(np.int64)
  expected = (x_q @ w_q) * (s * w_scale) + np.asarray(variables["params"]["bias"])
  np.testing.assert_allclose(program(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["matmul", "direct"])
@pytest.mark.parametrize("strides,padding,layout", [
    ((1, 1), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
    ((2, 2), ((0, 1), (1, 0)), ("NCHW", "OIHW", "NCHW"))])
def test_int8_convolution_forms_equal_the_int8_convolution(strides, padding,
                                                           layout, form):
  x = jnp.asarray(RNG.integers(-127, 128, (2, 3, 9, 9)), jnp.int8)
  w = RNG.integers(-127, 128, (5, 3, 3, 3)).astype(np.int8)
  if layout[0] == "NHWC":
    x, w = jnp.transpose(x, (0, 2, 3, 1)), np.transpose(w, (2, 3, 1, 0))
  expected = jax.lax.conv_general_dilated(
      x, jnp.asarray(w), strides, padding, dimension_numbers=layout,
      preferred_element_type=jnp.int32)
  eqn = jax.make_jaxpr(lambda a, b: jax.lax.conv_general_dilated(
      a, b, strides, padding, dimension_numbers=layout))(
          x.astype(jnp.float32), jnp.asarray(w, jnp.float32)).jaxpr.eqns[0]
  got = int8._conv_int32(eqn, x, w, form)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, expected)


class MaxPoolCNN(nn.Module):
  """nn.max_pool (a reduce_window) after a biased conv and ReLU."""
  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("model", [
    models.create("cnn", num_classes=4, features=(8, 16), hidden=16),
    MaxPoolCNN()], ids=["zoo_cnn", "nn_max_pool"])
def test_pooling_the_int32_sums_first_changes_no_bit(model, monkeypatch):
  """A conv's rescale waits through its bias, ReLU and max-pool (each step
  non-decreasing): the logits equal those of rescaling at once."""
  variables = model.init(jax.random.key(0), IMAGES[:1])
  steps, step = [], int8._deferred_step

  def recording(eqn, *args):
    out = step(eqn, *args)
    if out is not None:
      steps.append(eqn.primitive.name)
    return out
  monkeypatch.setattr(int8, "_deferred_step", recording)
  deferred = np.asarray(int8.convert(model, variables, [IMAGES])(IMAGES))
  assert {"add", "max"} <= set(steps)
  assert {"reduce_max", "reduce_window_max"} & set(steps)
  monkeypatch.setattr(int8, "_deferred_step", lambda *a: None)
  np.testing.assert_array_equal(
      deferred, np.asarray(int8.convert(model, variables, [IMAGES])(IMAGES)))


def test_a_product_of_two_activations_stays_float_and_is_listed():
  def init_fn(key, x):
    return {"w": jax.random.normal(key, (6, 6))}

  def apply_fn(params, x):
    h = x @ params["w"]
    return jnp.einsum("bi,bj->bi", h, h)       # attention-like: no weight
  model = models.from_functions(init_fn, apply_fn)
  x = RNG.normal(size=(4, 6)).astype(np.float32)
  params, _ = models.adapt(model).init(jax.random.key(0), x)
  program = int8.convert(model, {"params": params}, [x])
  assert [s.name for s in program.sites] == ["w"]
  assert program.summary()["float"] == ["a product of two activations"]


def test_a_model_without_a_weight_product_is_refused():
  model = models.from_functions(lambda key, x: {"b": jnp.zeros(3)},
                                lambda p, x: x[:, :3] + p["b"])
  with pytest.raises(ConfigError, match="no matmul or convolution on a "
                                        "parameter to quantize"):
    int8.convert(model, {"params": {"b": jnp.zeros(3)}}, [np.ones((2, 4))])


def test_quantize_stage_runs_the_cnn_on_integer_products(digits):
  model = models.create("cnn", num_classes=10, features=(8, 16), hidden=32)
  result = train.fit(model, "adam(3e-3)", digits, epochs=8, batch_size=64,
                     progress=False)
  variables = core.variables_of(result.state)
  settings = compress.Settings(latency=False)
  _, qvars, records = compress.run(model, variables, digits,
                                   [{"stage": "quantize"}], settings=settings)
  record = records[-1]
  assert record["inference"] == "int8 products"
  assert record["int8_layers"] == ["Conv_0/kernel", "Conv_1/kernel",
                                   "Dense_0/kernel", "Dense_1/kernel"]
  assert records[0]["accuracy"] > 0.9
  assert record["accuracy"] >= records[0]["accuracy"] - 0.01
  assert quantization.is_qarray(qvars["params"]["Conv_0"]["kernel"])


# --------------------------------------------------------------- shrink

def _with_dead_units(params, layers):
  """Zero the outgoing weights of the odd units of each (layer, next) pair
  so that removing them changes nothing."""
  params = jax.tree.map(np.array, params)
  for _, nxt, axis, group in layers:
    k = params[nxt]["kernel"]
    idx = [slice(None)] * k.ndim
    if group:      # flattened (h, w, c) rows: zero channel c at every position
      rows = k.reshape(-1, group, k.shape[-1])
      rows[:, 1::2, :] = 0
      params[nxt]["kernel"] = rows.reshape(k.shape)
      continue
    idx[axis] = slice(1, None, 2)
    k[tuple(idx)] = 0
  # the kept (even) units get the larger incoming weights, so they score higher
  return params


def test_shrinking_units_that_carry_nothing_leaves_the_mlp_unchanged():
  model = models.create("mlp", num_classes=5, widths=(8, 6))
  x = RNG.normal(size=(7, 12)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  params = _with_dead_units(params, [("Dense_0", "Dense_1", 0, 0),
                                     ("Dense_1", "Dense_2", 0, 0)])
  small, small_vars = shrink.shrink(model, {"params": params}, 0.5)
  assert small.widths == (4, 3)
  assert small_vars["params"]["Dense_0"]["kernel"].shape == (12, 4)
  np.testing.assert_allclose(small.apply(small_vars, x),
                             model.apply({"params": params}, x), rtol=1e-5,
                             atol=1e-6)


def test_shrinking_filters_that_carry_nothing_leaves_the_cnn_unchanged():
  model = models.create("cnn", num_classes=3, features=(4, 6), hidden=8)
  params = model.init(jax.random.key(0), IMAGES[:1])["params"]
  params = _with_dead_units(params, [("Conv_0", "Conv_1", 2, 0),
                                     ("Conv_1", "Dense_0", 0, 6),
                                     ("Dense_0", "Dense_1", 0, 0)])
  small, small_vars = shrink.shrink(model, {"params": params}, 0.5)
  assert (small.features, small.hidden) == ((2, 3), 4)
  np.testing.assert_allclose(small.apply(small_vars, IMAGES[:5]),
                             model.apply({"params": params}, IMAGES[:5]),
                             rtol=1e-5, atol=1e-5)
  assert shrink.flops(small, small_vars, IMAGES[:1]) < 0.5 * shrink.flops(
      model, {"params": params}, IMAGES[:1])


def test_shrink_stage_halves_the_mlp_and_keeps_its_accuracy(digits):
  model = models.create("mlp", num_classes=10, widths=(64, 32))
  result = train.fit(model, "adam(3e-3)", digits, epochs=10, batch_size=64,
                     progress=False)
  small, _, records = compress.run(
      model, core.variables_of(result.state), digits,
      [{"stage": "shrink", "fraction": 0.5, "epochs": 5, "min_steps": 500}],
      settings=compress.Settings(latency=False))
  record = records[-1]
  assert small.widths == (32, 16)
  assert record["model"]["kwargs"]["widths"] == [32, 16]
  assert record["parameters"] < 0.55 * record["parameters_before"]
  assert record["flops"] < 0.55 * record["flops_before"]
  assert record["accuracy"] >= records[0]["accuracy"] - 0.02


@pytest.mark.parametrize("model,message", [
    (models.create("resnet18", num_classes=10, width=4), "got resnet18"),
    (zoo.ExamplesCNN(), "got ExamplesCNN")])
def test_shrink_refuses_models_whose_units_it_cannot_remove(digits, model,
                                                            message):
  with pytest.raises(ConfigError, match=f"stage 1 \\(shrink\\): shrink removes "
                                        f"units of jaxaccel's mlp, cnn and gpt "
                                        f"models and of NNX and plain-function "
                                        f"models; {message}"):
    compress.run(model, {"params": {}}, digits, [{"stage": "shrink"}])


def test_shrink_finds_the_mlp_blocks_of_a_transformer():
  model = zoo.ViT(rngs=nnx.Rngs(0))
  params, state = models.adapt(model).init(jax.random.key(0), IMAGES[:1])
  variables = {"params": params, **state}
  layers = shrink.hidden_layers(model, variables, IMAGES[:1])
  # the two MLP blocks; attention's kernels are 3-D and its output is read
  # by the residual sum, so nothing else qualifies
  assert layers == [(f"blocks/{i}/mlp_in/kernel", f"blocks/{i}/mlp_in/bias",
                     f"blocks/{i}/mlp_out/kernel") for i in (0, 1)]
  # hidden units whose outgoing weights are zero carry nothing: removing
  # them leaves the logits as they were
  params = jax.tree.map(np.array, params)
  for block in params["blocks"].values():
    block["mlp_out"]["kernel"][1::2] = 0
    block["mlp_in"]["kernel"][:, ::2] *= 3      # the kept units score higher
  variables = {"params": params, **state}
  same, small = shrink.shrink(model, variables, 0.5, sample=IMAGES[:1])
  assert same is model
  block = small["params"]["blocks"][0]
  assert block["mlp_in"]["kernel"].shape == (32, 32)
  assert block["mlp_in"]["bias"].shape == (32,)
  assert block["mlp_out"]["kernel"].shape == (32, 32)
  logits = lambda v: models.adapt(model).logits(v, IMAGES[:8])
  np.testing.assert_allclose(logits(small), logits(variables), rtol=1e-5,
                             atol=1e-5)
  assert shrink.flops(model, small, IMAGES[:1]) < shrink.flops(
      model, variables, IMAGES[:1])



def test_a_transformer_runs_its_linear_layers_int8_and_lists_attention():
  import model_zoo as zoo
  model = zoo.ViT(rngs=nnx.Rngs(0))
  params, state = models.adapt(model).init(jax.random.key(0), IMAGES[:1])
  program = int8.convert(model, {"params": params, **state}, [IMAGES[:16]])
  names = [s.name for s in program.sites]
  assert "blocks/0/attention/query/kernel" in names and "head/kernel" in names
  assert all(n.endswith("kernel") for n in names)
  # scores and the weighted sum of values multiply two activations
  assert program.summary()["float"].count("a product of two activations") >= 2


def test_shrink_finds_the_mlp_of_a_users_nnx_gpt():
  """A causal mask and token ids put literals before the first kernel of a
  GPT's forward pass; shrink still finds its MLP (64 -> 32 units)."""
  model = zoo.NNXGPT(context=8, rngs=nnx.Rngs(0))
  variables = {"params": nnx.state(model, nnx.Param).to_pure_dict()}
  ids = np.arange(8, dtype=np.int32)[None]
  assert shrink.hidden_layers(model, variables, ids) == [
      ("blocks/0/mlp_in/kernel", "blocks/0/mlp_in/bias", "blocks/0/mlp_out/kernel")]
  _, small = shrink.shrink(model, variables, 0.5, sample=ids)
  block = small["params"]["blocks"][0]
  assert block["mlp_in"]["kernel"].shape == (32, 32)
  assert block["mlp_out"]["kernel"].shape == (32, 32)
