"""Shared fixtures."""

import pytest


@pytest.fixture(scope='module')
def fast_compiles():
  """XLA optimisations off for a module: compiling, not running, is what its tests
  spend time on (about 3x faster to compile on CPU). Both sides of every comparison
  compile the same way, so results stay comparable."""
  import jax
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', before)
