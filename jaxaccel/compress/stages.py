"""Compression stages and recipes.

A stage is one step `(model, variables, data, **options) -> (model,
variables, record)`: it compresses, fine-tunes when asked, and measures the
result on the test split (the record: accuracy, stored bytes, sparsity,
latency, seconds). A recipe is an ordered list of stages, written as a TOML
file that is parsed, never evaluated:

    description = "90% sparse by gradual global pruning"
    [[stages]]
    stage = "prune"
    sparsity = 0.9
    schedule = "gradual"
    scope = "global"
    epochs = 10

`run` checks every stage's options before any work starts. The recipes that
ship with jaxaccel live in `compress/recipes/` and are named by their file
name (`list_recipes()`); a new stage is one function registered here with
`@stage`.

Examples:
  >>> sorted(list_recipes())[:3]
  ['distill', 'distill-lm', 'int8']
  >>> check_recipe([{"stage": "prune", "sparsity": 1.5}])
  Traceback (most recent call last):
  ...
  jaxaccel.errors.ConfigError: stage 1 (prune): sparsity must lie in [0, 1) (the fraction of weights set to zero); got 1.5
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re
import time
import tomllib
from typing import Any, Callable

import jax
import numpy as np
import optax

from jaxaccel import core, models, optim, tasks, train
from jaxaccel.compress import distillation, int8, lowrank, pruning, quantization
from jaxaccel.compress import shrink as shrinking
from jaxaccel.compress import report as creport
from jaxaccel.data import Dataset
from jaxaccel.errors import ConfigError
from jaxaccel.generate import (context_of, decoder, generate, has_cache,
                               init_cache)
from jaxaccel.models import adapt

RECIPES = pathlib.Path(__file__).parent / "recipes"
QUANTIZE_BITS = {"int8": 8, "int4": 4}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every stage of one run shares."""
  batch_size: int = 128
  seed: int = 0
  progress: bool = False
  latency: bool = True        # time batch-1 and batch-1024 inference
  task: Any = None            # what records measure (a `tasks.Task` or its
                              # name); None: inferred from the data's targets


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable               # (model, variables, data, settings, **options)
  check: Callable             # (**options) -> None, raises ConfigError
  terminal: bool = False      # nothing may follow it (its output is stored)
  check_model: Callable | None = None   # (model) -> None, raises ConfigError
  replaces_model: bool = False  # the model after it is of another kind


STAGES: dict[str, Stage] = {}


def stage(name: str, *, check: Callable | None = None, terminal: bool = False,
          check_model: Callable | None = None, replaces_model: bool = False):
  """Registers a stage function under `name`."""
  def register(fn):
    STAGES[name] = Stage(name, fn, check or (lambda **_: None), terminal,
                         check_model, replaces_model)
    return fn
  return register


# ------------------------------------------------------------------ helpers

def _logits_fn(model, variables) -> Callable:
  model = adapt(model)
  return lambda xb: model.logits(variables, xb)


def _measure(label: str, model, variables, data: Dataset, settings: Settings,
             *, fn: Callable | None = None, dense: bool = False) -> dict:
  test = data.arrays("test")
  task = train.resolve_task(settings.task, data)
  record = creport.measure(label, variables["params"],
                           fn or _logits_fn(model, variables), test.pop("x"),
                           test.pop("y"), extras=test, task=task,
                           latency=settings.latency, repeats=10, dense=dense)
  if settings.latency and fn is None and task.name == "lm":
    record["generation_tokens_per_second"] = _generation_speed(
        model, variables, data)
  return record


def _generation_speed(model, variables, data: Dataset, *,
                      step: Callable | None = None) -> float | None:
  """Greedy tokens/s at batch 1 of a language model (through `step`, a
  cached decoder in place of the model's own, when given): the first 16
  bytes of a test window as the prompt, then as many new bytes as the
  context holds (at most 256); timed after a first, compiling call. None
  for a model `generate` cannot run (no `context`)."""
  try:
    context = context_of(model)
  except ConfigError:
    return None
  prompt = bytes(np.asarray(data.x_test[0, :16], np.uint8).tolist())
  tokens = min(256, context - len(prompt))
  generate(model, variables, prompt, tokens=tokens, step=step)
  return generate(model, variables, prompt, tokens=tokens,
                  step=step)["tokens_per_second"]


