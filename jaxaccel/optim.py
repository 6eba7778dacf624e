"""Optimizer chain specs -> optax transformations, parsed, never evaluated.

One spec, three spellings:

* a compact string: `clip_by_global_norm(1.0) | adamw(learning_rate=1e-3)`;
* a list of calls, each `{"name": ..., "args": [...], "kwargs": {...}}`
  (nested schedule calls are such dicts too), or a dict `{"chain": [...]}`;
* a TOML file holding `[[chain]]` tables in the list form (a path ending in
  `.toml`).

Names resolve against an allow-list of optax functions; arguments are
literals, nested calls of allow-listed schedules, or lists of those.

Examples:
  >>> from jaxaccel import optim
  >>> tx = optim.build("clip_by_global_norm(1.0) | adam(learning_rate=1e-3)")
  >>> optim.to_string(optim.parse("adam(1e-3)"))
  'adam(0.001)'
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from jaxaccel.errors import SpecError

Spec = Union[str, list, dict]
PyTree = Any

# ------------------------------------------------ jaxaccel's transformations

def cosine_adam(learning_rate: float, steps: int) -> optax.GradientTransformation:
  """Adam with its rate decayed to zero by a cosine over `steps` (the
  schedule the compression recipes train with)."""
  return optax.adam(optax.cosine_decay_schedule(learning_rate, steps))


def param_path(path) -> str:
  """The slash-separated name of a parameter, e.g. 'Dense_0/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def path_mask(pattern: str) -> Callable[[PyTree], PyTree]:
  """A mask function selecting the params whose path matches `pattern`.

  `pattern` is a regular expression searched in paths such as
  'Dense_0/kernel'; a leading '!' selects the params that do not match it.
  A pattern that matches no parameter (or, negated, excludes them all) raises
  a `SpecError` when the mask is first applied, at `tx.init`, before any step.

  Examples:
    >>> mask = path_mask("!bias")
    >>> mask({"Dense_0": {"kernel": 1.0, "bias": 0.0}})
    {'Dense_0': {'bias': False, 'kernel': True}}
  """
  negate, regex = _compile_pattern(pattern)

  def mask_fn(params):
    matched = jax.tree_util.tree_map_with_path(
        lambda path, _: regex.search(param_path(path)) is not None, params)
    hits = jax.tree.leaves(matched)
    if not any(hits) or (negate and all(hits)):
      paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
      listed = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
      what = ("matches no parameter" if not any(hits)
              else "excludes every parameter")
      raise SpecError(f"parameter pattern {pattern!r} {what}; the parameter "
                      f"paths are: {listed}")
    return jax.tree.map(lambda m: m != negate, matched)
  return mask_fn


def _compile_pattern(pattern) -> tuple[bool, re.Pattern]:
  """(negated?, regex) of a parameter pattern such as 'kernel' or '!bias'."""
  if not isinstance(pattern, str):
    raise SpecError(f"a parameter pattern is a string such as 'kernel' or "
                    f"'!bias'; got {pattern!r}")
  negate = pattern.startswith("!")
  try:
    return negate, re.compile(pattern[1:] if negate else pattern)
  except re.error as e:
    raise SpecError(f"bad parameter pattern {pattern!r}: {e}") from None


def _as_mask(mask):
  return path_mask(mask) if isinstance(mask, str) else mask


def add_l1(weight: float, *, mask: str | Callable | None = None
           ) -> optax.GradientTransformation:
  """Adds `weight * sign(params)` to the updates: the gradient of an L1
  penalty. Put it before the optimizer; `mask` (a path pattern, see
  `path_mask`) limits it to some params.

  Examples:
    >>> tx = optax.chain(add_l1(1e-4, mask="kernel"), optax.sgd(0.1))
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise SpecError("add_l1 needs the params: call tx.update(updates, "
                      "state, params)")
    updates = jax.tree.map(
        lambda u, p: u + (weight * jnp.sign(p)).astype(u.dtype), updates, params)
    return updates, state
  tx = optax.GradientTransformation(init_fn, update_fn)
  return optax.masked(tx, _as_mask(mask)) if mask is not None else tx


def freeze(pattern: str) -> optax.GradientTransformation:
  """Zeros the updates of the params whose path matches `pattern`, so they
  never change. Put it last in a chain (after weight decay).

  Examples:
    >>> tx = optax.chain(optax.adam(1e-3), freeze("Dense_[01]"))
  """
  return optax.masked(optax.set_to_zero(), path_mask(pattern))


def scale_group(pattern: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of one parameter group by `factor`: a per-group
  learning rate (`adam(1e-3) | scale_group('Dense_2', 10.0)` trains the
  head at 1e-2)."""
  return optax.masked(optax.scale(factor), path_mask(pattern))


