import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jaxaccel import optim
from jaxaccel.errors import ConfigError, SpecError

PARAMS = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.2])}


def grads_at(i):
  return jax.tree.map(lambda p: jnp.sin(p * (i + 1)) * 10.0, PARAMS)


CHAINS = [
    ("sgd(0.1)", optax.sgd(0.1)),
    ("sgd(learning_rate=0.1, momentum=0.9)", optax.sgd(0.1, momentum=0.9)),
    ("sgd(0.1, momentum=0.9, nesterov=True)", optax.sgd(0.1, 0.9, nesterov=True)),
    ("adagrad(0.1)", optax.adagrad(0.1)),
    ("rmsprop(0.01)", optax.rmsprop(0.01)),
    ("adam(1e-3)", optax.adam(1e-3)),
    ("clip_by_global_norm(1.0) | adam(1e-3)",
     optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))),
    ("clip(0.5) | sgd(0.1)", optax.chain(optax.clip(0.5), optax.sgd(0.1))),
    ("adamw(learning_rate=warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10), "
     "weight_decay=1e-4)",
     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10),
                 weight_decay=1e-4)),
    ("sgd(exponential_decay(0.1, 1, 0.9))",
     optax.sgd(optax.exponential_decay(0.1, 1, 0.9))),
    ("add_decayed_weights(1e-4) | sgd(piecewise_constant_schedule(0.1, "
     "{'2': 0.5}))",
     optax.chain(optax.add_decayed_weights(1e-4),
                 optax.sgd(optax.piecewise_constant_schedule(0.1, {2: 0.5})))),
    ("lion(1e-4)", optax.lion(1e-4)),
]


@pytest.mark.parametrize("spec, reference", CHAINS, ids=[c[0] for c in CHAINS])
def test_built_chain_matches_handwritten_optax(spec, reference):
  tx = optim.build(spec)
  p1, p2 = PARAMS, PARAMS
  s1, s2 = tx.init(p1), reference.init(p2)
  for i in range(5):
    u1, s1 = tx.update(grads_at(i), s1, p1)
    u2, s2 = reference.update(grads_at(i), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_three_spellings_are_one_spec(tmp_path):
  text = "clip_by_global_norm(1.0) | adam(learning_rate=0.001)"
  calls = optim.parse(text)
  assert optim.parse(calls) == calls
  assert optim.parse({"chain": calls}) == calls
  toml = tmp_path / "opt.toml"
  toml.write_text('[[chain]]\nname = "clip_by_global_norm"\nargs = [1.0]\n'
                  '[[chain]]\nname = "adam"\nkwargs = {learning_rate = 0.001}\n')
  assert optim.parse(str(toml)) == calls
  assert optim.to_string(calls) == text
  assert optim.parse(optim.to_string(calls)) == calls


@pytest.mark.parametrize("spec, message", [
    ("adma(1e-3)", "unknown function 'adma'.*did you mean 'adam'"),
    ("", "empty optimizer spec"),
    ([], "empty optimizer chain"),
    ("adam(", "cannot parse"),
    ("__import__('os').system('true')", "not allowed"),
    ("optax.adam(1e-3)", "not allowed"),
    ("adam(1e-3).__class__", "not allowed"),
    ("adam(learning_rate=-0.1)", "must be non-negative; got -0.1"),
    ("adam(lr=1e-3)", "bad arguments to adam"),
    ("adam(x)", "'x' is not allowed"),
    ("adam(**{'learning_rate': 1})", r"'\*\*' is not allowed"),
    ("cosine_decay_schedule(0.1, 10)", "is a schedule, not a transformation"),
    ("adam(learning_rate='fast')", "learning_rate must be a number; got 'fast'"),
    ("sgd(0.1, momentum='high')", "momentum must be a number"),
    ("adam(1e-3) | accumulate(0)", "positive whole number of steps; got 0"),
    ("adam(1e-3) | accumulate(2) | accumulate(3)", "may appear once"),
    ("accumulate(2)", "holds only accumulate"),
    ("adam(1e-3) | reduce_on_plateau(2.0)", r"factor must be in \(0, 1\); got 2.0"),
    ("adam(1e-3) | freeze(3)", "a parameter pattern is a string"),
    ("adam(1e-3) | freeze('(')", r"bad parameter pattern '\('"),
    ("adam(1e-3, mask_bias=True)", "bad arguments to adam.*parameters are"),
])
def test_spec_errors(spec, message):
  with pytest.raises(SpecError, match=message):
    optim.build(spec)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=60)
       | st.from_regex(r"[a-z_]{2,12}\([0-9e.\-, =a-z_]{0,20}\)( \| [a-z_]+\(\))?",
                       fullmatch=True))
def test_any_string_gives_a_transformation_or_a_spec_error(text):
  try:
    tx = optim.build(text)
  except SpecError:
    return
  assert isinstance(tx, optax.GradientTransformation)


# ------------------------------------------------ hyperparameters as leaves

