import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jaxaccel import models, train
from jaxaccel.compress import pruning
from jaxaccel.errors import ConfigError

from conftest import requires_fashion_mnist


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=6), jnp.float32)},
          "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(6, 4)) * 10,
                                            jnp.float32),
                      "bias": jnp.zeros(4, jnp.float32)}}


def zeros(x):
  return int(jnp.sum(x == 0))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.99])
def test_layer_scope_prunes_exactly_the_smallest(sparsity):
  params = make_params()
  pruned, masks = pruning.prune(params, sparsity)
  for name in ("Dense_0", "Dense_1"):
    w, p = params[name]["kernel"], pruned[name]["kernel"]
    k = min(round(sparsity * w.size), w.size - 1)
    assert zeros(p) == k
    # the pruned ones are exactly the k smallest magnitudes
    order = np.argsort(np.abs(np.asarray(w)).ravel(), kind="stable")
    np.testing.assert_array_equal(np.asarray(p).ravel()[order[:k]], 0.0)
    np.testing.assert_array_equal(np.asarray(p).ravel()[order[k:]],
                                  np.asarray(w).ravel()[order[k:]])
    np.testing.assert_array_equal(pruned[name]["bias"], params[name]["bias"])
    assert bool(masks[name]["bias"].all())


@settings(max_examples=5, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 7),
       sparsity=st.floats(0.0, 0.999), scope=st.sampled_from(["layer", "global"]),
       seed=st.integers(0, 2 ** 16))
def test_exact_sparsity_for_any_shape(rows, cols, sparsity, scope, seed):
  rng = np.random.default_rng(seed)
  # few distinct values: many ties
  params = {"a": jnp.asarray(rng.integers(-3, 4, (rows, cols)), jnp.float32),
            "b": jnp.asarray(rng.integers(-3, 4, (cols, 3)), jnp.float32)}
  pruned, masks = pruning.prune(params, sparsity, scope=scope)
  kept = [int(m.sum()) for m in jax.tree.leaves(masks)]
  assert min(kept) >= 1
  n = rows * cols + cols * 3
  if scope == "layer":
    assert kept == [x.size - min(round(np.float32(sparsity) * x.size), x.size - 1)
                    for x in jax.tree.leaves(params)]
  else:
    assert n - sum(kept) == min(round(np.float32(sparsity) * n), n - 2)
  again, _ = pruning.prune(params, sparsity, scope=scope)
  jax.tree.map(np.testing.assert_array_equal, pruned, again)


def test_ties_are_broken_by_position_and_each_layer_keeps_one():
  params = {"w": jnp.ones((2, 3)), "v": jnp.zeros((3, 2))}
  pruned, masks = pruning.prune(params, 0.5)
  np.testing.assert_array_equal(masks["w"], [[False, False, False],
                                             [True, True, True]])
  pruned, masks = pruning.prune(params, 0.99)
  assert int(masks["w"].sum()) == 1 and bool(masks["w"][1, 2])
  assert int(masks["v"].sum()) == 1
  pruned, masks = pruning.prune(params, 0.99, scope="global")
  assert int(masks["w"].sum()) == 1 and int(masks["v"].sum()) == 1


def test_global_scope_uses_one_threshold_over_normalized_scores():
  params = make_params()
  pruned, masks = pruning.prune(params, 0.5, scope="global")
  n0, n1 = params["Dense_0"]["kernel"], params["Dense_1"]["kernel"]
  assert zeros(pruned["Dense_0"]["kernel"]) + zeros(
      pruned["Dense_1"]["kernel"]) == round(0.5 * (n0.size + n1.size))
  # the x10 scale of Dense_1 is normalized away: both layers lose weights
  s0 = np.abs(np.asarray(n0)) / np.linalg.norm(np.asarray(n0))
  s1 = np.abs(np.asarray(n1)) / np.linalg.norm(np.asarray(n1))
  joined = np.concatenate([s0.ravel(), s1.ravel()])
  threshold = np.sort(joined)[round(0.5 * joined.size) - 1]
  np.testing.assert_array_equal(np.asarray(masks["Dense_0"]["kernel"]),
                                s0 > threshold)
  np.testing.assert_array_equal(np.asarray(masks["Dense_1"]["kernel"]),
                                s1 > threshold)


