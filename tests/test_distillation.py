import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import core, data, models, train
from jaxaccel.compress import distillation as d
from jaxaccel.errors import ConfigError


def reference_loss(s, t, y, temperature, alpha):
  """The formula written out in numpy."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p, q = softmax(t / temperature), softmax(s / temperature)
  kl = (p * (np.log(p) - np.log(q))).sum(-1)
  ce = -np.log(softmax(s)[np.arange(len(y)), y])
  return float(np.mean(alpha * temperature ** 2 * kl + (1 - alpha) * ce))


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (4.0, 0.9),
                                                (2.0, 0.0), (8.0, 1.0)])
def test_loss_is_the_formula(key, temperature, alpha):
  k1, k2 = jax.random.split(key)
  s = jax.random.normal(k1, (16, 5)) * 3
  t = jax.random.normal(k2, (16, 5)) * 3
  y = jnp.arange(16) % 5
  got = d.distillation_loss(s, t, y, temperature=temperature, alpha=alpha)
  np.testing.assert_allclose(got, reference_loss(s, t, y, temperature, alpha),
                             rtol=1e-5)


def test_teacher_gets_no_gradient_and_several_are_averaged(key):
  s = jax.random.normal(key, (4, 3))
  t1, t2 = s * 2, -s
  y = jnp.array([0, 1, 2, 0])
  g_t = jax.grad(lambda t: d.distillation_loss(s, t, y, temperature=2.0,
                                               alpha=0.7))(t1)
  np.testing.assert_array_equal(g_t, 0.0)
  both = d.distillation_loss(s, [t1, t2], y, temperature=2.0, alpha=1.0)
  p = (jax.nn.softmax(t1 / 2) + jax.nn.softmax(t2 / 2)) / 2
  kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(s / 2)), -1).mean() * 4
  np.testing.assert_allclose(both, kl, rtol=1e-5)
  # the student's gradient at alpha=1 vanishes when it equals the teacher
  g_s = jax.grad(lambda z: d.distillation_loss(z, t1, y, temperature=2.0,
                                               alpha=1.0))(t1)
  np.testing.assert_allclose(g_s, 0.0, atol=1e-6)


@pytest.fixture(scope="module")
def digits_teacher(digits):
  """A 64-unit MLP trained 4 epochs on digits, and its variables."""
  teacher = models.create("mlp", num_classes=10, widths=(64,))
  t = train.fit(teacher, optax.adam(3e-3), digits, epochs=4, batch_size=64,
                progress=False)
  return teacher, core.variables_of(t.state)


def test_distill_through_fit_logs_agreement_and_follows_the_teacher(
    digits, digits_teacher):
  teacher, tv = digits_teacher
  student = models.create("mlp", num_classes=10, widths=(16,))
  r = d.distill(student, [(teacher, tv)], optax.adam(1e-2), digits, epochs=6,
                batch_size=64, progress=False, temperature=4.0, alpha=1.0)
  agree = [h["train_agreement"] for h in r.history]
  assert agree[-1] > agree[0] + 0.3 and agree[-1] > 0.9
  sv = core.variables_of(r.state)
  test_agree = d.agreement(student, sv, teacher, tv, digits.x_test)
  assert test_agree > 0.9
  # alpha=1: labels are never used; training on shuffled labels changes nothing
  shuffled = dataclasses.replace(digits, y_train=np.roll(digits.y_train, 1))
  r2 = d.distill(student, [(teacher, tv)], optax.adam(1e-2), shuffled,
                 epochs=6, batch_size=64, progress=False, temperature=4.0,
                 alpha=1.0)
  jax.tree.map(np.testing.assert_array_equal, r2.state.params, r.state.params)


@pytest.mark.parametrize("call, message", [
    (lambda: d.distillation_loss(jnp.ones((1, 2)), jnp.ones((1, 2)),
                                 jnp.zeros(1, int), temperature=0.0, alpha=0.5),
     "temperature must be positive; got 0.0"),
    (lambda: d.make_distillation_loss(alpha=1.5), r"must lie in \[0, 1\]; got 1.5"),
    (lambda: d.distill(models.create("mlp", num_classes=5), [(models.create(
        "mlp", num_classes=10), {})], optax.sgd(0.1), data.load("digits"),
        epochs=1),
     "student has 5 output classes but the teacher has 10"),
    (lambda: d.distill(models.create("mlp", num_classes=5), [], optax.sgd(0.1),
                       None, epochs=1), "at least one"),
    (lambda: d.check_options(1.0, 0.9, mixup=1.0),
     r"mixes the inputs but not their labels.*use alpha=1.0 \(got alpha=0.9\)"),
    (lambda: d.check_options(1.0, 1.0, mixup=0.0),
     "Beta concentration and must be positive; got 0.0"),
])
def test_bad_distillation_arguments(call, message):
  with pytest.raises(ConfigError, match=message):
    call()


def test_several_teachers_through_fit(digits):
  teachers = []
  for seed in (0, 1):
    m = models.create("mlp", num_classes=10, widths=(32,))
    r = train.fit(m, optax.adam(3e-3), digits, epochs=3, batch_size=64,
                  seed=seed, progress=False)
    teachers.append((m, core.variables_of(r.state)))
  student = models.create("mlp", num_classes=10, widths=(16,))
  r = d.distill(student, teachers, optax.adam(1e-2), digits, epochs=4,
                batch_size=64, progress=False)
  assert r.history[-1]["train_agreement"] > 0.8
  # agreement is with the teachers' mean vote
  x = jnp.asarray(digits.x_test)
  vote = sum(jax.nn.softmax(m.apply(v, x)) for m, v in teachers).argmax(-1)
  s = student.apply(core.variables_of(r.state), x).argmax(-1)
  assert float(jnp.mean(s == vote)) > 0.8


def test_mix_inputs_mixes_each_input_with_one_other(key):
  # rows e_i: each mixed row is lam_i e_i + (1 - lam_i) e_perm(i)
  n = 64
  out = np.asarray(d.mix_inputs(key, jnp.eye(n), 1.0))
  np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-6)
  assert (out >= 0).all() and ((out > 0).sum(1) <= 2).all()
  lam = np.diag(out)
  partner = np.where(np.eye(n, dtype=bool), -1, out).argmax(1)
  fixed = lam == 1.0                       # mixed with itself: e_i
  assert len(set(partner[~fixed])) == (~fixed).sum()   # a permutation
  assert 0.35 < lam.mean() < 0.65 and lam.std() > 0.15  # Beta(1, 1): uniform
  tight = np.diag(np.asarray(d.mix_inputs(key, jnp.eye(n), 200.0)))
  assert np.abs(tight[tight < 1] - 0.5).max() < 0.15    # Beta(200, 200): ~1/2


def test_mixup_distillation_uses_the_teacher_alone(digits, digits_teacher):
  teacher, tv = digits_teacher
  student = models.create("mlp", num_classes=10, widths=(16,))
  kw = dict(epochs=6, batch_size=64, progress=False, temperature=1.0,
            alpha=1.0, mixup=1.0)
  r = d.distill(student, [(teacher, tv)], optax.adam(1e-2), digits, **kw)
  assert d.agreement(student, core.variables_of(r.state), teacher, tv,
                     digits.x_test) > 0.9
  # the mixed batches are labelled by the teacher: the labels change nothing
  shuffled = dataclasses.replace(digits, y_train=np.roll(digits.y_train, 1))
  r2 = d.distill(student, [(teacher, tv)], optax.adam(1e-2), shuffled, **kw)
  jax.tree.map(np.testing.assert_array_equal, r2.state.params, r.state.params)
  # and it is not plain distillation: the inputs really were mixed
  plain = d.distill(student, [(teacher, tv)], optax.adam(1e-2), digits,
                    **{**kw, "mixup": None})
  assert not np.allclose(plain.state.params["Dense_0"]["kernel"],
                         r.state.params["Dense_0"]["kernel"])
