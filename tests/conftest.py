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


@pytest.fixture(scope='session', autouse=True)
def _private_compilation_cache(tmp_path_factory):
  """Runs launched by the tests use a compilation cache of their own, not the user's
  ~/.cache (bn_research.main turns the cache on by default)."""
  import os
  before = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('jax_cache'))
  yield
  if before is None:
    os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)
  else:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = before