def test_n_m_pattern_keeps_n_of_each_group_along_inputs():
  params = make_params()
  pruned, masks = pruning.prune(params, None, pattern="2:4",
                                include=lambda name, x: x.shape[0] % 4 == 0)
  np.testing.assert_array_equal(masks["Dense_1"]["kernel"], True)
  m = np.asarray(masks["Dense_0"]["kernel"]).reshape(2, 4, 6)
  np.testing.assert_array_equal(m.sum(1), 2)
  w = np.abs(np.asarray(params["Dense_0"]["kernel"])).reshape(2, 4, 6)
  kept_min = np.where(m, w, np.inf).min(1)
  pruned_max = np.where(m, -np.inf, w).max(1)
  assert (kept_min >= pruned_max).all()
  # Dense_1 has 6 inputs: not divisible by 4
  with pytest.raises(ConfigError, match="layer Dense_1/kernel has 6 inputs"):
    pruning.prune(make_params(), None, pattern="2:4",
                  include=lambda name, x: True)


def test_channel_pattern_removes_whole_output_channels():
  params = make_params()
  pruned, masks = pruning.prune(params, 0.5, pattern="channel")
  m = np.asarray(masks["Dense_0"]["kernel"])
  assert (m.all(0) | ~m.any(0)).all()          # each column all kept or all pruned
  assert int((~m.any(0)).sum()) == 3
  col = np.abs(np.asarray(params["Dense_0"]["kernel"])).sum(0)
  np.testing.assert_array_equal(~m.any(0), col <= np.sort(col)[2])


def test_gradient_scores(key):
  params = make_params()
  x = jax.random.normal(key, (4, 16, 8))
  loss = lambda p, xb: jnp.mean((jnp.tanh(xb @ p["Dense_0"]["kernel"]
                                          + p["Dense_0"]["bias"])
                                 @ p["Dense_1"]["kernel"]) ** 2)
  stats = pruning.gradient_statistics(loss, params, list(x))
  grads = [jax.grad(loss)(params, xb) for xb in x]
  want_sq = sum(np.asarray(g["Dense_0"]["kernel"]) ** 2 for g in grads)
  np.testing.assert_allclose(stats.squares["Dense_0"]["kernel"], want_sq,
                             rtol=1e-5)
  _, masks = pruning.prune(params, 0.5, method="saliency", grads=stats)
  order = np.argsort(want_sq.ravel(), kind="stable")
  np.testing.assert_array_equal(
      np.asarray(masks["Dense_0"]["kernel"]).ravel()[order[:24]], False)
  want_taylor = np.abs(np.asarray(params["Dense_0"]["kernel"])
                       * sum(np.asarray(g["Dense_0"]["kernel"]) for g in grads))
  scores = pruning.compute_scores(params, "taylor", grads=stats)
  np.testing.assert_allclose(scores["Dense_0"]["kernel"], want_taylor, rtol=1e-4)
  p1, _ = pruning.prune(params, 0.5, method="random", key=key)
  p2, _ = pruning.prune(params, 0.5, method="random", key=key)
  assert zeros(p1["Dense_0"]["kernel"]) == 24
  np.testing.assert_array_equal(p1["Dense_0"]["kernel"], p2["Dense_0"]["kernel"])


def test_cubic_schedule_matches_the_formula():
  s = [float(pruning.cubic_sparsity(t, initial_sparsity=0.1, target_sparsity=0.9,
                                    begin_step=10, end_step=50, every=10))
       for t in (0, 10, 15, 20, 40, 50, 90)]
  f = lambda t: 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 40) ** 3
  np.testing.assert_allclose(s, [0.0, f(10), f(10), f(20), f(40), 0.9, 0.9],
                             rtol=1e-6)


