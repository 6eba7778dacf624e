"""Text from a trained language model: sampling inside one compiled loop.

`generate` feeds the prompt and then its own samples back, one position per
step of a `lax.fori_loop`: every length of prompt and continuation runs the
same compiled program, so no token recompiles anything. A linen model with a
`decode` field (the registry's GPT) keeps its keys and values in a cache and
computes one position per step; any other model (an NNX GPT of your own)
runs its whole window again at each step, which gives the same tokens and
costs more.

Examples:
  >>> import jax, numpy as np
  >>> import jaxaccel as ja
  >>> model = ja.create_model("gpt", num_classes=256, layers=1, heads=2,
  ...                         width=16, context=16)
  >>> variables = model.init(jax.random.key(0), np.zeros((1, 16), np.int32))
  >>> out = ja.generate(model, variables, "ab", tokens=5)
  >>> len(out["ids"]), out["new_tokens"]
  (7, 5)
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.core import TrainState, variables_of
from jaxaccel.errors import ConfigError
from jaxaccel.models import LinenModel, adapt


def encode(prompt: str | bytes) -> np.ndarray:
  """A prompt as byte ids (text is UTF-8 encoded)."""
  raw = prompt.encode() if isinstance(prompt, str) else bytes(prompt)
  return np.frombuffer(raw, np.uint8).astype(np.int32)


def decode(ids) -> str:
  """Byte ids as text (bytes that are not UTF-8 become U+FFFD)."""
  return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", "replace")


def context_of(model) -> int:
  """The longest window a model reads: a `context` field, or an NNX
  module's position table."""
  module = adapt(model).module
  context = getattr(module, "context", None)
  if context is None:
    raise ConfigError("cannot tell the model's context: give it a `context` "
                      "attribute (the longest input it takes)")
  return int(context)


def _sample(logits, key, temperature: float, top_k: int | None):
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


def _cached(module) -> bool:
  return "decode" in getattr(module, "__dataclass_fields__", {})


def has_cache(model) -> bool:
  """Whether the model keeps a key/value cache: a linen model with a
  `decode` field (the registry's GPT)."""
  adapter = adapt(model)
  return isinstance(adapter, LinenModel) and _cached(adapter.module)


def _decoding(model):
  if not has_cache(model):
    raise ConfigError("this model keeps no key/value cache (only a linen "
                      "model with a `decode` field does, such as the "
                      "registry's gpt); train with --model gpt:LAYERS,HEADS,"
                      "WIDTH to decode with one")
  return adapt(model).module.clone(decode=True)


def init_cache(model, batch: int = 1) -> dict:
  """An empty key/value cache of a model with one (`has_cache`) for `batch`
  sequences: each block's keys and values over the whole context, zero, and
  the position the next tokens take (0)."""
  module = _decoding(model)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((batch, 1), jnp.int32))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decoder(model) -> Callable:
  """The model's cached decoder: `(variables, ids, cache) -> (logits,
  cache)`, where ids (n, t) are the t positions after the cached ones
  (a whole prompt, or one token) and logits (n, t, 256) their next-byte
  logits; the returned cache holds them too. Positions past the context
  are the caller's to refuse."""
  module = _decoding(model)

  def run(variables, ids, cache):
    logits, updated = module.apply({**variables, "cache": cache}, ids,
                                   mutable=["cache"])
    return logits, updated["cache"]
  return run


def _loop(next_logits: Callable, empty: Callable, temperature: float,
          top_k: int | None):
  """The compiled loop: `next_logits(variables, ids, i, cache) -> (logits
  of position i + 1, cache)` at each position i, the cache starting as
  `empty()`; prompt positions keep the prompt, later ones take samples."""

  def run(variables, ids, prompt_length, total, key):
    def step(i, carry):
      ids, cache, key = carry
      key, draw = jax.random.split(key)
      logits, cache = next_logits(variables, ids, i, cache)
      token = _sample(logits, draw, temperature, top_k)
      keep = i + 1 < prompt_length
      ids = ids.at[i + 1].set(jnp.where(keep, ids[i + 1], token))
      return ids, cache, key
    ids, _, _ = jax.lax.fori_loop(0, total - 1, step, (ids, empty(), key))
    return ids
  return jax.jit(run)


def _cached_step(step: Callable) -> Callable:
  """next_logits of a cached decoder `step(variables, ids, cache)`: the
  position's byte in, its logits out."""
  def next_logits(variables, ids, i, cache):
    logits, cache = step(variables,
                         jax.lax.dynamic_slice_in_dim(ids, i, 1)[None], cache)
    return logits[0, -1], cache
  return next_logits


@functools.lru_cache(maxsize=8)
def _program(model, temperature: float, top_k: int | None, cached: bool,
             step: Callable | None = None):
  """The compiled loop for one model, sampling rule and decoder."""
  adapter = adapt(model)
  if cached:
    return _loop(_cached_step(step or decoder(adapter)),
                 lambda: init_cache(adapter, 1), temperature, top_k)
  return _loop(lambda variables, ids, i, cache:
               (adapter.logits(variables, ids[None])[0, i], cache),
               lambda: 0, temperature, top_k)