def param_groups(groups: dict, default) -> optax.GradientTransformation:
  """One transformation (or spec) per parameter group, chosen by the first
  path pattern (as in `path_mask`) that matches; params matching none use `default`. Params of
  a group get optimizer state only from their own transformation.

  Examples:
    >>> tx = param_groups({"Dense_2": "adam(1e-2)"}, default="sgd(0.1)")
  """
  patterns = list(groups)
  compiled = [_compile_pattern(p) for p in patterns]
  as_tx = lambda t: build(t) if isinstance(t, (str, list, dict)) else t
  transforms = {str(i): as_tx(t) for i, t in enumerate(groups.values())}
  transforms["default"] = as_tx(default)

  def labels(params):
    def label(path, _):
      name = param_path(path)
      return next((str(i) for i, (negate, r) in enumerate(compiled)
                   if (r.search(name) is None) == negate), "default")
    tree = jax.tree_util.tree_map_with_path(label, params)
    used = set(jax.tree.leaves(tree))
    unused = [p for i, p in enumerate(patterns) if str(i) not in used]
    if unused:
      raise SpecError(f"parameter group pattern {unused[0]!r} matches no "
                      "parameter (or only ones an earlier pattern took)")
    return tree
  return optax.multi_transform(transforms, labels)


class PlateauState(NamedTuple):
  """optax's plateau counters and scale, and the rule's settings as arrays."""
  plateau: optax.contrib.ReduceLROnPlateauState
  factor: jax.Array
  patience: jax.Array
  rtol: jax.Array
  atol: jax.Array
  cooldown: jax.Array
  min_scale: jax.Array


def reduce_on_plateau(factor: float = 0.5, *, patience: int = 3,
                      rtol: float = 1e-4, atol: float = 0.0,
                      cooldown: int = 0, min_scale: float = 0.0
                      ) -> optax.GradientTransformation:
  """Scales the updates by a factor that drops by `factor` when the
  validation loss has not improved for `patience` epochs.

  The step only multiplies; `fit` reports the validation loss after every
  epoch through `observe_plateau`, which runs optax's plateau rule
  (`optax.contrib.reduce_on_plateau`) on the state. Put it last in a chain.

  Examples:
    >>> tx = build("adam(1e-3) | reduce_on_plateau(0.5, patience=2)")
  """
  if not 0.0 < factor < 1.0:
    raise SpecError(f"reduce_on_plateau: factor must be in (0, 1); got {factor}")
  if patience < 1:
    raise SpecError(f"reduce_on_plateau: patience must be >= 1; got {patience}")
  settings = dict(factor=factor, patience=patience, rtol=rtol, atol=atol,
                  cooldown=cooldown, min_scale=min_scale)

  def init_fn(params):
    rule = optax.contrib.reduce_on_plateau(**settings)
    return PlateauState(plateau=rule.init(params),
                        **{k: jnp.asarray(v) for k, v in settings.items()})

  def update_fn(updates, state, params=None):
    del params
    scale = state.plateau.scale
    return jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates), state
  return optax.GradientTransformation(init_fn, update_fn)


def _observe_one(state: PlateauState, value) -> PlateauState:
  rule = optax.contrib.reduce_on_plateau(
      factor=state.factor, patience=state.patience, rtol=state.rtol,
      atol=state.atol, cooldown=state.cooldown, min_scale=state.min_scale)
  _, plateau = rule.update((), state.plateau, value=value)
  return state._replace(plateau=plateau)


def observe_plateau(opt_state: PyTree, value: float) -> PyTree:
  """Feeds one validation loss to every `reduce_on_plateau` in `opt_state`."""
  return jax.tree.map(
      lambda s: _observe_one(s, value) if isinstance(s, PlateauState) else s,
      opt_state, is_leaf=lambda s: isinstance(s, PlateauState))


def has_plateau(opt_state: PyTree) -> bool:
  """Whether `opt_state` holds a `reduce_on_plateau` state."""
  return any(isinstance(s, PlateauState) for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, PlateauState)))


