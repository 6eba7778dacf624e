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
import pathlib
from typing import Any, Union

import optax

from jaxaccel.errors import SpecError

Spec = Union[str, list, dict]

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
ALLOWED = {name: getattr(optax, name)
           for name in OPTIMIZERS + TRANSFORMS + SCHEDULES
           if hasattr(optax, name)}


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
                   "(allowed: optax optimizers, transforms and schedules)")


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

def _construct(call: dict) -> Any:
  fn = ALLOWED[call["name"]]

  def value(v):
    if isinstance(v, dict) and "name" in v:
      return _construct(v)
    if isinstance(v, dict):   # e.g. piecewise boundaries; JSON/TOML keys are text
      return {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: w
              for k, w in v.items()}
    return v
  args = [value(a) for a in call["args"]]
  kwargs = {k: value(v) for k, v in call["kwargs"].items()}
  for k, v in kwargs.items():
    if k in ("learning_rate", "lr") and isinstance(v, (int, float)) and v < 0:
      raise SpecError(f"{call['name']}: learning_rate must be non-negative; "
                      f"got {v}")
  if args and isinstance(args[0], (int, float)) and not isinstance(
      args[0], bool) and call["name"] in OPTIMIZERS and args[0] < 0:
    raise SpecError(f"{call['name']}: learning_rate must be non-negative; got "
                    f"{args[0]}")
  try:
    return fn(*args, **kwargs)
  except TypeError as e:
    raise SpecError(f"bad arguments to {call['name']} in optimizer spec: "
                    f"{e}") from None


def build(spec: Spec) -> optax.GradientTransformation:
  """Builds the optax transformation a spec describes (a chain if several)."""
  calls = parse(spec)
  parts = [_construct(c) for c in calls]
  for c, p in zip(calls, parts):
    if not isinstance(p, optax.GradientTransformation):
      raise SpecError(f"{c['name']} is a schedule, not a transformation; pass "
                      "it as an argument, e.g. adam(learning_rate="
                      f"{c['name']}(...))")
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


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
