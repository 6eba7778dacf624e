import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import models, train
from jaxaccel.compress import int8, pruning, quantization as q, report
from jaxaccel.errors import ConfigError

from conftest import requires_fashion_mnist


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=8) * 0.1, jnp.float32)},
          "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=3) * 0.1, jnp.float32)}}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric", "pow2"])
def test_round_trip_error_is_at_most_half_a_step(bits, granularity, scheme):
  params = make_params()
  qp = q.quantize(params, bits=bits, granularity=granularity, scheme=scheme)
  back = q.dequantize(qp)
  for w, qa, b in zip(jax.tree.leaves(params),
                      jax.tree.leaves(qp, is_leaf=q.is_qarray),
                      jax.tree.leaves(back)):
    assert isinstance(qa, q.QArray) and qa.bits == bits
    assert np.all(np.abs(np.asarray(w - b)) <= np.asarray(qa.scale) / 2 + 1e-6)
    if granularity == "channel" and w.ndim == 2:
      assert qa.scale.shape == (1, w.shape[1])
    else:
      assert qa.scale.size == 1
    if scheme == "pow2":
      exponent = np.log2(np.asarray(qa.scale))
      np.testing.assert_array_equal(exponent, np.round(exponent))
    v = np.asarray(qa.values, np.int32)
    if scheme == "asymmetric":
      assert v.min() >= 0 and v.max() <= 2 ** bits - 1
    else:
      assert np.abs(v).max() <= 2 ** (bits - 1) - 1


def test_symmetric_values_and_pow2_rule_exactly():
  w = jnp.array([[0.5, -1.0], [0.0, 0.3]])
  qa = q.quantize_array(w, bits=8, granularity="tensor")
  np.testing.assert_array_equal(qa.values, np.round(np.asarray(w) / (1.0 / 127)))
  p2 = q.quantize_array(w, bits=4, granularity="tensor", scheme="pow2")
  # w_q = round(w / 2^p) * 2^p with 2^p = 1/4: the smallest power covering 1.0/7
  assert float(p2.scale.ravel()[0]) == 0.25
  np.testing.assert_array_equal(p2.dequantize(), [[0.5, -1.0], [0.0, 0.25]])


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric", "pow2"])
def test_pruned_zeros_stay_zero(scheme):
  pruned, masks = pruning.prune(make_params(), 0.7)
  back = q.dequantize(q.quantize(pruned, bits=4, scheme=scheme))
  for b, m in zip(jax.tree.leaves(back), jax.tree.leaves(masks)):
    assert bool(jnp.all(jnp.where(m, True, b == 0)))


def stored_bytes(tree):
  return report.size_bytes(tree, sparse=False)


def test_sizes_count_the_real_storage():
  params = make_params()
  dense = stored_bytes(params)
  assert dense == (12 * 8 + 8 + 8 * 3 + 3) * 4
  q8 = q.quantize(params, bits=8, granularity="tensor")
  assert stored_bytes(q8) == (12 * 8 + 8 + 8 * 3 + 3) + 4 * 4
  q4 = q.quantize(params, bits=4, granularity="channel")
  assert stored_bytes(q4) == (48 + 4 + 12 + 2) + (8 + 1 + 3 + 1) * 4
  qa = q.quantize(params, bits=8, scheme="asymmetric", granularity="tensor")
  assert stored_bytes(qa) == (12 * 8 + 8 + 8 * 3 + 3) + 4 * 4 + 4


def test_int4_is_stored_two_values_to_a_byte(tmp_path):
  q4 = q.quantize(make_params(), bits=4, granularity="channel")
  report.save_compressed(tmp_path, q4)
  with np.load(tmp_path / "params.npz") as z:
    values = z["Dense_0/kernel/values"]
  kernel = q4["Dense_0"]["kernel"]
  assert values.dtype == np.uint8 and values.size == kernel.values.size // 2
  np.testing.assert_array_equal(q.unpack_int4(values, kernel.shape),
                                kernel.values)


def test_int4_packing_round_trips():
  qa = q.quantize_array(make_params()["Dense_0"]["kernel"], bits=4)
  packed = q.pack_int4(qa.values)
  assert packed.dtype == jnp.uint8 and packed.size == qa.values.size // 2
  assert packed.size == qa.nbytes - qa.scale.size * 4
  np.testing.assert_array_equal(q.unpack_int4(packed, qa.shape), qa.values)


def test_qarray_is_a_pytree_through_jit():
  qp = q.quantize(make_params(), bits=8)
  out = jax.jit(q.dequantize)(qp)
  jax.tree.map(np.testing.assert_array_equal, out, q.dequantize(qp))