def test_gradual_pruning_keeps_pruned_weights_zero_through_adam():
  params = make_params()
  tx = optax.chain(optax.adam(0.05),
                   pruning.prune_gradually(0.75, begin_step=5, end_step=25,
                                           every=5))
  state = tx.init(params)
  target = jax.tree.map(lambda p: p + 3.0, params)    # pulls every weight away from 0
  loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                       zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  ever_pruned = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params)
  history = []
  for t in range(60):
    params, state = step(params, state)
    masks = state[1].masks
    ever_pruned = jax.tree.map(lambda e, m: e | ~m, ever_pruned, masks)
    # once pruned, a weight is zero in every later step
    for p, e in zip(jax.tree.leaves(params), jax.tree.leaves(ever_pruned)):
      assert bool(jnp.all(jnp.where(e, p == 0, True)))
    history.append(zeros(params["Dense_0"]["kernel"]))
  assert history[3] == 0                                  # before begin_step
  assert history[5] == round(float(pruning.cubic_sparsity(
      5, initial_sparsity=0.0, target_sparsity=0.75, begin_step=5,
      end_step=25, every=5)) * 48)
  assert history[-1] == 36 and zeros(params["Dense_1"]["kernel"]) == 18
  assert int(state[1].count) == 60
  # the biases were never pruned and moved toward their targets
  assert zeros(params["Dense_1"]["bias"]) == 0


def test_keep_masks_fine_tunes_only_the_kept_weights():
  params, masks = pruning.prune(make_params(), 0.5)
  tx = optax.chain(optax.adam(0.1), pruning.keep_masks(masks))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
  for p, q, m in zip(jax.tree.leaves(params), jax.tree.leaves(new),
                     jax.tree.leaves(masks)):
    assert bool(jnp.all(jnp.where(m, q != p, q == 0)))


def test_sparsity_report():
  pruned, _ = pruning.prune(make_params(), 0.5)
  report = pruning.sparsity_report(pruned)
  assert [l["name"] for l in report["layers"]] == ["Dense_0/kernel",
                                                   "Dense_1/kernel"]
  assert [l["zeros"] for l in report["layers"]] == [24, 12]
  assert report["sparsity"] == 36 / 72
  assert "Dense_0/kernel" in pruning.format_sparsity_report(report)


@pytest.mark.parametrize("call, message", [
    (lambda: pruning.prune(make_params(), 1.0), r"sparsity must lie in \[0, 1\).*got 1.0"),
    (lambda: pruning.prune(make_params(), -0.1), r"got -0.1"),
    (lambda: pruning.prune(make_params(), None, pattern="4:4"), "N=4 of every M=4"),
    (lambda: pruning.prune(make_params(), None, pattern="3:2"), "N=3 of every M=2"),
    (lambda: pruning.prune(make_params(), 0.3, pattern="2:4"), "prunes 0.5"),
    (lambda: pruning.prune(make_params(), 0.5, pattern="blocks"), "unknown pruning pattern 'blocks'"),
    (lambda: pruning.prune(make_params(), 0.5, method="l1"), "unknown pruning method 'l1'"),
    (lambda: pruning.prune(make_params(), 0.5, scope="net"), "unknown pruning scope 'net'"),
    (lambda: pruning.prune(make_params(), 0.5, method="saliency"), "needs gradients"),
    (lambda: pruning.prune(make_params(), 0.5, method="random"), "needs a PRNG key"),
    (lambda: pruning.prune({"b": jnp.ones(3)}, 0.5), "nothing to prune"),
    (lambda: pruning.prune_gradually(1.2, begin_step=0, end_step=10), r"target sparsity must lie in \[0, 1\)"),
    (lambda: pruning.prune_gradually(0.5, begin_step=10, end_step=0), "begin_step=10, end_step=0"),
    (lambda: pruning.prune_gradually(0.5, begin_step=0, end_step=10, method="saliency"), "not 'saliency'"),
])
def test_bad_pruning_arguments(call, message):
  with pytest.raises(ConfigError, match=message):
    call()