def accumulate(every: int) -> int:
  """Spec marker: `accumulate(4)` anywhere in a chain averages the gradients
  of 4 steps and applies the whole chain once (`optax.MultiSteps`), with one
  extra gradient-sized buffer."""
  if not isinstance(every, int) or isinstance(every, bool) or every < 1:
    raise SpecError(f"accumulate needs a positive whole number of steps; got "
                    f"{every!r}")
  return every


# ------------------------------------------------------------- hyperparams

_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _injected_states(opt_state):
  leaves = jax.tree.leaves(opt_state,
                           is_leaf=lambda s: isinstance(s, _INJECTED + (PlateauState,)))
  return ([s for s in leaves if isinstance(s, _INJECTED)],
          [s for s in leaves if isinstance(s, PlateauState)])


def hyperparams(opt_state: PyTree) -> dict[str, jax.Array]:
  """The hyperparameters held as array leaves of `opt_state`.

  Keys are the argument names (`learning_rate`, ...), suffixed `_0`, `_1`,
  ... (the position among the chain's transformations holding
  hyperparameters) when several of them share one; `lr_scale` is the
  factor of a `reduce_on_plateau`. Values follow schedules: each is the one
  used by the last update.
  """
  injected, plateaus = _injected_states(opt_state)
  names = [k for s in injected for k in s.hyperparams]
  out = {}
  for i, s in enumerate(injected):
    for k, v in s.hyperparams.items():
      out[k if names.count(k) == 1 else f"{k}_{i}"] = v
  for i, s in enumerate(plateaus):
    out["lr_scale" if len(plateaus) == 1 else f"lr_scale_{i}"] = s.plateau.scale
  return out


def set_hyperparams(opt_state: PyTree, **values) -> PyTree:
  """Returns `opt_state` with the named hyperparameters replaced: the next
  update uses them, and a jitted step does not recompile.

  Examples:
    >>> tx = build("adam(1e-3)")
    >>> state = set_hyperparams(tx.init({"w": jnp.ones(2)}), learning_rate=1e-4)
    >>> round(float(hyperparams(state)["learning_rate"]), 8)   # a float32 leaf
    0.0001
  """
  injected, _ = _injected_states(opt_state)
  known = {k for s in injected for k in s.hyperparams}
  for name in values:
    if name not in known:
      raise SpecError(f"no hyperparameter {name!r} in this optimizer state; "
                      f"it holds {sorted(known) or 'none'} (build the chain "
                      f"with hyperparams=({name!r},) to make it one)")
    if any(name in getattr(s, "hyperparams_states", {}) for s in injected):
      raise SpecError(f"{name} follows a schedule, so setting it would be "
                      "undone at the next step; give a constant to set it")

  def replace(s):
    if not isinstance(s, _INJECTED):
      return s
    hp = dict(s.hyperparams)
    for k, v in values.items():
      if k in hp:
        hp[k] = jnp.asarray(v, jnp.result_type(hp[k]))
    return s._replace(hyperparams=hp)
  return jax.tree.map(replace, opt_state, is_leaf=lambda s: isinstance(s, _INJECTED))


# ------------------------------------------------------------- allow-list

OPTIMIZERS = (
    "adabelief", "adadelta", "adafactor", "adagrad", "adam", "adamax",
    "adamaxw", "adamw", "adan", "amsgrad", "fromage", "lamb", "lars", "lion",
    "nadam", "nadamw", "noisy_sgd", "novograd", "optimistic_gradient_descent",
    "polyak_sgd", "radam", "rmsprop", "sgd", "sm3", "yogi",
)
TRANSFORMS = (
    "add_decayed_weights", "add_noise", "apply_every", "centralize",
    "clip", "clip_by_block_rms", "clip_by_global_norm", "identity",
    "scale", "scale_by_adam", "scale_by_learning_rate", "scale_by_rms",
    "scale_by_schedule", "scale_by_sign", "scale_by_trust_ratio",
    "trace", "zero_nans",
)
SCHEDULES = (
    "constant_schedule", "cosine_decay_schedule", "cosine_onecycle_schedule",
    "exponential_decay", "linear_onecycle_schedule", "linear_schedule",
    "piecewise_constant_schedule", "polynomial_schedule",
    "warmup_cosine_decay_schedule", "warmup_exponential_decay_schedule",
)
OWN = {"add_l1": add_l1, "freeze": freeze, "scale_group": scale_group,
       "reduce_on_plateau": reduce_on_plateau, "accumulate": accumulate}