@pytest.fixture
def trained_digits_mlp(digits):
  model = models.create("mlp", num_classes=10, widths=(32,))
  result = train.fit(model, optax.adam(3e-3), digits, epochs=3, batch_size=64,
                     progress=False)
  return model, jax.tree.map(jnp.array, result.state.params)


def test_int8_program_of_the_mlp_runs_integer_products(digits, trained_digits_mlp):
  model, params = trained_digits_mlp
  x = jnp.asarray(digits.x_test)
  program = int8.convert(model, {"params": params},
                         int8.calibration_batches(digits.x_train, examples=512,
                                                  batch_size=256))
  logits = program(x)
  float_logits = model.apply({"params": params}, x)
  # within the quantization error of the float model, the same answers
  err = float(jnp.abs(logits - float_logits).max())
  assert 0 < err < 0.05 * float(jnp.abs(float_logits).max()), err
  agree = float(jnp.mean(logits.argmax(-1) == float_logits.argmax(-1)))
  assert agree >= 0.98
  # the matmuls really are int8 x int8 -> int32
  jaxpr = str(jax.make_jaxpr(program)(x[:2]))
  assert jaxpr.count("i32[2,32] = dot_general") == 1
  assert jaxpr.count("i32[2,10] = dot_general") == 1 and "i8[64,32]" in jaxpr
  # the program holds the int8 values: editing the float weights changes nothing
  params["Dense_0"]["kernel"] = jnp.zeros_like(params["Dense_0"]["kernel"])
  np.testing.assert_array_equal(program(x), logits)


def test_quantization_aware_training_trains_through_rounding(digits):
  model = models.create("mlp", num_classes=10, widths=(32,))
  qat = q.QuantAwareModel(model, bits=4, granularity="channel")
  result = train.fit(qat, optax.adam(3e-3), digits, epochs=3, batch_size=64,
                     progress=False)
  params = result.state.params
  acc_qat = train.evaluate(qat, result.state, digits.x_test, digits.y_test)["accuracy"]
  # the QAT forward pass is exactly the int4-quantized model
  deq = q.dequantize(q.quantize(params, bits=4, granularity="channel"))
  acc_int4 = train.evaluate(model, {"params": deq}, digits.x_test,
                            digits.y_test)["accuracy"]
  assert acc_int4 == acc_qat and acc_qat > 0.8
  # straight-through gradient: identity inside the range
  g = jax.grad(lambda w: jnp.sum(q.fake_quantize(w, bits=4) * 3.0))(
      make_params()["Dense_0"]["kernel"])
  np.testing.assert_allclose(g, 3.0, rtol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: q.quantize(make_params(), bits=3), "unsupported bit width 3"),
    (lambda: q.quantize(make_params(), bits=16), "unsupported bit width 16"),
    (lambda: q.quantize(make_params(), granularity="row"), "unknown granularity 'row'"),
    (lambda: q.quantize(make_params(), scheme="log"), "unknown quantization scheme 'log'"),
    (lambda: q.quantize({"w": jnp.ones((2, 2)), "n": jnp.arange(3)}),
     "cannot quantize leaf n: it holds int32"),
    (lambda: q.fake_quantize(jnp.ones(3), scheme="asymmetric"), "symmetric and pow2"),
])
def test_bad_quantization_arguments(call, message):
  with pytest.raises(ConfigError, match=message):
    call()


@pytest.mark.slow
@pytest.mark.xdist_group("fashion_lenet")   # one worker trains it once
@requires_fashion_mnist
def test_fashion_mnist_int8_ptq_within_a_third_of_a_point(fashion_lenet):
  """LeNet-300-100: int8 post-training quantization loses <= 0.3 points and
  is stored ~4x smaller."""
  model, ds, trained = fashion_lenet
  params = trained.params
  before = train.evaluate(model, trained, ds.x_test, ds.y_test)["accuracy"]
  program = int8.convert(model, {"params": params},
                         int8.calibration_batches(ds.x_train))
  logits = np.concatenate([program(ds.x_test[i:i + 2000])
                           for i in range(0, len(ds.x_test), 2000)])
  after = float(np.mean(logits.argmax(-1) == ds.y_test))
  qp = q.quantize(params, bits=8, granularity="channel")
  assert after >= before - 0.003, (before, after)
  # one float32 scale per output channel: 3.98x rather than 4x
  assert stored_bytes(params) / stored_bytes(qp) > 3.95
