"""How jaxaccel compiles its own programs: `jit` and `pmap` with XLA options.

The options go to the programs jaxaccel builds (train steps, compiled
epochs, sweeps, evaluation), never to the user's process: nothing here
touches `XLA_FLAGS` or a global config.

On the CPU, XLA hands dots and convolutions to YNNPACK by default. On the
2-core AVX-512 development machine Eigen's kernels were faster for every
shape our models train with (float32, batch 128): LeNet-300-100 train step
+13% steps/s; a 32->64 3x3 convolution on 14x14 maps 10.6 ms forward with
Eigen against 17.3 ms with YNNPACK, its filter gradient 16.2 against 72.7 ms.
So `CPU_OPTIONS` turns YNNPACK off.

Examples:
  >>> import jax.numpy as jnp
  >>> from jaxaccel.core import compiled
  >>> double = compiled.jit(lambda x: 2 * x)
  >>> float(double(jnp.float32(1.5)))
  3.0
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from jaxaccel.backends import CPU_OPTIONS   # no YNNPACK fusions


@functools.cache
def compiler_options() -> dict:
  """The options for this backend: `CPU_OPTIONS` on a CPU whose XLA knows
  them, none elsewhere."""
  if jax.default_backend() != "cpu":
    return {}
  try:   # an XLA without the option refuses it: compile without
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(
        jax.numpy.float32(0)).compile()
  except Exception:   # noqa: BLE001 - any refusal means "not supported"
    return {}
  return dict(CPU_OPTIONS)


def jit(fn: Callable, **kwargs) -> Callable:
  """`jax.jit(fn, **kwargs)` compiled with `compiler_options()`."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


def pmap(fn: Callable, **kwargs) -> Callable:
  """`jax.pmap(fn, **kwargs)` compiled with `compiler_options()`.

  `jax.pmap` takes no compiler options, so each input signature is lowered
  and compiled once, with them, on its first call.
  """
  mapped = jax.pmap(fn, **kwargs)
  options = compiler_options()
  if not options:
    return mapped
  programs = {}

  def call(*args):
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((jax.typeof(a).shape, jax.typeof(a).dtype)
                          for a in leaves))
    if key not in programs:
      programs[key] = mapped.lower(*args).compile(compiler_options=options)
    return programs[key](*args)
  return call