def _run(program, variables, ids: np.ndarray, context: int, tokens: int,
         seed: int) -> dict:
  """Runs a compiled loop on a checked prompt; what `generate` returns."""
  window = np.zeros(context, np.int32)
  window[:len(ids)] = ids
  total = len(ids) + tokens
  t0 = time.perf_counter()
  out = np.asarray(program(variables, window, len(ids), total,
                           jax.random.key(seed)))[:total]
  seconds = time.perf_counter() - t0
  return {"text": decode(out), "ids": out, "new_tokens": tokens,
          "tokens_per_second": round(tokens / seconds, 2)}


def check_request(ids: np.ndarray, context: int, tokens, temperature: float,
                  top_k: int | None) -> None:
  """One-line ConfigErrors for a request that cannot be met: an empty or
  too long prompt, a continuation past the context, a bad sampling rule."""
  if not len(ids):
    raise ConfigError("the prompt is empty: give at least one byte to continue")
  if not isinstance(tokens, int) or tokens < 1:
    raise ConfigError(f"tokens must be a positive whole number; got {tokens!r}")
  if len(ids) >= context:
    raise ConfigError(f"the prompt has {len(ids)} bytes, but the model reads "
                      f"at most {context}: give at most {context - 1} bytes "
                      "and leave room for the tokens to add")
  if len(ids) + tokens > context:
    raise ConfigError(f"the prompt ({len(ids)} bytes) and {tokens} new tokens "
                      f"exceed the model's context of {context}: ask for at "
                      f"most {max(context - len(ids), 0)} tokens or shorten "
                      "the prompt")
  if temperature < 0:
    raise ConfigError(f"temperature must be >= 0; got {temperature}")
  if top_k is not None and not 1 <= top_k <= 256:
    raise ConfigError(f"top_k must lie in [1, 256]; got {top_k}")


def generate(model, state_or_variables, prompt: str | bytes, *, tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0, cache: bool = True,
             step: Callable | None = None) -> dict:
  """Continues `prompt` by `tokens` bytes.

  Args:
    model: the language model (the registry's GPT, or any model taking
      (n, length) ids and giving (n, length, 256) logits with a `context`).
    state_or_variables: a `TrainState` or `{"params": ..., **model_state}`.
    prompt: the text (or bytes) to continue; at least one byte.
    tokens: how many bytes to add; prompt and continuation together fit in
      the model's context.
    temperature: 0 takes the most likely byte (greedy); above 0 samples
      from the softmax of logits / temperature.
    top_k: sample only among the k most likely bytes.
    seed: the sampling key's seed.
    cache: use the model's key/value cache when it has one (a linen model
      with a `decode` field); False runs the whole window at each step.
    step: a cached decoder to run in place of the model's own
      (`decoder(model)`), with its signature `(variables, ids, cache) ->
      (logits, cache)`: an int8 one, say (`compress.int8.convert_function`
      of `decoder(model)`). Give the same object on every call, or each
      call compiles again.

  Returns:
    {"text": prompt and continuation, "ids": their byte ids, "new_tokens",
    "tokens_per_second"} (the time includes compiling on a first call).
  """
  ids = encode(prompt)
  check_request(ids, context_of(model), tokens, temperature, top_k)
  variables = (variables_of(state_or_variables)
               if isinstance(state_or_variables, TrainState)
               else dict(state_or_variables))
  adapter = adapt(model)
  context = context_of(model)
  if step is not None and not has_cache(adapter):
    _decoding(adapter)          # says which models keep a cache
  program = _program(adapter, float(temperature), top_k,
                     bool(step) or (cache and has_cache(adapter)), step)
  return _run(program, variables, ids, context, tokens, seed)


def decoding_loop(step: Callable, empty: Callable, *, temperature: float = 0.0,
                  top_k: int | None = None) -> Callable:
  """`generate`'s compiled loop around any cached decoder `step(ids, cache)
  -> (logits, cache)` that jax can trace (an exported artifact's call),
  its empty cache for one sequence from `empty()`; run it with
  `continue_with`. The same loop, keys and sampling as `generate`, so the
  same weights give the same text."""
  return _loop(_cached_step(lambda _, ids, cache: step(ids, cache)), empty,
               float(temperature), top_k)


def continue_with(loop: Callable, context: int, prompt: str | bytes, *,
                  tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0) -> dict:
  """Continues `prompt` by `tokens` bytes through a `decoding_loop` made
  with the same `temperature` and `top_k`; what `generate` returns."""
  ids = encode(prompt)
  check_request(ids, context, tokens, temperature, top_k)
  return _run(loop, None, ids, context, tokens, seed)