def test_learning_rate_is_a_state_leaf_that_changes_without_recompiling():
  tx = optim.build("adam(1e-3)")
  state = tx.init(PARAMS)
  assert float(optim.hyperparams(state)["learning_rate"]) == pytest.approx(1e-3)

  @jax.jit
  def step(params, state, i):
    updates, state = tx.update(jax.tree.map(lambda p: jnp.sin(p * i), params),
                               state, params)
    return optax.apply_updates(params, updates), state

  # Reference: optax.adam at 1e-3 for 3 steps, then at 1e-4 on the same moments.
  ref_p, ref_s = PARAMS, optax.adam(1e-3).init(PARAMS)
  p = PARAMS
  for i in range(6):
    if i == 3:
      state = optim.set_hyperparams(state, learning_rate=1e-4)
    lr = 1e-3 if i < 3 else 1e-4
    g = jax.tree.map(lambda q: jnp.sin(q * i), ref_p)
    u, ref_s = optax.adam(lr).update(g, ref_s, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
    p, state = step(p, state, i)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p, ref_p)
  assert step._cache_size() == 1
  assert float(optim.hyperparams(state)["learning_rate"]) == pytest.approx(1e-4)


def test_scheduled_learning_rate_is_logged_as_used():
  tx = optim.build("sgd(warmup_cosine_decay_schedule(0.0, 0.1, 3, 10))")
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10)
  state = tx.init(PARAMS)
  for i in range(5):
    _, state = tx.update(grads_at(i), state, PARAMS)
    assert float(optim.hyperparams(state)["learning_rate"]) == pytest.approx(
        float(sched(i)))


def test_marked_hyperparameters_and_their_errors():
  tx = optim.build("sgd(0.1, momentum=0.9) | add_decayed_weights(1e-4)",
                   hyperparams=("learning_rate", "momentum"))
  hp = optim.hyperparams(tx.init(PARAMS))
  assert set(hp) == {"learning_rate", "momentum"}
  assert float(hp["momentum"]) == pytest.approx(0.9)
  with pytest.raises(SpecError, match="no hyperparameter 'weight_decay'.*"
                     r"hyperparams=\('weight_decay',\)"):
    optim.set_hyperparams(tx.init(PARAMS), weight_decay=0.0)
  scheduled = optim.build("sgd(linear_schedule(0.1, 0.0, 10))")
  with pytest.raises(SpecError, match="follows a schedule"):
    optim.set_hyperparams(scheduled.init(PARAMS), learning_rate=0.5)


# ---------------------------------------------------------------- schedules

def test_exponential_decay_and_plot_schedule_values():
  sched = optim.schedule("exponential_decay(0.1, 1, 0.9)")
  for t in (0, 1, 5, 20):
    assert float(sched(t)) == pytest.approx(0.1 * 0.9 ** t, rel=1e-6)
  ax = optim.plot_schedule("exponential_decay(0.1, 1, 0.9)",
                           "cosine_onecycle_schedule(50, 0.1)", steps=50)
  decay, onecycle = ax.get_lines()
  np.testing.assert_allclose(decay.get_ydata(), 0.1 * 0.9 ** np.arange(50),
                             rtol=1e-5)
  assert onecycle.get_ydata().max() == pytest.approx(0.1, rel=1e-3)
  with pytest.raises(SpecError, match="a schedule spec is one call"):
    optim.schedule("adam(1e-3)")


# ----------------------------------------------- masks, groups, regularizers

NET = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]),
                   "bias": jnp.array([0.1, -0.2])},
       "Dense_1": {"kernel": jnp.array([[2.0], [-1.0]]), "bias": jnp.array([0.3])}}
NET_GRADS = jax.tree.map(lambda p: jnp.cos(p) * 0.5, NET)


def test_path_mask_selects_by_pattern_and_refuses_empty_matches():
  assert optim.path_mask("kernel")(NET) == {
      "Dense_0": {"kernel": True, "bias": False},
      "Dense_1": {"kernel": True, "bias": False}}
  assert optim.path_mask("!Dense_0")(NET) == {
      "Dense_0": {"kernel": False, "bias": False},
      "Dense_1": {"kernel": True, "bias": True}}
  with pytest.raises(SpecError, match="'norm' matches no parameter.*"
                     "Dense_0/bias"):
    optim.build("adamw(1e-3, mask='norm')").init(NET)
  with pytest.raises(SpecError, match="excludes every parameter"):
    optim.build("freeze('!Dense')").init(NET)