ALLOWED = {**{name: getattr(optax, name)
              for name in OPTIMIZERS + TRANSFORMS + SCHEDULES
              if hasattr(optax, name)}, **OWN}


def _edit_distance(a: str, b: str) -> int:
  """Optimal string alignment distance: a swap of neighbours counts once."""
  d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)]
       for i in range(len(a) + 1)]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1,
                    d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
      if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
        d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
  return d[-1][-1]


def _unknown(name: str, where: str) -> SpecError:
  best = min(ALLOWED, key=lambda known: (_edit_distance(name, known), known))
  close = _edit_distance(name, best) <= max(2, len(name) // 3)
  hint = f"; did you mean {best!r}?" if close else ""
  return SpecError(f"unknown {where} {name!r} in optimizer spec{hint} "
                   "(allowed: optax optimizers, transforms and schedules, and "
                   "jaxaccel's add_l1, freeze, scale_group, reduce_on_plateau, "
                   "accumulate)")


# ------------------------------------------------------------------ parsing

def _literal(node: ast.AST, source: str) -> Any:
  if isinstance(node, ast.Constant) and isinstance(
      node.value, (int, float, bool, str, type(None))):
    return node.value
  if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
      and isinstance(node.operand, ast.Constant)
      and isinstance(node.operand.value, (int, float))
      and not isinstance(node.operand.value, bool)):
    v = node.operand.value
    return -v if isinstance(node.op, ast.USub) else v
  if isinstance(node, (ast.List, ast.Tuple)):
    return [_literal(e, source) for e in node.elts]
  if isinstance(node, ast.Dict):
    if any(k is None for k in node.keys):
      raise SpecError(f"'**' is not allowed in optimizer spec {source!r}")
    return {_literal(k, source): _literal(v, source)
            for k, v in zip(node.keys, node.values)}
  if isinstance(node, ast.Call):
    return _call(node, source)
  snippet = ast.get_source_segment(source, node) or type(node).__name__
  raise SpecError(f"{snippet!r} is not allowed in optimizer spec {source!r}: "
                  "arguments must be numbers, strings, lists or schedule calls")


def _call(node: ast.AST, source: str) -> dict:
  if isinstance(node, ast.Name):   # a bare name means a call with no arguments
    node = ast.Call(func=node, args=[], keywords=[])
  if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
    snippet = ast.get_source_segment(source, node) or type(node).__name__
    raise SpecError(f"{snippet!r} is not allowed in optimizer spec {source!r}: "
                    "write name(args) calls joined by '|'")
  name = node.func.id
  if name not in ALLOWED:
    raise _unknown(name, "function")
  if any(k.arg is None for k in node.keywords):
    raise SpecError(f"'**' is not allowed in optimizer spec {source!r}")
  return {"name": name,
          "args": [_literal(a, source) for a in node.args],
          "kwargs": {k.arg: _literal(k.value, source) for k in node.keywords}}


def _flatten_pipe(node: ast.AST) -> list[ast.AST]:
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    return _flatten_pipe(node.left) + _flatten_pipe(node.right)
  return [node]


def parse(spec: Spec) -> list[dict]:
  """Normalizes any spelling of a spec to its list-of-calls form."""
  if isinstance(spec, pathlib.Path) or (
      isinstance(spec, str) and spec.strip().endswith(".toml")):
    return _parse_toml(pathlib.Path(str(spec).strip()))
  if isinstance(spec, str):
    source = spec.strip()
    if not source:
      raise SpecError("empty optimizer spec: give at least one call, e.g. "
                      "'adam(learning_rate=1e-3)'")
    try:
      tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
      raise SpecError(f"cannot parse optimizer spec {source!r}: {e.msg} at "
                      f"column {e.offset}; write calls such as "
                      "'clip_by_global_norm(1.0) | adam(1e-3)'") from None
    except (ValueError, MemoryError, RecursionError) as e:
      raise SpecError(f"cannot parse optimizer spec {source!r}: {e}") from None
    try:
      return [_call(n, source) for n in _flatten_pipe(tree.body)]
    except RecursionError:
      raise SpecError(f"optimizer spec {source[:40]!r}... nests too deeply")
  if isinstance(spec, dict):
    if set(spec) == {"chain"}:
      return parse(spec["chain"])
    return parse([spec])
  if isinstance(spec, (list, tuple)):
    if not spec:
      raise SpecError("empty optimizer chain: give at least one call")
    return [_check_call(c) for c in spec]
  raise SpecError(f"an optimizer spec is a string, list or dict; got "
                  f"{type(spec).__name__}")


