"""Shared fixtures, the session's compilation cache and the `slow` marker."""

import os
import shutil
import signal
import sys
import tempfile

import pytest

# ------------------------------------------------------------- SIGINT
#
# A suite started in the background of a shell without job control (`cmd &`, nohup, some
# CI runners) inherits SIGINT ignored, and so would every process the tests start: the
# tests that stop a run with SIGINT would wait for a stop that never comes (the library
# rightly keeps an inherited "ignore"). SIGINT gets its default back here, before any test
# starts a process: Python's KeyboardInterrupt in this process, and the default
# disposition in the processes the tests start (exec resets a handled signal, while an
# ignored one stays ignored).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

# ------------------------------------------------------------- compilation cache
#
# One persistent JAX compilation cache for the whole session, in a new temporary
# directory (removed at the end): a program compiled by one test (the tiny MLP's
# training chunk, its evaluation, an Inception step) is loaded from disk by every later
# test and by every process the tests start, instead of compiled again. The cache is
# empty when a session starts, so a fresh clone compiles everything itself; its keys
# cover the program, the compile options (XLA's optimisation level included), the
# devices and the JAX version, so a program is never taken for another. Set here, at
# import, because JAX reads these variables when it is imported (the test modules
# import it after this file); processes the tests start inherit them.
_CACHE_DIR = tempfile.mkdtemp(prefix='bn_research_tests_jax_cache_')
_CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': _CACHE_DIR,
              # Every program, however quick to compile: the small ones add up.
              'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
              'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
_ENV_BEFORE = {k: os.environ.get(k) for k in _CACHE_ENV}
os.environ.update(_CACHE_ENV)
if 'jax' in sys.modules:  # imported first by a plugin: its config already read the env
  from bn_research import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable(_CACHE_DIR)


def pytest_unconfigure(config):
  del config
  for key, value in _ENV_BEFORE.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  shutil.rmtree(_CACHE_DIR, ignore_errors=True)


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
                 'test_conv_bn_regularization', 'test_input_normalization',
                 'test_multiprocess_stream')


# Tests of the fast modules that still took 8 s or more each with `-m 'not slow'
# --durations=0` on a 2-core CPU shared with other jobs (load about 20): large float64
# finite-difference checks, building every normalizer into both networks, whole-dataset
# readers. Named by function (every parametrisation).
_SLOW_TESTS = frozenset({
    'test_mlp_measurement_matches_layer_by_layer_replacement',
    'test_check_grads_numerically_float64',
    'test_offline_reader_matches_mlxtends_own_loader',
    'test_every_normalizer_builds_both_models',
    'test_every_key_refuses_its_bad_values',
    'test_group_norm_gradients_float64',
    'test_group_norm_module_is_per_example_and_batch_free',
    'test_group_norm_matches_numpy',
    'test_renorm_gradient_treats_r_and_d_as_constants_float64',
    'test_summary_means_and_comparison_from_run_directories',
    'test_inception_layers_are_stem_units_modules_and_classifier',
    'test_agrees_with_flax_batch_norm',
    'test_restore_latest_good_skips_a_damaged_latest_checkpoint',
    'test_moving_averages_follow_the_recurrence',
    'test_group_norm_extremes_are_instance_and_layer_norm',
    'test_check_grads_batch_moments_float64',
    'test_estimate_population_statistics_dense_model',
    'test_renorm_with_r_max_1_d_max_0_is_batch_norm_exactly',
    'test_other_reduction_layouts',
    'test_noisy_distortion_has_the_configured_distribution',
    'test_virtual_batches_are_normalized_separately',
    'test_all_constant_input',
    'test_scale_and_bias_none_mean_gamma_one_beta_zero',
    'test_renorm_schedule_limits_and_step_counter',
    'test_init_leaves_default_statistics_and_collects_no_moments',
    'test_offline_split',
    'test_virtual_batch_of_the_whole_batch_is_plain_batch_norm',
    # 3.5 CPU seconds or more each (10 s or more of wall time) in `-m 'not slow'` on the
    # 2-core CPU at load about 8: compiled image pipelines, worker processes, engine
    # runs inside helpers the body does not name.
    'test_train_batch_on_the_device_is_distortion_then_normalisation',
    'test_stream_input_materializes_float_batches_inside_jit',
    'test_every_saved_checkpoint_is_sealed_with_the_sha256_of_its_files',
    'test_jacobian_singular_values_match_finite_differences',
    'test_centre_crop_is_the_engines_evaluation_with_either_statistics',
    'test_worker_processes_give_the_in_process_stream_and_resume_exactly',
    'test_pre_normalization_bias_gets_a_gradient_only_without_the_statistics',
    'test_reduced_distortions_change_pixels_less_than_full',
    'test_refusals_are_one_line_and_write_nothing',
    'test_population_statistics_of_streamed_data_equal_the_in_memory_ones',
    'test_an_error_in_a_worker_process_reaches_the_training_loop',
})


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
    if (module in _SLOW_MODULES or getattr(item, 'originalname', item.name) in _SLOW_TESTS
        or _calls_something_slow(item)):
      item.add_marker(pytest.mark.slow)
