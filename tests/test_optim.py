import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jaxaccel import optim
from jaxaccel.errors import SpecError

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
