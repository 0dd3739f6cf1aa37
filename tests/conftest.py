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


# ---------------------------------------------------------------- the `slow` marker
#
# `python -m pytest -q -m 'not slow'` runs the fast majority (pure functions against
# NumPy references, parsers, readers); `python -m pytest -q` runs everything. A test is
# slow when it trains a network, starts a process or compiles a large one: found from
# what its body calls, so that a new test of that kind is marked without a list to keep,
# plus the modules whose fixtures or helpers do the training (the call is not in the
# test's own body there). `pytest.mark.slow` on a test or module marks it too.
_SLOW_CALLS = ('train_and_evaluate', 'train_members', 'run_main(', 'run_module(',
               'run_python(', 'subprocess.', '_launch(', 'lock_holder(', '.run(str(tmp_path)',
               'sweep_lib.sweep(', 'sweep.sweep(', '_train(')
_SLOW_MODULES = ('test_inception', 'test_vmap_sweep', 'test_normalization_pmap',
                 'test_mnist_lr_sweep', 'test_mnist_figure1', 'test_population_eval',
                 'test_normalizer_experiments', 'test_bn_only', 'test_ablation_configs',
                 'test_conv_bn_regularization', 'test_input_normalization')


def _calls_something_slow(item) -> bool:
  import inspect  # pylint: disable=g-import-not-at-top
  try:
    source = inspect.getsource(item.function)
  except (OSError, TypeError):
    return False
  return any(call in source for call in _SLOW_CALLS)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    module = item.module.__name__.rsplit('.', 1)[-1] if item.module else ''
    if module in _SLOW_MODULES or _calls_something_slow(item):
      item.add_marker(pytest.mark.slow)
