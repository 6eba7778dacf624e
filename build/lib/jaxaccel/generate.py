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


@functools.lru_cache(maxsize=8)
def _program(model, context: int, temperature: float, top_k: int | None,
             cached: bool):
  """The compiled loop for one model, window and sampling rule."""
  adapter = adapt(model)
  decoder = adapter.module.clone(decode=True) if cached else None

  def run(variables, ids, prompt_length, total, key):
    if cached:
      params = variables["params"]
      shapes = jax.eval_shape(decoder.init, jax.random.key(0), ids[None])
      cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def step(i, carry):
      ids, cache, key = carry
      key, draw = jax.random.split(key)
      if cached:
        logits, updated = decoder.apply(
            {"params": params, "cache": cache},
            jax.lax.dynamic_slice_in_dim(ids, i, 1)[None], mutable=["cache"])
        cache, logits = updated["cache"], logits[0, -1]
      else:
        logits = adapter.logits(variables, ids[None])[0, i]
      token = _sample(logits, draw, temperature, top_k)
      # Prompt positions keep the prompt; later ones take the sample.
      keep = i + 1 < prompt_length
      ids = ids.at[i + 1].set(jnp.where(keep, ids[i + 1], token))
      return ids, cache, key
    ids, _, _ = jax.lax.fori_loop(0, total - 1, step,
                                  (ids, cache if cached else 0, key))
    return ids
  return jax.jit(run)


def generate(model, state_or_variables, prompt: str | bytes, *, tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0, cache: bool = True) -> dict:
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

  Returns:
    {"text": prompt and continuation, "ids": their byte ids, "new_tokens",
    "tokens_per_second"} (the time includes compiling on a first call).
  """
  ids = encode(prompt)
  context = context_of(model)
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
  variables = (variables_of(state_or_variables)
               if isinstance(state_or_variables, TrainState)
               else dict(state_or_variables))
  adapter = adapt(model)
  cached = cache and isinstance(adapter, LinenModel) and _cached(adapter.module)
  run = _program(adapter, context, float(temperature), top_k, cached)
  window = np.zeros(context, np.int32)
  window[:len(ids)] = ids
  total = len(ids) + tokens
  t0 = time.perf_counter()
  out = np.asarray(run(variables, window, len(ids), total,
                       jax.random.key(seed)))[:total]
  seconds = time.perf_counter() - t0
  return {"text": decode(out), "ids": out, "new_tokens": tokens,
          "tokens_per_second": round(tokens / seconds, 2)}