def _check_call(call: Any) -> dict:
  if not isinstance(call, dict) or not isinstance(call.get("name"), str):
    raise SpecError(f"each chain entry needs a 'name'; got {call!r}")
  extra = set(call) - {"name", "args", "kwargs"}
  if extra:
    raise SpecError(f"chain entry {call['name']!r} has unknown key(s) "
                    f"{sorted(extra)}: use name, args and kwargs")
  if call["name"] not in ALLOWED:
    raise _unknown(call["name"], "function")
  nested = lambda v: _check_call(v) if isinstance(v, dict) and "name" in v else v
  return {"name": call["name"],
          "args": [nested(a) for a in call.get("args", [])],
          "kwargs": {k: nested(v) for k, v in call.get("kwargs", {}).items()}}


def _parse_toml(path: pathlib.Path) -> list[dict]:
  import tomllib
  try:
    with open(path, "rb") as f:
      doc = tomllib.load(f)
  except FileNotFoundError:
    raise SpecError(f"optimizer spec file {path} does not exist")
  except tomllib.TOMLDecodeError as e:
    raise SpecError(f"cannot parse optimizer spec file {path}: {e}")
  if "chain" not in doc:
    raise SpecError(f"{path} needs [[chain]] tables, each with a name")
  return parse(doc["chain"])


# --------------------------------------------------------- building, printing

def _expects_number(param: inspect.Parameter) -> bool:
  default = param.default
  if isinstance(default, (int, float)) and not isinstance(default, bool):
    return True
  text = str(param.annotation)
  return (("Scalar" in text or "float" in text)
          and not any(t in text for t in ("str", "Mapping", "dict")))


def _construct(call: dict, hyperparams: tuple[str, ...] = ()) -> Any:
  name = call["name"]
  fn = ALLOWED[name]

  def value(v):
    if isinstance(v, dict) and "name" in v:
      return _construct(v)
    if isinstance(v, dict):   # e.g. piecewise boundaries; JSON/TOML keys are text
      return {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: w
              for k, w in v.items()}
    return v
  signature = inspect.signature(fn)
  try:
    bound = signature.bind(*[value(a) for a in call["args"]],
                           **{k: value(v) for k, v in call["kwargs"].items()})
  except TypeError as e:
    params = ", ".join(signature.parameters)
    raise SpecError(f"bad arguments to {name} in optimizer spec: {e}; its "
                    f"parameters are ({params})") from None
  arguments = bound.arguments
  for k, v in arguments.items():
    param = signature.parameters[k]
    if _expects_number(param) and isinstance(v, (str, bool)):
      raise SpecError(f"{name}: {k} must be a number; got {v!r}")
    if (k == "learning_rate" and isinstance(v, (int, float)) and v < 0):
      raise SpecError(f"{name}: learning_rate must be non-negative; got {v}")
  if isinstance(arguments.get("mask"), str):
    arguments["mask"] = path_mask(arguments["mask"])

  marked = [h for h in hyperparams if h in signature.parameters]
  if marked and name not in SCHEDULES and name != "accumulate":
    static = [p for p, param in signature.parameters.items()
              if p not in marked and param.kind not in (
                  param.VAR_KEYWORD, param.VAR_POSITIONAL)]
    fn = optax.inject_hyperparams(fn, static_args=static)
  try:
    return fn(**arguments)
  except (TypeError, ValueError) as e:
    raise SpecError(f"bad arguments to {name} in optimizer spec: {e}") from None


