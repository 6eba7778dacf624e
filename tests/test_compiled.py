import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.core import compiled


def test_programs_compile_with_the_cpu_options():
  a = jnp.ones((64, 32)) / 7
  b = jnp.ones((32, 16)) / 3
  program = compiled.jit(lambda a, b: a @ b)
  np.testing.assert_allclose(program(a, b), a @ b, rtol=1e-6)
  if jax.default_backend() != "cpu":
    assert compiled.compiler_options() == {}
    return
  assert compiled.compiler_options() == compiled.CPU_OPTIONS
  text = program.lower(a, b).compile().as_text()
  assert "__ynn_fusion" not in text       # Eigen's dot, not YNNPACK's


def test_pmap_with_options_equals_jax_pmap():
  n = jax.local_device_count()
  x = jnp.arange(n * 6, dtype=jnp.float32).reshape(n, 2, 3)
  f = lambda x: jax.lax.psum(x * 2.0, "d")
  ours = compiled.pmap(f, axis_name="d")
  np.testing.assert_array_equal(ours(x), jax.pmap(f, axis_name="d")(x))
  np.testing.assert_array_equal(ours(x + 1), jax.pmap(f, axis_name="d")(x + 1))