def _int8_decoder(model, variables, data: Dataset, percentile: float):
  """A cached language model's decoder with int8 products, for `generate`
  (calibrated on 256 training windows from position 0)."""
  windows = [np.asarray(data.x_train[i:i + 64], np.int32)
             for i in range(0, min(len(data.x_train), 256), 64)]
  program = int8.convert_function(
      decoder(model), variables,
      [(w, init_cache(model, len(w))) for w in windows], percentile=percentile)
  return lambda _, ids, cache: program.forward(ids, cache)


@dataclasses.dataclass(frozen=True)
class Length:
  """How long a stage fine-tunes: whole `epochs`, or `steps` in all when a
  stage's `max_steps` cuts them short (a language model's corpus holds
  many more steps per epoch than an image set)."""
  epochs: int
  steps: int
  capped: bool = False

  def fit_kwargs(self) -> dict:
    return {"steps": self.steps} if self.capped else {"epochs": self.epochs}

  def __str__(self) -> str:
    return f"{self.steps} steps" if self.capped else f"{self.epochs} ep"


def _length(epochs: int, min_steps: int, max_steps: int | None, data: Dataset,
            settings: Settings) -> Length:
  """`epochs`, or more when they hold fewer than `min_steps` steps (a
  recipe's fine-tuning is long enough on a small data set too), cut to
  `max_steps` steps when they hold more."""
  per_epoch = max(len(data.x_train) // settings.batch_size, 1)
  epochs = max(epochs, -(-min_steps // per_epoch))
  if max_steps and epochs * per_epoch > max_steps:
    return Length(-(-max_steps // per_epoch), max_steps, capped=True)
  return Length(epochs, epochs * per_epoch)


def _fine_tune(model, variables, data, tx, length: Length, settings: Settings):
  """`fit` from `variables` with `tx` for `length`; the new variables."""
  state = core.state_from_variables(variables, tx, jax.random.key(settings.seed))
  result = train.fit(model, tx, data, **length.fit_kwargs(),
                     batch_size=settings.batch_size, seed=settings.seed,
                     progress=settings.progress, state=state)
  return core.variables_of(result.state)


def _cosine_fine_tune(model, variables, data, length: Length, learning_rate,
                      settings: Settings):
  """Fine-tuning for `length` with Adam under cosine decay."""
  return _fine_tune(model, variables, data,
                    optim.cosine_adam(learning_rate, length.steps), length,
                    settings)


def _check_epochs(epochs, *, positive: bool = False) -> None:
  if not isinstance(epochs, int) or epochs < (1 if positive else 0):
    raise ConfigError(f"epochs must be a {'positive' if positive else 'non-negative'}"
                      f" integer; got {epochs!r}")


def _check_number(name: str, value) -> None:
  """None (not given) or a number; TOML gives ints, floats, strings, bools."""
  if value is None or (isinstance(value, (int, float))
                       and not isinstance(value, bool)):
    return
  raise ConfigError(f"{name} = {value!r} is not a number")


def _check_rate(learning_rate) -> None:
  if learning_rate <= 0:
    raise ConfigError(f"learning_rate must be positive; got {learning_rate}")


def _check_steps(min_steps, max_steps=None) -> None:
  """A stage's floor and cap on its training steps."""
  if not isinstance(min_steps, int) or min_steps < 0:
    raise ConfigError(f"min_steps must be a non-negative integer; got {min_steps!r}")
  if max_steps is not None and (not isinstance(max_steps, int)
                                or isinstance(max_steps, bool) or max_steps < 1):
    raise ConfigError(f"max_steps must be a positive integer; got {max_steps!r}")
  if max_steps is not None and min_steps > max_steps:
    raise ConfigError(f"min_steps ({min_steps}) exceeds max_steps ({max_steps})")


# ------------------------------------------------------------------- stages

def _check_prune(*, sparsity, method, scope, pattern, schedule, epochs,
                 min_steps, max_steps, learning_rate, paths):
  _check_number("sparsity", sparsity)
  if paths is not None:
    try:
      re.compile(paths)
    except (re.error, TypeError) as e:
      raise ConfigError(f"paths {paths!r} is not a regular expression ({e})") from None
  kind = pruning.parse_pattern(pattern)[0]
  pruning.check_scope(scope, pattern)
  if kind == "n:m":
    n, m = pruning.parse_pattern(pattern)[1:]
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
      raise ConfigError(f"pattern {pattern!r} prunes {1 - n / m:g} of the "
                        f"weights, but sparsity {sparsity} was asked: drop "
                        "sparsity or make them match")
  else:
    if sparsity is None:
      raise ConfigError(f"pattern {pattern!r} needs a sparsity in [0, 1)")
    pruning.check_sparsity(sparsity)
  if method not in pruning.METHODS:
    raise ConfigError(f"unknown pruning method {method!r}: use one of "
                      f"{', '.join(pruning.METHODS)}")
  if schedule not in ("one-shot", "gradual"):
    raise ConfigError(f"unknown pruning schedule {schedule!r}: use one-shot "
                      "or gradual")
  _check_epochs(epochs, positive=schedule == "gradual")
  _check_steps(min_steps, max_steps)
  if schedule == "gradual" and (method != "magnitude" or kind == "n:m"):
    raise ConfigError("gradual pruning scores by magnitude, unstructured or by "
                      f"channel; got method {method!r}, pattern {pattern!r}")
  _check_rate(learning_rate)


@stage("prune", check=_check_prune)
def prune_stage(model, variables, data, settings, *, sparsity=None,
                method="magnitude", scope="layer", pattern="unstructured",
                schedule="one-shot", epochs=0, min_steps=0, max_steps=None,
                learning_rate=1e-3, paths=None):
  """Prunes to `sparsity`: at once ("one-shot", then `epochs` of fine-tuning
  with the masks held), or "gradual"ly along the cubic schedule over the
  first 40% of `epochs` of fine-tuning (Zhu & Gupta 2017); at least
  `min_steps` and at most `max_steps` steps of fine-tuning when there are
  any.

  The weights pruned are those the forward pass multiplies by activations
  (`int8.product_weights`: Dense/Linear, Einsum and Conv kernels), so a
  transformer keeps its embeddings, positional table and norms whole;
  `paths`, a regular expression on parameter names, prunes the leaves it
  matches instead (an embedding table too, if asked)."""
  length = _length(epochs, min_steps, max_steps, data, settings) \
      if epochs else Length(0, 0)
  if paths is None:
    weights = set(int8.product_weights(model, variables, data.x_train[:1]))
    include = lambda name, leaf: name in weights
  else:
    include = lambda name, leaf: re.search(paths, name) is not None
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  n_steps = length.steps
  adam = optim.cosine_adam(learning_rate, max(n_steps, 1))
  extra = {}
  if schedule == "gradual":
    steps = dict(begin_step=0, end_step=max(2 * n_steps // 5, 1),
                 every=max(1, min(100, n_steps // 20)))
    tx = optax.chain(adam, pruning.prune_gradually(
        sparsity, **steps, scope=scope, pattern=pattern, seed=settings.seed,
        include=include))
    variables = _fine_tune(model, variables, data, tx, length, settings)
    label = f"pruned {sparsity:g} gradually over {length}"
    extra["schedule"] = {**steps, "steps": n_steps}
  else:
    grads = None
    if method in ("saliency", "taylor"):
      fn = adapt(model)
      loss = lambda p, b: core.cross_entropy(fn.logits({"params": p, **rest}, b[0]),
                                             b[1])
      b = settings.batch_size
      grads = pruning.gradient_statistics(loss, params, [
          (data.x_train[i:i + b], data.y_train[i:i + b])
          for i in range(0, min(len(data.x_train), 8 * b), b)])
    kind = pruning.parse_pattern(pattern)[0]
    pruned, masks = pruning.prune(
        params, None if kind == "n:m" else sparsity, method=method, scope=scope,
        pattern=pattern, grads=grads, key=jax.random.key(settings.seed),
        include=include)
    variables = {"params": pruned, **rest}
    label = f"pruned {pattern if kind == 'n:m' else f'{sparsity:g}'}"
    if epochs:
      tx = optax.chain(adam, pruning.keep_masks(masks))
      variables = _fine_tune(model, variables, data, tx, length, settings)
      label += f" +{length}"
  return model, variables, {**_measure(label, model, variables, data, settings),
                            **extra}


def _check_finetune(*, epochs, min_steps, max_steps, learning_rate):
  _check_epochs(epochs, positive=True)
  _check_steps(min_steps, max_steps)
  _check_rate(learning_rate)


@stage("finetune", check=_check_finetune)
def finetune_stage(model, variables, data, settings, *, epochs=1, min_steps=0,
                   max_steps=None, learning_rate=1e-3):
  """Trains `epochs` more (at least `min_steps`, at most `max_steps`
  steps), zeros held: pruned weights stay pruned."""
  length = _length(epochs, min_steps, max_steps, data, settings)
  masks = jax.tree.map(lambda p: p != 0, variables["params"])
  tx = optax.chain(optim.cosine_adam(learning_rate, length.steps),
                   pruning.keep_masks(masks))
  variables = _fine_tune(model, variables, data, tx, length, settings)
  return model, variables, _measure(f"fine-tuned {length}", model,
                                    variables, data, settings)


def _check_quantize(*, bits, calibration_examples, percentile):
  if bits not in QUANTIZE_BITS:
    raise ConfigError(f"unsupported quantization {bits!r}: use int8 or int4")
  if not isinstance(calibration_examples, int) or calibration_examples < 1:
    raise ConfigError("calibration_examples must be a positive integer; got "
                      f"{calibration_examples!r}")
  _check_number("percentile", percentile)
  if not 0.0 < percentile <= 100.0:
    raise ConfigError(f"percentile must lie in (0, 100]; got {percentile}")


@stage("quantize", check=_check_quantize, terminal=True)
def quantize_stage(model, variables, data, settings, *, bits="int8",
                   calibration_examples=5000, percentile=99.99):
  """Post-training quantization, per output channel. With int8, every
  matmul and convolution on a parameter runs int8 x int8 -> int32
  (`compress.int8`), activation scales calibrated on `calibration_examples`
  training inputs at `percentile`; int4 runs the dequantized weights."""
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  q = quantization.quantize(params, bits=QUANTIZE_BITS[bits],
                            granularity="channel")
  floats = {"params": quantization.dequantize(q), **rest}
  extra = {}
  if bits == "int8":
    program = int8.convert(model, floats, int8.calibration_batches(
        data.x_train, examples=calibration_examples), percentile=percentile)
    fn, path = program, "int8 products"
    summary = program.summary()
    extra = {"int8_layers": summary["int8"], "float_layers": summary["float"]}
  else:
    fn, path = _logits_fn(model, floats), "dequantized float"
  variables = {"params": q, **rest}
  record = _measure(f"{bits} ({path})", model, variables, data, settings, fn=fn)
  record.update(inference=path, **extra)
  if (bits == "int8" and settings.latency and has_cache(model)
      and train.resolve_task(settings.task, data).name == "lm"):
    record["generation_tokens_per_second"] = _generation_speed(
        model, floats, data,
        step=_int8_decoder(model, floats, data, percentile))
  return model, variables, record


def _check_shrink(*, fraction, epochs, min_steps, max_steps, learning_rate):
  _check_number("fraction", fraction)
  if not 0.0 < fraction < 1.0:
    raise ConfigError(f"fraction must lie in (0, 1) (the share of units "
                      f"removed); got {fraction}")
  _check_epochs(epochs)
  _check_steps(min_steps, max_steps)
  _check_rate(learning_rate)


@stage("shrink", check=_check_shrink, check_model=shrinking.check_model,
       replaces_model=True)
def shrink_stage(model, variables, data, settings, *, fraction=0.5, epochs=10,
                 min_steps=0, max_steps=None, learning_rate=1e-3):
  """Removes `fraction` of the units of every hidden layer (MLP), of the
  filters of every convolution and the hidden layer (CNN) or of each
  block's MLP hidden units (GPT), then fine-tunes
  `epochs` (at least `min_steps`, at most `max_steps` steps)."""
  sample = data.x_test[:1]
  before = {"parameters_before": models.count_params(variables["params"]),
            "flops_before": shrinking.flops(model, variables, sample)}
  model, variables = shrinking.shrink(model, variables, fraction,
                                      sample=sample)
  if epochs:
    length = _length(epochs, min_steps, max_steps, data, settings)
    variables = _cosine_fine_tune(model, variables, data, length,
                                  learning_rate, settings)
  desc = models.describe(model)
  spec = (",".join(map(str, _widths(desc))) if desc
          else f"{1 - fraction:g} of each hidden layer")
  label = f"shrunk to {spec}" + (f" +{length}" if epochs else "")
  record = _measure(label, model, variables, data, settings)
  record.update(before, flops=shrinking.flops(model, variables, sample),
                model=models.describe(model))
  return model, variables, record


def _widths(desc: dict) -> list[int]:
  kwargs = desc["kwargs"]
  if desc["name"] == "gpt":
    return [kwargs["mlp"]]
  return list(kwargs.get("widths") or [*kwargs["features"], kwargs["hidden"]])


def _check_distill(*, student, epochs, max_steps, temperature, alpha, mixup,
                   learning_rate):
  if not isinstance(student, str) or not student:
    raise ConfigError("the distill stage needs a student model spec, e.g. "
                      "student = \"mlp:64,64\" (--distill-student)")
  if student != HALF:
    models.parse_model_spec(student)
  _check_number("mixup", mixup)
  _check_epochs(epochs, positive=True)
  _check_steps(0, max_steps)
  distillation.check_options(temperature, alpha, mixup)
  _check_rate(learning_rate)


@stage("distill", check=_check_distill, replaces_model=True)
def distill_stage(model, variables, data, settings, *, student=None, epochs=10,
                  max_steps=None, temperature=4.0, alpha=0.9, mixup=None,
                  learning_rate=1e-3):
  """Trains the `student` model spec from the model so far for `epochs`
  (at most `max_steps` steps; Adam, cosine decay); the student replaces it
  for the stages after. `student = "half"` is the teacher's registry GPT
  with half its blocks, starting from the teacher's weights: its
  embeddings, final norm and every other block (0, 2, 4, ...)."""
  start, half = {}, student == HALF
  if half:
    student = _half_gpt(model)
  name, kwargs = models.parse_model_spec(student)
  models.check_input(name, data.input_shape)
  small = models.create(name, num_classes=data.num_classes,
                        **_sequence_fields(name, model, kwargs))
  length = _length(epochs, 0, max_steps, data, settings)
  tx = optim.cosine_adam(learning_rate, length.steps)
  if half:
    start["state"] = core.state_from_variables(
        {"params": _every_other_block(variables["params"])}, tx,
        jax.random.key(settings.seed))
  result = distillation.distill(
      small, [(model, variables)], tx,
      data, **length.fit_kwargs(), temperature=temperature, alpha=alpha,
      mixup=mixup, batch_size=settings.batch_size, seed=settings.seed,
      progress=settings.progress, **start)
  taught = core.variables_of(result.state)
  label = f"student {student}" + (f" {length}" if length.capped else "")
  record = _measure(label, small, taught, data, settings)
  record["agreement"] = distillation.agreement(small, taught, model, variables,
                                               data.x_test)
  return small, taught, record


HALF = "half"      # a distill student: the teacher's GPT, half its blocks


def _half_gpt(teacher) -> str:
  """The spec of the teacher's registry GPT with half its blocks (at least
  one); a ConfigError for any other teacher."""
  module = getattr(models.adapt(teacher), "module", None)
  if not all(hasattr(module, f) for f in ("layers", "heads", "width",
                                          "context")):
    raise ConfigError("student = \"half\" halves a registry gpt's blocks; "
                      "this teacher is not one: name the student's spec "
                      "(--distill-student gpt:LAYERS,HEADS,WIDTH)")
  return f"gpt:{max(1, module.layers // 2)},{module.heads},{module.width}"


def _every_other_block(params: dict) -> dict:
  """A GPT's parameters with blocks 0, 2, 4, ... as blocks 0, 1, 2, ...
  (half of them, at least one) and everything else as it is."""
  blocks = sorted((k for k in params if k.startswith("block_")),
                  key=lambda k: int(k.split("_")[1]))
  out = {k: v for k, v in params.items() if k not in blocks}
  for i in range(max(1, len(blocks) // 2)):
    out[f"block_{i}"] = params[blocks[2 * i]]
  return out


def _sequence_fields(name: str, teacher, kwargs: dict) -> dict:
  """A GPT student's options, with the teacher's context when the spec
  does not give one (a GPT spec names layers, heads and width only)."""
  if name in models.SEQUENCE_MODELS and "context" not in kwargs:
    context = getattr(getattr(models.adapt(teacher), "module", None),
                      "context", None)
    if context is not None:
      return {**kwargs, "context": context}
  return kwargs


def _check_factorize(*, energy, rank, epochs, min_steps, max_steps,
                     learning_rate):
  _check_number("energy", energy)
  if rank is not None and not all(isinstance(r, int) and not isinstance(r, bool)
                                  for r in (rank if isinstance(rank, list) else [rank])):
    raise ConfigError(f"rank = {rank!r} is not an integer or a list of them")
  if (energy is None) == (rank is None):
    raise ConfigError("the factorize stage needs exactly one of energy or rank")
  if energy is not None and not 0.0 < energy <= 1.0:
    raise ConfigError(f"energy must lie in (0, 1]; got {energy}")
  _check_epochs(epochs)
  _check_steps(min_steps, max_steps)
  _check_rate(learning_rate)


@stage("factorize", check=_check_factorize, replaces_model=True)
def factorize_stage(model, variables, data, settings, *, energy=None,
                    rank=None, epochs=0, min_steps=0, max_steps=None,
                    learning_rate=1e-3):
  """Low rank: every dense kernel of an MLP as two thinner ones (truncated
  SVD), then `epochs` of fine-tuning (at least `min_steps`, at most
  `max_steps` steps)."""
  if epochs:
    length = _length(epochs, min_steps, max_steps, data, settings)
  low, ranks = lowrank.factorize(variables["params"], rank=rank, energy=energy)
  small = lowrank.lowrank_model(model, ranks)
  variables = {"params": low}
  if epochs:
    variables = _cosine_fine_tune(small, variables, data, length,
                                  learning_rate, settings)
  label = f"low rank {list(ranks)}" + (f" +{length}" if epochs else "")
  return small, variables, _measure(label, small, variables, data, settings)


# ------------------------------------------------------------------ recipes

def _defaults(name: str) -> dict:
  """A stage's options and their defaults, from its function's signature."""
  return {p.name: p.default
          for p in inspect.signature(STAGES[name].run).parameters.values()
          if p.kind == inspect.Parameter.KEYWORD_ONLY}


def _parse_stage(i: int, entry: Any) -> tuple[str, dict]:
  if not isinstance(entry, dict) or "stage" not in entry:
    raise ConfigError(f"stage {i} is {entry!r}: each stage is a table with a "
                      f"'stage' key, one of {', '.join(STAGES)}")
  options = dict(entry)
  name = options.pop("stage")
  if name not in STAGES:
    raise ConfigError(f"stage {i}: unknown stage {name!r}: use one of "
                      f"{', '.join(STAGES)}")
  defaults = _defaults(name)
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise ConfigError(f"stage {i} ({name}): unknown option(s) "
                      f"{', '.join(unknown)}: {name} takes {', '.join(defaults)}")
  for key, value in options.items():
    default = defaults[key]
    if default is None:
      continue
    want = (int, float) if isinstance(default, float) else type(default)
    if not isinstance(value, want) or isinstance(value, bool) != isinstance(default, bool):
      raise ConfigError(f"stage {i} ({name}): {key} = {value!r} is not a "
                        f"{type(default).__name__} like its default {default!r}")
  return name, options


def check_recipe(stages: list) -> list[tuple[str, dict]]:
  """Every stage's name and options, checked: a ConfigError naming the
  stage and the value for anything wrong, before any work."""
  if not isinstance(stages, list) or not stages:
    raise ConfigError("a recipe needs at least one stage ([[stages]] tables)")
  parsed = []
  for i, entry in enumerate(stages, 1):
    name, options = _parse_stage(i, entry)
    try:
      STAGES[name].check(**{**_defaults(name), **options})
    except ConfigError as e:
      raise ConfigError(f"stage {i} ({name}): {e}") from None
    if parsed and STAGES[parsed[-1][0]].terminal:
      raise ConfigError(f"stage {i} ({name}) follows {parsed[-1][0]}, which "
                        "must come last: its output is what is stored")
    parsed.append((name, options))
  return parsed


def list_recipes() -> dict[str, str]:
  """The shipped recipes: name -> description."""
  return {p.stem: load_recipe(p)["description"] for p in _shipped()}


def _shipped() -> list[pathlib.Path]:
  return sorted(RECIPES.glob("*.toml"), key=lambda p: p.stem)


def load_recipe(name_or_path) -> dict:
  """A recipe by shipped name or TOML path: {"description", "stages"}, with
  its stages checked."""
  path = pathlib.Path(str(name_or_path))
  if path.suffix != ".toml":
    path = RECIPES / f"{name_or_path}.toml"
    if not path.is_file():
      shipped = ", ".join(p.stem for p in _shipped())
      raise ConfigError(f"unknown recipe {name_or_path!r}: use one of "
                        f"{shipped}, or a path to a .toml file")
  if not path.is_file():
    raise ConfigError(f"recipe file {path} does not exist")
  try:
    recipe = tomllib.loads(path.read_text())
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
  unknown = sorted(set(recipe) - {"description", "stages"})
  if unknown:
    raise ConfigError(f"recipe {path}: unknown key(s) {', '.join(unknown)}: a "
                      "recipe has a description and [[stages]]")
  try:
    check_recipe(recipe.get("stages"))
  except ConfigError as e:
    raise ConfigError(f"recipe {path.name}: {e}") from None
  return {"description": recipe.get("description", ""),
          "stages": recipe["stages"]}


def run(model, variables: dict, data: Dataset, stages: list, *,
        settings: Settings = Settings()) -> tuple[Any, dict, list[dict]]:
  """Runs a recipe's stages in order on a trained model.

  Args:
    model: the trained model (any kind `jaxaccel.models.adapt` takes).
    variables: its variables, `{"params": ..., **model state}`.
    data: the data set it was trained on; records use its test split.
    stages: `[{"stage": "prune", "sparsity": 0.9, ...}, ...]` (a recipe's
      "stages"), checked before any work.
    settings: batch size, seed, progress bars and latency for every stage.

  Returns:
    (the last model, its variables, one record per stage with the original
    model's first), each record with the stage's `seconds`.
  """
  plan = check_recipe(stages)
  check_model(model, plan)
  records = [_measure("original", model, variables, data, settings, dense=True)]
  for name, options in plan:
    t0 = time.perf_counter()
    model, variables, record = STAGES[name].run(model, variables, data,
                                                settings, **options)
    record.update(stage=name, options=options,
                  seconds=round(time.perf_counter() - t0, 3))
    records.append(record)
  return model, variables, records


def check_model(model, plan: list[tuple[str, dict]]) -> None:
  """Each stage's model check, for the stages that see the given model
  (those up to the first that replaces it): before any work."""
  for i, (name, _) in enumerate(plan, 1):
    spec = STAGES[name]
    if spec.check_model is not None:
      try:
        spec.check_model(model)
      except ConfigError as e:
        raise ConfigError(f"stage {i} ({name}): {e}") from None
    if spec.replaces_model:
      return


# ------------------------------------------------------- a run directory

def recipe_from_flags(*, prune: float | None = None,
                      prune_method: str = "magnitude",
                      prune_scope: str | None = None,
                      prune_pattern: str = "unstructured",
                      prune_schedule: str | None = None,
                      quantize: str | None = None,
                      distill_student: str | None = None,
                      distill_epochs: int = 10, temperature: float = 4.0,
                      alpha: float = 0.9, mixup: float | None = None,
                      finetune_epochs: int | None = None,
                      learning_rate: float = 1e-3) -> list[dict]:
  """The recipe the command line's shorthand flags stand for: distill, then
  prune, then quantize, with the shipped recipes' defaults, so `--prune 0.9
  --quantize int8` builds the stages of `prune-90-int8`: gradual global
  pruning over 10 epochs of fine-tuning (at least 2,000 steps, at most 5,000).
  `prune_schedule="one-shot"` prunes at once and fine-tunes only
  `finetune_epochs` (the default for N:M patterns and gradient-scored
  methods, which gradual pruning does not take). The scope is global for
  unstructured pruning and per layer for channels and N:M, unless given."""
  stages = []
  if distill_student is not None:
    stages.append({"stage": "distill", "student": distill_student,
                   "epochs": distill_epochs, "max_steps": 5000,
                   "temperature": temperature, "alpha": alpha, "mixup": mixup,
                   "learning_rate": learning_rate})
  elif mixup is not None:
    raise ConfigError(f"mixup {mixup} mixes the inputs a student is distilled "
                      "on: give a student (--distill-student) or drop it")
  kind = pruning.parse_pattern(prune_pattern)[0]
  if prune_scope is None:
    prune_scope = "global" if kind == "unstructured" else "layer"
  pruning.check_scope(prune_scope, prune_pattern)
  # Gradual pruning scores by magnitude, unstructured or by channel.
  schedule = prune_schedule or ("gradual" if prune_method == "magnitude"
                                and kind != "n:m" else "one-shot")
  if schedule not in ("gradual", "one-shot"):
    raise ConfigError(f"unknown pruning schedule {schedule!r}; choose "
                      "gradual or one-shot")
  if prune is not None or kind != "unstructured":
    gradual = schedule == "gradual"
    epochs = finetune_epochs if finetune_epochs is not None else (
        10 if gradual else 0)
    stages.append({"stage": "prune", "sparsity": prune, "method": prune_method,
                   "scope": prune_scope, "pattern": prune_pattern,
                   "schedule": schedule, "epochs": epochs,
                   "min_steps": 2000 if gradual else 0,
                   "max_steps": 5000 if gradual else None,
                   "learning_rate": learning_rate})
  if quantize is not None:
    stages.append({"stage": "quantize", "bits": quantize})
  if not stages:
    raise ConfigError("nothing to do: give --recipe NAME, or --prune SPARSITY, "
                      "--quantize int8|int4 and/or --distill-student MODEL")
  return stages


def compress_run(run_dir, stages: list | str, *,
                 settings: Settings = Settings(), model=None,
                 data: Dataset | None = None, out=None) -> dict:
  """Compresses a trained run directory with a recipe's stages.

  The model and its training data are rebuilt from the run's config.json;
  give them as `model` (as for `train.load_run`) and `data` when they were
  built in Python. `stages` is a recipe's name (`list_recipes()`) or its
  list of stages, checked before the run is loaded. The result holds the
  `jaxaccel compress` keys (before = the trained run, after = the last
  stage), `stages` (one record each), `compressed_model` and
  `compressed_variables` (whose params `report.save_compressed` stores).
  With `out`, the compressed model is written there as `jaxaccel compress
  --out` writes it: a run directory that `load_run`, `predict --run` and
  `export --run` take, beside the stored `params.npz` and `report.json`.
  """
  recipe = stages
  if isinstance(stages, str):
    stages = load_recipe(stages)["stages"]
  check_recipe(stages)
  if out is not None:
    check_out(out)
  model, variables, config = train.load_run(run_dir, model=model)
  data = train.load_run_data(config, data)
  if settings.task is None and config.get("task") in tasks.NAMES:
    settings = dataclasses.replace(settings, task=config["task"])
  model, variables, records = run(model, variables, data, stages,
                                  settings=settings)
  payload = creport.compare(records[0], records[-1])
  payload.update(stages=records, dataset=data.name,
                 compressed_model=model, compressed_variables=variables)
  if out is not None:
    stored = {k: v for k, v in payload.items()
              if k not in ("compressed_model", "compressed_variables")}
    creport.save_compressed(out, variables["params"], {**stored,
                                                       "recipe": recipe})
    write_run(out, run_dir, model, variables, recipe)
  return payload


def check_out(out) -> None:
  """A ConfigError when `out` holds a training run: `write_run` would put
  the compressed model over it (a directory of an earlier compress is
  rewritten)."""
  from jaxaccel.checkpoint import RunDir
  run = RunDir(out)
  if run.has_config() and "compressed_from" not in run.read_config():
    raise ConfigError(f"--out {out} holds a training run; give compress a new "
                      "directory (it writes the compressed model there as a "
                      "run directory)")


def write_run(out, source_dir, model, variables: dict, recipe) -> None:
  """Writes the compressed model as a run directory beside `params.npz`:
  config.json (the source run's, with the compressed model's description
  and the recipe), the source's normalization and a checkpoint of the
  inference variables (quantized weights as their float values, zeros
  kept), so `predict --run`, `load_run` and `export --run` take it."""
  from jaxaccel.checkpoint import RunDir
  source = RunDir(source_dir)
  config = source.read_config()
  config.update(model=train.describe_model(model),
                model_spec=models.describe(model),
                compressed_from=str(source_dir), recipe=recipe)
  run_dir = RunDir(out)
  run_dir.write_config(config)
  stats = source.read_normalization()
  if stats:
    run_dir.write_normalization(**stats)
  run_dir.save_variables({**variables, "params": quantization.dequantize(
      variables["params"])})
  run_dir.close()