def build(spec: Spec, *, hyperparams: tuple[str, ...] = ("learning_rate",)
          ) -> optax.GradientTransformation:
  """Builds the optax transformation a spec describes (a chain if several).

  Args:
    spec: a chain spec in any spelling (see the module docstring).
    hyperparams: argument names held as array leaves of the optimizer state
      (`optax.inject_hyperparams`), so `hyperparams(state)` logs them and
      `set_hyperparams` or a vmapped sweep changes them without recompiling.
      Schedules given for them are evaluated each step.

  Examples:
    >>> tx = build("clip_by_global_norm(1.0) | adam(1e-3)")
    >>> round(float(hyperparams(tx.init({"w": jnp.ones(3)}))["learning_rate"]), 8)
    0.001
  """
  calls = parse(spec)
  every = [c for c in calls if c["name"] == "accumulate"]
  calls = [c for c in calls if c["name"] != "accumulate"]
  if len(every) > 1:
    raise SpecError("accumulate(...) may appear once in a chain")
  if not calls:
    raise SpecError("the chain holds only accumulate(...): add an optimizer, "
                    "e.g. 'adam(1e-3) | accumulate(4)'")
  parts = [_construct(c, tuple(hyperparams)) for c in calls]
  for c, p in zip(calls, parts):
    if not isinstance(p, optax.GradientTransformation):
      raise SpecError(f"{c['name']} is a schedule, not a transformation; pass "
                      "it as an argument, e.g. adam(learning_rate="
                      f"{c['name']}(...))")
  tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
  if every:
    k = _construct(every[0])
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx


def with_values(spec: Spec, **values) -> list[dict]:
  """The parsed spec with the named arguments set in every transformation
  that takes them, e.g. `with_values("adam(1e-3)", learning_rate=3e-4)`.

  Examples:
    >>> to_string(with_values("clip(1.0) | adam(1e-3)", learning_rate=3e-4))
    'clip(1.0) | adam(learning_rate=0.0003)'
  """
  out, used = [], set()
  for c in parse(spec):
    signature = inspect.signature(ALLOWED[c["name"]])
    names = [n for n in values if n in signature.parameters]
    if names and c["name"] not in SCHEDULES:
      kwargs = arguments(c)
      kwargs.update({n: _plain(values[n]) for n in names})
      c = {"name": c["name"], "args": [], "kwargs": kwargs}
      used.update(names)
    out.append(c)
  missing = sorted(set(values) - used)
  if missing:
    raise SpecError(f"no transformation in {to_string(out)!r} takes "
                    f"{missing[0]!r}")
  return out


def arguments(call: dict) -> dict:
  """The arguments a parsed call gives, by parameter name (no defaults)."""
  signature = inspect.signature(ALLOWED[call["name"]])
  try:
    return dict(signature.bind_partial(*call["args"], **call["kwargs"]).arguments)
  except TypeError as e:
    raise SpecError(f"bad arguments to {call['name']}: {e}") from None


def _plain(v):
  """Numbers as Python scalars, so specs print and save as text."""
  if hasattr(v, "item"):
    return v.item()
  return v


def schedule(spec: Spec) -> optax.Schedule:
  """Builds one allow-listed schedule, e.g. 'cosine_decay_schedule(1e-3, 500)'."""
  calls = parse(spec)
  if len(calls) != 1 or calls[0]["name"] not in SCHEDULES:
    raise SpecError(f"a schedule spec is one call of {', '.join(SCHEDULES)}; "
                    f"got {to_string(calls)!r}")
  return _construct(calls[0])


def plot_schedule(*schedules, steps: int, ax=None, labels=None):
  """Draws schedules (callables or schedule specs) over `steps` steps.

  Returns the matplotlib axes; each line's y-data are the schedule's values
  at steps 0 .. steps-1.

  Examples:
    >>> ax = plot_schedule("warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000)",
    ...                    steps=1000)
  """
  from jaxaccel.errors import optional
  plt = optional("matplotlib.pyplot", "plots")
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 3.5))
  t = jnp.arange(steps)
  for i, s in enumerate(schedules):
    label = labels[i] if labels else (s if isinstance(s, str) else
                                      getattr(s, "__name__", f"schedule {i}"))
    fn = schedule(s) if isinstance(s, (str, list, dict)) else s
    ax.plot(range(steps), jax.vmap(fn)(t), label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("learning rate")
  ax.legend(fontsize="small")
  return ax


def to_string(calls: list[dict]) -> str:
  """The compact string spelling of a parsed spec."""
  def fmt(v):
    if isinstance(v, dict) and "name" in v:
      return call(v)
    if isinstance(v, list):
      return "[" + ", ".join(fmt(e) for e in v) + "]"
    return repr(v)

  def call(c):
    parts = [fmt(a) for a in c["args"]]
    parts += [f"{k}={fmt(v)}" for k, v in c["kwargs"].items()]
    return f"{c['name']}({', '.join(parts)})"
  return " | ".join(call(c) for c in calls)
