"""Knowledge distillation: the loss and the teacher -> student training path.

`distillation_loss` is Hinton et al.'s soft-target loss; `distill` trains a
student with `fit`, the teacher's logits computed inside the compiled step
under `stop_gradient`, and logs how often student and teacher agree.

Examples:
  >>> import jax.numpy as jnp
  >>> s = jnp.array([[2.0, 0.0, -1.0]]); t = jnp.array([[1.0, 0.5, -2.0]])
  >>> round(float(distillation_loss(s, t, jnp.array([0]), temperature=1.0,
  ...                                alpha=0.0)), 4)   # alpha=0: cross entropy
  0.1698
  >>> round(float(distillation_loss(t, t, jnp.array([0]), temperature=3.0,
  ...                                alpha=1.0)), 5)   # student = teacher
  0.0
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccel import train
from jaxaccel.data import Dataset
from jaxaccel.errors import ConfigError
from jaxaccel.models import adapt, output_classes

PyTree = Any


def check_options(temperature: float, alpha: float,
                  mixup: float | None = None) -> None:
  """ConfigError unless the distillation options make sense together."""
  if mixup is not None:
    if not mixup > 0:
      raise ConfigError(f"mixup is a Beta concentration and must be positive; "
                        f"got {mixup}")
    if alpha != 1.0:
      raise ConfigError(f"mixup mixes the inputs but not their labels, so the "
                        f"student must learn from the teacher alone: use "
                        f"alpha=1.0 (got alpha={alpha})")
  _check(temperature, alpha)


def _check(temperature: float, alpha: float) -> None:
  if not temperature > 0:
    raise ConfigError(f"distillation temperature must be positive; got "
                      f"{temperature}")
  if not 0.0 <= alpha <= 1.0:
    raise ConfigError(f"distillation alpha weighs the teacher's soft targets "
                      f"and must lie in [0, 1]; got {alpha}")


def soft_targets(teacher_logits, temperature: float) -> jax.Array:
  """softmax(teacher / T), averaged over teachers when given a list."""
  if not isinstance(teacher_logits, (list, tuple)):
    teacher_logits = [teacher_logits]
  probs = [jax.nn.softmax(jax.lax.stop_gradient(t).astype(jnp.float32)
                          / temperature, axis=-1) for t in teacher_logits]
  return sum(probs) / len(probs)


def distillation_loss(student_logits: jax.Array, teacher_logits, labels: jax.Array,
                      *, temperature: float = 4.0, alpha: float = 0.9) -> jax.Array:
  """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))
  + (1 - alpha) * CE(labels, student), averaged over the batch.

  Args:
    student_logits: (batch, classes).
    teacher_logits: (batch, classes), or a list of them: several teachers,
      whose softened distributions are averaged. Held under stop_gradient.
    labels: (batch,) integer labels.
    temperature: T, softens both distributions; T^2 keeps the soft term's
      gradient scale independent of T.
    alpha: weight of the soft term.
  """
  _check(temperature, alpha)
  s = student_logits.astype(jnp.float32)
  p = soft_targets(teacher_logits, temperature)
  log_q = jax.nn.log_softmax(s / temperature, axis=-1)
  kl = jnp.sum(jax.scipy.special.xlogy(p, p) - p * log_q, axis=-1)
  ce = optax.softmax_cross_entropy_with_integer_labels(s, labels)
  return jnp.mean(alpha * temperature ** 2 * kl + (1.0 - alpha) * ce)


def make_distillation_loss(*, temperature: float = 4.0, alpha: float = 0.9
                           ) -> Callable:
  """`(logits, labels, teacher_logits) -> loss`, the `loss_fn` of `fit` with
  a teacher."""
  _check(temperature, alpha)

  def loss_fn(logits, labels, teacher_logits):
    return distillation_loss(logits, teacher_logits, labels,
                             temperature=temperature, alpha=alpha)
  return loss_fn


def teacher_fn(teachers: Sequence[tuple[Any, PyTree]]) -> Callable:
  """`x -> logits` of one teacher, or a list of logits for several.

  Args:
    teachers: (model, variables) pairs, run in eval mode; each model is any
      kind `jaxaccel.models.adapt` takes.
  """
  pairs = [(adapt(m), v) for m, v in teachers]

  def run(x):
    out = [m.logits(v, x) for m, v in pairs]
    return out[0] if len(out) == 1 else out
  return run


def agreement(student, student_variables, teacher, teacher_variables,
              x: np.ndarray) -> float:
  """Fraction of inputs on which student and teacher predict the same class."""
  s = train.predict(student, student_variables, x).argmax(-1)
  t = train.predict(teacher, teacher_variables, x).argmax(-1)
  return float(np.mean(s == t))


def check_classes(student, teachers: Sequence[tuple[Any, PyTree]],
                  input_shape, dtype=np.float32) -> None:
  """Raises ConfigError when student and teachers have different outputs
  (on inputs of `input_shape` and `dtype`: token ids for a language
  model)."""
  want = output_classes(student, input_shape, dtype)
  for model, _ in teachers:
    got = output_classes(model, input_shape, dtype)
    if want is not None and got is not None and want != got:
      raise ConfigError(f"the student has {want} output classes but the "
                        f"teacher has {got}: build the student with "
                        f"{got} outputs")


def mix_inputs(key: jax.Array, x: jax.Array, concentration: float = 1.0
               ) -> jax.Array:
  """Each input mixed with another of the batch: lam * x + (1 - lam) * x[perm],
  lam ~ Beta(concentration, concentration) per example.

  Only for training on a teacher's outputs, which label the mixed inputs
  themselves (the labels of the originals are not mixed)."""
  k_lam, k_perm = jax.random.split(key)
  n = x.shape[0]
  lam = jax.random.beta(k_lam, concentration, concentration,
                        (n,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  return lam * x + (1 - lam) * x[jax.random.permutation(k_perm, n)]


def distill(student, teachers: Sequence[tuple[Any, PyTree]],
            tx: optax.GradientTransformation, data: Dataset, *,
            epochs: int | None = None, steps: int | None = None,
            temperature: float = 4.0, alpha: float = 0.9,
            mixup: float | None = None, **fit_kwargs) -> train.FitResult:
  """Trains `student` on `data` from one or more trained teachers.

  Args:
    student: a model with the teachers' number of classes; student and
      teachers may be of different kinds (linen, NNX, plain functions).
    teachers: (model, variables) pairs.
    tx: the student's optimizer (or chain spec).
    data: the training data (teachers see the same, augmented, batches).
    epochs: passes over the training set; or `steps` in all.
    temperature, alpha: see `distillation_loss`.
    mixup: when given, a Beta(mixup, mixup) concentration: every training
      batch is mixed with `mix_inputs` (after any `augment`), and student
      and teacher both see the mixed inputs, so the student matches the
      teacher's function between the training points, not only on them.
      Needs alpha=1.0: the labels are not mixed. On Fashion-MNIST this is
      what makes distillation pay (see the README's compression figures):
      temperature=1, alpha=1, mixup=1 and a long schedule (100-200 epochs).
    **fit_kwargs: passed to `fit` (batch_size, seed, out, progress, ...).

  Returns:
    `fit`'s result; each history record has `train_agreement`.

  Examples:
    >>> import optax
    >>> from jaxaccel import core, data, models, train
    >>> ds = data.load("digits")
    >>> big = models.create("mlp", num_classes=10, widths=(64,))
    >>> t = train.fit(big, optax.adam(3e-3), ds, epochs=2, progress=False)
    >>> small = models.create("mlp", num_classes=10, widths=(16,))
    >>> r = distill(small, [(big, core.variables_of(t.state))], optax.adam(3e-3),
    ...             ds, epochs=2, progress=False)
    >>> 0.0 <= r.history[-1]["train_agreement"] <= 1.0
    True
  """
  teachers = list(teachers)
  if not teachers:
    raise ConfigError("distill needs at least one (model, variables) teacher")
  check_classes(student, teachers, *train.input_spec(data))
  check_options(temperature, alpha, mixup)
  if mixup is not None and np.issubdtype(train.input_spec(data)[1], np.integer):
    raise ConfigError("mixup mixes inputs, and these are integers (token "
                      "ids) that cannot be mixed: drop mixup (for a language "
                      "model: --recipe distill-lm)")
  if mixup is not None:
    fit_kwargs["augment"] = _then_mix(fit_kwargs.get("augment"), mixup)
  return train.fit(student, tx, data, epochs=epochs, steps=steps,
                   teacher=teacher_fn(teachers),
                   loss_fn=make_distillation_loss(temperature=temperature,
                                                  alpha=alpha),
                   **fit_kwargs)


def _then_mix(augment: Callable | None, concentration: float) -> Callable:
  def mixed(key, x):
    if augment is not None:
      key, k_aug = jax.random.split(key)
      x = augment(k_aug, x)
    return mix_inputs(key, x, concentration)
  return mixed