def test_l1_l2_and_decoupled_decay_with_masks():
  kernels = lambda p: jax.tree.map(lambda _: False, p) | {
      k: {"kernel": True, "bias": False} for k in p}
  cases = [
      ("add_l1(0.01, mask='kernel')",
       jax.tree_util.tree_map_with_path(
           lambda path, g, p: g + 0.01 * jnp.sign(p)
           if optim.param_path(path).endswith("kernel") else g,
           NET_GRADS, NET)),
      ("add_decayed_weights(0.01, mask='!bias')",
       jax.tree_util.tree_map_with_path(
           lambda path, g, p: g if optim.param_path(path).endswith("bias")
           else g + 0.01 * p, NET_GRADS, NET)),
  ]
  for spec, expected in cases:
    tx = optim.build(spec)
    updates, _ = tx.update(NET_GRADS, tx.init(NET), NET)
    jax.tree.map(np.testing.assert_array_equal, updates, expected)
  # Decoupled decay with a mask equals optax's adamw given the same mask.
  tx = optim.build("adamw(1e-2, weight_decay=0.1, mask='kernel')")
  ref = optax.adamw(1e-2, weight_decay=0.1, mask=kernels)
  s1, s2 = tx.init(NET), ref.init(NET)
  for _ in range(3):
    u1, s1 = tx.update(NET_GRADS, s1, NET)
    u2, s2 = ref.update(NET_GRADS, s2, NET)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_freeze_and_scale_group_act_on_their_group_only():
  plain = optim.build("sgd(0.1)")
  base, _ = plain.update(NET_GRADS, plain.init(NET), NET)
  tx = optim.build("sgd(0.1) | scale_group('Dense_1', 10.0) | freeze('Dense_0/bias')")
  updates, _ = tx.update(NET_GRADS, tx.init(NET), NET)
  np.testing.assert_array_equal(updates["Dense_0"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["Dense_0"]["kernel"],
                                base["Dense_0"]["kernel"])
  jax.tree.map(lambda u, b: np.testing.assert_allclose(u, 10 * b, rtol=1e-6),
               updates["Dense_1"], base["Dense_1"])


def test_param_groups_equal_separate_optimizers_per_group():
  tx = optim.param_groups({"Dense_1": "adam(1e-2)"}, default="sgd(0.1)")
  s = tx.init(NET)
  u, s = tx.update(NET_GRADS, s, NET)
  head, _ = optax.adam(1e-2).update(NET_GRADS["Dense_1"],
                                    optax.adam(1e-2).init(NET["Dense_1"]))
  body, _ = optax.sgd(0.1).update(NET_GRADS["Dense_0"],
                                  optax.sgd(0.1).init(NET["Dense_0"]))
  jax.tree.map(np.testing.assert_array_equal, u, {"Dense_0": body, "Dense_1": head})
  with pytest.raises(SpecError, match="'Dense_9' matches no parameter"):
    optim.param_groups({"Dense_9": "adam(1e-2)"}, default="sgd(0.1)").init(NET)


# ------------------------------------------------------------- accumulation

def test_accumulation_equals_one_large_step_with_one_extra_buffer():
  tx = optim.build("sgd(0.1) | accumulate(4)")
  state, params = tx.init(NET), NET
  micro = [jax.tree.map(lambda g, i=i: g * (i + 1), NET_GRADS) for i in range(4)]
  for i, g in enumerate(micro):
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    if i < 3:   # nothing moves until the 4th micro-batch
      jax.tree.map(np.testing.assert_array_equal, params, NET)
  mean = jax.tree.map(lambda *g: sum(g) / 4, *micro)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, NET, mean)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               params, expected)
  # Memory: accumulating adam holds adam's state plus one gradient buffer.
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  extra = (nbytes(optim.build("adam(1e-3) | accumulate(4)").init(NET))
           - nbytes(optim.build("adam(1e-3)").init(NET)))
  assert nbytes(NET) <= extra <= nbytes(NET) + 64


# --------------------------------------------------------------- plateaus

def test_reduce_on_plateau_scales_after_patience_epochs():
  tx = optim.build("sgd(1.0) | reduce_on_plateau(0.5, patience=2)")
  state = tx.init(NET)
  scales = []
  for value in [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.85]:
    state = optim.observe_plateau(state, value)
    scales.append(float(optim.hyperparams(state)["lr_scale"]))
  assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
  updates, _ = tx.update(NET_GRADS, state, NET)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.25 * g, rtol=1e-6),
               updates, NET_GRADS)


def test_pattern_errors_name_what_failed():
  with pytest.raises(SpecError, match="'!biass' matches no parameter"):
    optim.path_mask("!biass")(NET)
  with pytest.raises(SpecError, match="bad parameter pattern '\\['"):
    optim.param_groups({"[": "adam(1e-2)"}, default="sgd(0.1)")
  tx = optim.param_groups({"!Dense_0": "sgd(0.5)"}, default="sgd(0.1)")
  updates, _ = tx.update(NET_GRADS, tx.init(NET), NET)
  np.testing.assert_allclose(updates["Dense_1"]["kernel"],
                             -0.5 * NET_GRADS["Dense_1"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"],
                             -0.1 * NET_GRADS["Dense_0"]["kernel"], rtol=1e-6)


def test_a_plot_without_matplotlib_names_the_extra(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)   # not installed
  with pytest.raises(ConfigError, match=r"this needs matplotlib, which is "
                     r"optional: pip install 'jaxaccel\[plots\]'"):
    optim.plot_schedule("constant_schedule(1e-3)", steps=10)