def test_prune_then_fine_tune_with_masks_in_fit(digits):
  model = models.create("mlp", num_classes=10, widths=(64,))
  result = train.fit(model, optax.adam(3e-3), digits, epochs=4, batch_size=64,
                     progress=False)
  acc = train.evaluate(model, result.state, digits.x_test, digits.y_test)["accuracy"]
  pruned, masks = pruning.prune(result.state.params, 0.8)
  one_shot = train.evaluate(model, {"params": pruned}, digits.x_test,
                            digits.y_test)["accuracy"]
  tx = optax.chain(optax.adam(3e-3), pruning.keep_masks(masks))
  state = result.state._replace(params=pruned, opt_state=tx.init(pruned))
  tuned = train.fit(model, tx, digits, epochs=4, batch_size=64, progress=False,
                    state=state)
  after = train.evaluate(model, tuned.state, digits.x_test, digits.y_test)["accuracy"]
  report = pruning.sparsity_report(tuned.state.params)
  assert [round(l["sparsity"], 3) for l in report["layers"]] == [0.8, 0.8]
  assert one_shot < acc - 0.1                 # pruning alone hurts ...
  assert after >= acc - 0.01, (acc, after)    # ... fine-tuning recovers


@pytest.mark.slow
@pytest.mark.xdist_group("fashion_lenet")   # one worker trains it once
@requires_fashion_mnist
def test_fashion_mnist_mlp_pruned_90_percent_within_half_a_point(fashion_lenet):
  """LeNet-300-100: 90% of the weights pruned, <= 0.5 pt loss after fine-tuning."""
  model, ds, trained = fashion_lenet
  before = train.evaluate(model, trained, ds.x_test, ds.y_test)["accuracy"]
  # Gradual global pruning to 90% during the first 40% of fine-tuning, as
  # the prune-90 recipe does (on three dense seeds, ending at half lost
  # 0.71, 0.14, 0.13 pt; at 40% 0.50, 0.02, 0.18; at a third 0.39, -0.04,
  # 0.32, but 3 pt on a 32-unit digits MLP).
  steps = 10 * (60000 // 128)
  tx = optax.chain(optax.adam(optax.cosine_decay_schedule(1e-3, steps)),
                   pruning.prune_gradually(0.9, begin_step=0,
                                           end_step=2 * steps // 5, every=100,
                                           scope="global"))
  state = trained._replace(opt_state=tx.init(trained.params))
  tuned = train.fit(model, tx, ds, epochs=10, batch_size=128, progress=False,
                    state=state)
  after = train.evaluate(model, tuned.state, ds.x_test, ds.y_test)["accuracy"]
  assert pruning.sparsity_report(tuned.state.params)["sparsity"] == pytest.approx(0.9, abs=1e-4)
  # accuracies are counts of 10,000 test images: at most 50 fewer right
  assert round((before - after) * len(ds.y_test)) <= 50, (before, after)


def test_gradual_masks_are_checkpointed_and_resume_exactly(digits, tmp_path):
  model = models.create("mlp", num_classes=10, widths=(32,))
  # one object: a resumed run checks that it is the same transformation
  tx = optax.chain(optax.adam(3e-3), pruning.prune_gradually(
      0.8, begin_step=0, end_step=30, every=10))
  full = train.fit(model, tx, digits, epochs=2, batch_size=64, progress=False,
                   out=tmp_path / "full")
  train.fit(model, tx, digits, epochs=1, batch_size=64, progress=False,
            out=tmp_path / "cut")
  resumed = train.fit(model, tx, digits, epochs=2, batch_size=64,
                      progress=False, out=tmp_path / "cut", resume=True)
  masks = resumed.state.opt_state[1].masks
  assert masks["Dense_0"]["kernel"].dtype == jnp.bool_
  jax.tree.map(np.testing.assert_array_equal, resumed.state.opt_state[1].masks,
               full.state.opt_state[1].masks)
  jax.tree.map(np.testing.assert_array_equal, resumed.state.params,
               full.state.params)
  assert pruning.sparsity_report(full.state.params)["sparsity"] == pytest.approx(
      0.8, abs=1e-3)
