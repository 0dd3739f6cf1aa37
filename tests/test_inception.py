"""Tests for the BN-Inception model (Experiment 4.2).

The full 224x224 model is only traced with `jax.eval_shape` (shapes and parameter
counts without running it); forward passes use the small-input stem at width 1/8.
On CPU, compile time is what these tests spend, so: variables are filled in with
numpy (`fast_init`) rather than by compiling the model's ~70 threefry initialisers;
inputs come from numpy; forward passes go through one cached `jax.jit` per model
configuration (`forward`), compiled with XLA's optimisations off.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_research.models import inception as inc
from bn_research.models.inception import Inception, count_params

# The paper's appendix table, written out independently of the model's own copy:
# (name, #1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool proj, stride);
# pool proj 0 is a pass-through max pool.
PAPER_ROWS = [
    ('3a', 64, 64, 64, 64, 96, 32, 1),
    ('3b', 64, 64, 96, 64, 96, 64, 1),
    ('3c', 0, 128, 160, 64, 96, 0, 2),
    ('4a', 224, 64, 96, 96, 128, 128, 1),
    ('4b', 192, 96, 128, 96, 128, 128, 1),
    ('4c', 160, 128, 160, 128, 160, 128, 1),
    ('4d', 96, 128, 192, 160, 192, 128, 1),
    ('4e', 0, 128, 192, 192, 256, 0, 2),
    ('5a', 352, 192, 320, 160, 224, 128, 1),
    ('5b', 352, 192, 320, 192, 224, 128, 1),
]
# TF-slim's inception_v2 differs only in the pool projections of 4c and 4d (its
# Mixed_4d and Mixed_4e): 96 instead of 128.
SLIM_ROWS = [r[:6] + (96,) + r[7:] if r[0] in ('4c', '4d') else r for r in PAPER_ROWS]


def expected_params(rows, *, num_classes=1000, bn=True, in_channels=3,
                    bn_gamma=True):
  """Parameter count from the table: conv kernels, plus BN gamma/beta or conv biases."""
  def conv(k, cin, cout):
    per_channel = (2 if bn_gamma else 1) if bn else 1   # gamma+beta, or bias
    return k * k * cin * cout + per_channel * cout

  total = 7 * 7 * in_channels * 8            # depthwise 7x7/2, multiplier 8, no bias
  total += conv(1, in_channels * 8, 64)      # pointwise to 64
  total += conv(1, 64, 64) + conv(3, 64, 192)
  c = 192
  for _, n1, r3, n3, rd, nd, proj, _ in rows:
    if n1:
      total += conv(1, c, n1)
    total += conv(1, c, r3) + conv(3, r3, n3)
    total += conv(1, c, rd) + conv(3, rd, nd) + conv(3, nd, nd)
    if proj:
      total += conv(1, c, proj)
    c = n1 + n3 + nd + (proj if proj else c)
  assert c == 1024
  return total + c * num_classes + num_classes


def abstract_variables(model, shape=(2, 224, 224, 3)):
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


def fast_init(model, x):
  """Variables shaped as `model.init` makes them, filled in with numpy (no threefry).

  Kernels ~ N(0, 1/fan_in), BN gamma and moving variance 1, everything else 0.
  """
  shapes = abstract_variables(model, x.shape)
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      std = 1.0 / np.sqrt(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.normal(size=s.shape) * std, s.dtype)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return jnp.ones(s.shape, s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def paths(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


SMALL = dict(small_inputs=True, width_multiplier=0.125, num_classes=10)


def small_batch(n=4, size=32, channels=3):
  rng = np.random.default_rng(1)
  return jnp.asarray(rng.normal(size=(n, size, size, channels)), jnp.float32)


pytestmark = pytest.mark.usefixtures('fast_compiles')


@functools.lru_cache(maxsize=None)
def _jitted_apply(config, train, capture):
  model = Inception(**dict(config))
  mutable = ['batch_stats'] if train and model.normalizer != 'none' else []
  if capture:
    mutable.append('intermediates')
  only_conv_units = lambda mdl, _: isinstance(mdl, inc.ConvUnit)

  def apply(variables, x, rngs):
    out = model.apply(variables, x, train=train, rngs=rngs, mutable=mutable or False,
                      capture_intermediates=only_conv_units if capture else False)
    return out if mutable else (out, {})

  return jax.jit(apply)


def forward(model, variables, x, *, train=False, rngs=None, capture=False):
  """(logits, mutated collections), through one compiled function per configuration."""
  config = tuple((f.name, getattr(model, f.name)) for f in dataclasses.fields(Inception)
                 if f.name not in ('parent', 'name'))
  return _jitted_apply(config, train, capture)(variables, x, rngs or {})


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize('table', ['paper', 'tf_slim'])
def test_full_size_shapes(table):
  model = Inception(table=table)
  x = jnp.zeros((2, 224, 224, 3))
  variables = abstract_variables(model)
  logits, inter = jax.eval_shape(
      lambda v: model.apply(v, x, train=False, capture_intermediates=True), variables)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  out = {k: v['__call__'][0].shape for k, v in inter['intermediates'].items()
         if k.startswith('inception_')}
  assert out['inception_3a'] == (2, 28, 28, 256)
  assert out['inception_3b'] == (2, 28, 28, 320)
  assert out['inception_3c'] == (2, 14, 14, 576)
  assert out['inception_4a'] == (2, 14, 14, 576)
  # The table's output column says 576 for 4c/4d; its filter counts give 608 (slim: 576).
  assert out['inception_4d'][-1] == (608 if table == 'paper' else 576)
  assert out['inception_4e'][:3] == (2, 7, 7)
  assert out['inception_5b'] == (2, 7, 7, 1024)


def test_small_inputs_forward_32_and_28():
  model = Inception(**SMALL)
  x = small_batch()
  variables = fast_init(model, x)
  logits, _ = forward(model, variables, x)
  assert logits.shape == (4, 10)
  assert np.all(np.isfinite(logits))
  # 28x28 grayscale (MNIST-sized) also reaches the final pool (7x7 there).
  x28 = small_batch(size=28, channels=1)
  v28 = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x28, train=False))
  assert jax.eval_shape(lambda v: model.apply(v, x28, train=False), v28).shape == (4, 10)


def test_bfloat16_trains_with_float32_params_and_tracks_float32():
  """Three gradient steps on one fixed batch in bfloat16: the loss falls, parameters and
  statistics stay float32, every convolution unit's output is bf16 (it really computes
  in bf16), and the first loss is within 0.05 nats of float32's (bf16 keeps 8 mantissa
  bits: 2-3 significant digits per convolution)."""
  from tests import helpers
  x = small_batch()
  labels = np.array([0, 1, 2, 3])
  start = fast_init(Inception(**SMALL), x)
  losses, trained = helpers.train_few_steps(Inception(dtype=jnp.bfloat16, **SMALL), x,
                                            jnp.asarray(labels), learning_rate=0.02,
                                            variables=start)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert {l.dtype for l in jax.tree_util.tree_leaves(trained)} == {jnp.dtype(jnp.float32)}
  # float32's loss at the same variables, in float64 NumPy from float32 training logits.
  logits = np.asarray(forward(Inception(**SMALL), start, x, train=True)[0], np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  f32_loss = -log_p[np.arange(4), labels].mean()
  assert losses[0] == pytest.approx(f32_loss, abs=0.05)
  model = Inception(dtype=jnp.bfloat16, **SMALL)
  _, state = jax.eval_shape(lambda v: model.apply(
      v, x, train=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: isinstance(mdl, inc.ConvUnit)), trained)
  outs = jax.tree_util.tree_leaves(state['intermediates'])
  assert len(outs) > 50 and {o.dtype for o in outs} == {jnp.dtype(jnp.bfloat16)}


# ------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize('table,rows', [('paper', PAPER_ROWS), ('tf_slim', SLIM_ROWS)])
@pytest.mark.parametrize('normalizer', ['batch_norm', 'none'])
def test_param_count_matches_table(table, rows, normalizer):
  model = Inception(table=table, normalizer=normalizer)
  got = count_params(abstract_variables(model)['params'])
  assert got == expected_params(rows, bn=normalizer != 'none')


def test_param_count_values():
  # Pinned so that a change in the architecture shows up as a changed number.
  assert expected_params(PAPER_ROWS) == 11_278_528
  assert expected_params(SLIM_ROWS) == 11_188_288
  # Slim's own convention (beta only, 1001 logits) is ~11.2M, as its checkpoints have.
  assert expected_params(SLIM_ROWS, num_classes=1001, bn_gamma=False) == 11_179_361


def test_width_multiplier_scales_every_conv():
  assert inc.scaled_width(64, 0.5) == 32
  assert inc.scaled_width(64, 0.01) == inc.MIN_WIDTH
  assert inc.scaled_width(0, 0.5) == 0
  full = count_params(abstract_variables(Inception())['params'])
  half = count_params(abstract_variables(Inception(width_multiplier=0.5))['params'])
  assert half < 0.4 * full


# ------------------------------------------------------------------ BN / none switch


def test_batch_norm_has_stats_and_no_conv_biases():
  variables = abstract_variables(Inception(**SMALL), (2, 32, 32, 3))
  assert 'batch_stats' in variables
  p = paths(variables['params'])
  assert not [k for k in p if "['conv']['bias']" in k]
  assert [k for k in p if "['bn']['scale']" in k]
  n_bn = len([k for k in p if "['bn']['scale']" in k])
  assert n_bn == len([k for k in p if "['conv']['kernel']" in k])
  assert len(paths(variables['batch_stats'])) == 2 * n_bn


def test_none_has_conv_biases_and_no_stats():
  variables = abstract_variables(Inception(normalizer='none', **SMALL), (2, 32, 32, 3))
  assert set(variables) == {'params'}
  p = paths(variables['params'])
  assert not [k for k in p if "['bn']" in k]
  kernels = [k for k in p if "['conv']['kernel']" in k]
  biases = [k for k in p if "['conv']['bias']" in k]
  assert kernels and len(biases) == len(kernels)


def test_batch_norm_train_updates_stats_and_eval_uses_them():
  model = Inception(**SMALL)
  x = small_batch()
  variables = fast_init(model, x)
  train_logits, updates = forward(model, variables, x, train=True)
  before = jax.tree_util.tree_leaves(variables['batch_stats'])
  after = jax.tree_util.tree_leaves(updates['batch_stats'])
  assert all(not np.allclose(a, b) for a, b in zip(before, after))
  eval_old, _ = forward(model, variables, x)
  eval_new, _ = forward(model, {**variables, 'batch_stats': updates['batch_stats']}, x)
  assert not np.allclose(eval_old, eval_new)
  assert not np.allclose(train_logits, eval_old)


def test_virtual_batch_norm_is_batch_norm_per_ghost_batch_and_trains():
  """Ghost batches of 2 in a batch of 4: the training-mode logits are those of plain
  batch norm applied to each half separately (an independent path through the same
  weights), and a few gradient steps on a fixed batch lower the loss."""
  from tests import helpers
  x = small_batch()
  model = Inception(normalizer='virtual_batch_norm', virtual_batch_size=2, **SMALL)
  plain = Inception(**SMALL)
  variables = fast_init(plain, x)
  ghost, _ = forward(model, variables, x, train=True)
  halves = [forward(plain, variables, x[i:i + 2], train=True)[0] for i in (0, 2)]
  np.testing.assert_allclose(ghost, np.concatenate(halves), rtol=1e-4, atol=1e-5)
  whole, _ = forward(plain, variables, x, train=True)
  assert not np.allclose(ghost, whole, rtol=1e-3)  # statistics of 2 are not those of 4
  labels = jnp.asarray([0, 1, 2, 3])
  losses, _ = helpers.train_few_steps(model, x, labels, learning_rate=0.02,
                                      variables=variables)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  with pytest.raises(ValueError, match='virtual_batch_size=3'):
    forward(Inception(normalizer='virtual_batch_norm', virtual_batch_size=3, **SMALL),
            variables, x, train=True)


# --------------------------------------------------------------- activation switch


def conv_unit_outputs(model, x):
  """(logits, outputs of every ConvUnit) for one inference-mode forward pass."""
  variables = fast_init(model, x)
  # Inference mode: with N(0, 1/fan_in) kernels pre-activations stay O(1) with or
  # without BN's statistics.
  logits, state = forward(model, variables, x, capture=True)
  outs = jax.tree_util.tree_leaves(state['intermediates'])
  assert len(outs) > 50
  return logits, outs


def test_activation_switch():
  x = small_batch()
  sig_logits, sig = conv_unit_outputs(Inception(activation='sigmoid', **SMALL), x)
  assert all(float(jnp.min(o)) > 0.0 and float(jnp.max(o)) < 1.0 for o in sig)
  relu_logits, relu = conv_unit_outputs(Inception(activation='relu', **SMALL), x)
  assert all(float(jnp.min(o)) == 0.0 for o in relu)   # about half are cut
  assert any(float(jnp.max(o)) > 1.0 for o in relu)
  assert not np.allclose(sig_logits, relu_logits)


# -------------------------------------------------------------------------- dropout


def test_dropout_only_in_training_with_rng():
  model = Inception(normalizer='none', dropout_rate=0.5, **SMALL)
  x = small_batch()
  variables = fast_init(model, x)
  eval1, _ = forward(model, variables, x)
  eval2, _ = forward(model, variables, x)
  np.testing.assert_array_equal(eval1, eval2)
  # 'rbg' keys: threefry's bit generator takes seconds to compile on CPU.
  key = lambda seed: jax.random.key(seed, impl='rbg')
  train1, _ = forward(model, variables, x, train=True, rngs={'dropout': key(1)})
  train2, _ = forward(model, variables, x, train=True, rngs={'dropout': key(2)})
  assert not np.allclose(train1, eval1)
  assert not np.allclose(train1, train2)
  with pytest.raises(Exception, match='dropout'):
    forward(model, variables, x, train=True)
  # Without dropout (and without BN), training and inference agree.
  plain = Inception(normalizer='none', **SMALL)
  np.testing.assert_allclose(forward(plain, variables, x, train=True)[0],
                             forward(plain, variables, x)[0], rtol=1e-6)


# ------------------------------------------------------------------------------ LRN


def test_local_response_normalization_matches_loop():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 3, 7)) * 3.0, jnp.float32)
  size, alpha, beta, bias = 5, 1e-2, 0.75, 1.0
  got = inc.local_response_normalization(x, size=size, alpha=alpha, beta=beta, bias=bias)
  xn = np.asarray(x, np.float64)
  want = np.empty_like(xn)
  for c in range(7):
    lo, hi = max(0, c - 2), min(7, c + 3)
    s = np.sum(xn[..., lo:hi] ** 2, axis=-1)
    want[..., c] = xn[..., c] / (bias + alpha / size * s) ** beta
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_use_lrn_changes_outputs_not_params():
  x = small_batch() * 10.0
  plain, with_lrn = Inception(**SMALL), Inception(use_lrn=True, **SMALL)
  variables = fast_init(plain, x)
  v_lrn = abstract_variables(with_lrn, x.shape)
  assert count_params(variables['params']) == count_params(v_lrn['params'])
  a, _ = forward(plain, variables, x)
  b, _ = forward(with_lrn, variables, x)
  assert not np.allclose(a, b)


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize('kwargs,bad', [
    (dict(activation='tanh'), 'tanh'),
    (dict(normalizer='weight_norm'), 'weight_norm'),
    (dict(dropout_rate=1.0), '1.0'),
    (dict(dropout_rate=-0.1), '-0.1'),
    (dict(width_multiplier=0.0), '0.0'),
    (dict(width_multiplier=-1.0), '-1.0'),
    (dict(num_classes=0), '0'),
    (dict(table='v3'), 'v3'),
    (dict(normalizer='virtual_batch_norm'), 'virtual_batch_size'),
])
def test_bad_options_raise(kwargs, bad):
  with pytest.raises(ValueError, match=bad):
    Inception(**kwargs)


def test_count_params_counts_scalars():
  tree = {'a': jnp.zeros((3, 4)), 'b': {'c': jnp.zeros(5)},
          'd': jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  assert count_params(tree) == 21
