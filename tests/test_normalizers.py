"""The normalizers BN is compared with: batch renorm, group / layer norm, noisy BN.

Oracles: float64 NumPy transcriptions of each paper's transform (Ioffe 2017's r/d
clipping, Wu & He 2018's group statistics, instance and layer norm written out
separately), BN itself where a normalizer must reduce to it exactly, and the stated
properties of noisy BN's distortion (its distribution's moments, a new draw each step,
the identity at inference).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from jax.test_util import check_grads

from bn_research import normalization as norm
from bn_research.config import base_config, validate_config
from bn_research import models

EPS = 1e-5
LAYOUTS = {'dense': ((12, 5), (0,)), 'conv': ((4, 3, 2, 6), (0, 1, 2))}

pytestmark = pytest.mark.usefixtures('fast_compiles')


def data(seed, shape):
  """Activations with per-feature offsets and spreads, gamma (some negative), beta."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = rng.uniform(-3, 3, c) + rng.uniform(0.3, 3.0, c) * rng.normal(size=shape)
  gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
  beta = rng.normal(size=c)
  return x.astype(np.float32), gamma.astype(np.float32), beta.astype(np.float32)


# Training-mode outputs, (params, input) gradients of sum(y * w) and batch_stats.
train_steps = functools.partial(helpers.normalizer_train_steps, cotangent_seed=9)


# ----------------------------------------------------------------------------------
# Batch renormalization.


def np_renorm(x, gamma, beta, mean, var, axes, r_max, d_max, eps=EPS):
  """Ioffe (2017), Algorithm 1, in float64: (y, r, d)."""
  x = np.asarray(x, np.float64)
  mu_b = x.mean(axis=axes)
  sigma_b = np.sqrt(x.var(axis=axes) + eps)
  sigma = np.sqrt(np.asarray(var, np.float64) + eps)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mu_b - mean) / sigma, -d_max, d_max)
  xhat = (x - mu_b) / sigma_b * r + d
  return gamma * xhat + beta, r, d


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_renorm_matches_numpy_with_clipping(layout):
  shape, axes = LAYOUTS[layout]
  x, gamma, beta = data(0, shape)
  c = shape[-1]
  # Moving averages chosen so that some features clip r (too small / too large sigma),
  # some clip d, some neither.
  mean = np.asarray(x.mean(axis=axes) + np.linspace(-6, 6, c) * x.std(axis=axes), np.float32)
  var = np.asarray(x.var(axis=axes) * np.geomspace(0.05, 20, c), np.float32)
  r_max, d_max = 2.0, 1.5
  y, bmean, bvar = norm.batch_renorm(jnp.asarray(x), gamma, beta, mean, var, axes=axes,
                                     epsilon=EPS, r_max=r_max, d_max=d_max)
  y_ref, r_ref, d_ref = np_renorm(x, gamma, beta, mean, var, axes, r_max, d_max)
  assert np.any(np.abs(r_ref) == r_max) and np.any(r_ref == 1 / r_max)
  assert np.any(np.abs(d_ref) == d_max) and np.any(np.abs(d_ref) < d_max)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(bmean, x.astype(np.float64).mean(axis=axes), rtol=1e-5, atol=1e-5)
  r, d = norm.renorm_correction(bmean, bvar, mean, var, epsilon=EPS, r_max=r_max, d_max=d_max)
  np.testing.assert_allclose(r, r_ref, rtol=1e-5)
  np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)


def test_renorm_gradient_treats_r_and_d_as_constants_float64():
  """Numerical derivative of the NumPy transform with r, d frozen at their values."""
  shape, axes = (6, 3), (0,)
  x, gamma, beta = (a.astype(np.float64) for a in data(1, shape))
  mean, var = np.array([0.5, -3.0, 0.0]), np.array([0.2, 9.0, 1.0])
  w = np.random.default_rng(2).normal(size=shape)
  _, r0, d0 = np_renorm(x, gamma, beta, mean, var, axes, 2.0, 1.0)

  def np_loss(x):
    mu_b, sigma_b = x.mean(0), np.sqrt(x.var(0) + EPS)
    return np.sum(w * (gamma * ((x - mu_b) / sigma_b * r0 + d0) + beta))

  h = 1e-6
  numeric = np.zeros(shape)
  for i in np.ndindex(shape):
    e = np.zeros(shape)
    e[i] = h
    numeric[i] = (np_loss(x + e) - np_loss(x - e)) / (2 * h)
  with jax.enable_x64(True):
    grad = jax.grad(lambda x: jnp.sum(w * norm.batch_renorm(
        x, gamma, beta, mean, var, axes=axes, epsilon=EPS, r_max=2.0, d_max=1.0)[0]))(x)
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('vbs', [None, 2])
def test_renorm_with_r_max_1_d_max_0_is_batch_norm_exactly(layout, vbs):
  """Values, gradients and moving averages, bit for bit, over several steps."""
  shape, _ = LAYOUTS[layout]
  xs = [data(s, shape)[0] * (s + 1) + s for s in range(3)]
  kw = dict(momentum=0.7, virtual_batch_size=vbs)
  bn = norm.BatchNorm(**kw)
  # Relaxed limits that have not started yet, and limits that never relax.
  for schedule in (norm.RenormSchedule(start_step=10), norm.RenormSchedule(1.0, 0.0, 0, 0)):
    rn = norm.BatchRenorm(renorm=schedule, **kw)
    _, outs_bn, stats_bn = train_steps(bn, xs)
    _, outs_rn, stats_rn = train_steps(rn, xs)
    for (y_bn, g_bn), (y_rn, g_rn) in zip(outs_bn, outs_rn):
      np.testing.assert_array_equal(y_rn, y_bn)
      jax.tree_util.tree_map(np.testing.assert_array_equal, g_rn, g_bn)
    np.testing.assert_array_equal(stats_rn['mean'], stats_bn['mean'])
    np.testing.assert_array_equal(stats_rn['var'], stats_bn['var'])
    assert stats_rn['step'] == len(xs)


def test_renorm_schedule_limits_and_step_counter():
  s = norm.RenormSchedule(r_max=3.0, d_max=5.0, start_step=2, ramp_steps=4)
  for step, frac in [(0, 0), (2, 0), (3, 0.25), (5, 0.75), (6, 1), (100, 1)]:
    r_max, d_max = s.limits(step)
    np.testing.assert_allclose([r_max, d_max], [1 + 2 * frac, 5 * frac], rtol=1e-6)
  jump = norm.RenormSchedule(start_step=3, ramp_steps=0)
  assert [float(jump.limits(t)[0]) for t in (2, 3)] == [1.0, 3.0]

  # The module uses the limits of its own step count: steps 0 and 1 are BN, step 2
  # (limits fully relaxed) is the float64 reference with the moving averages then.
  shape, axes = LAYOUTS['dense']
  xs = [data(s, shape)[0] * (1 + 2 * s) + 3 * s for s in range(3)]
  rn = norm.BatchRenorm(renorm=norm.RenormSchedule(3.0, 5.0, 2, 0), momentum=0.5)
  params, outs, stats = train_steps(rn, xs)
  _, outs_bn, _ = train_steps(norm.BatchNorm(momentum=0.5), xs)
  np.testing.assert_array_equal(outs[1][0], outs_bn[1][0])
  mean, var = np.zeros(shape[-1]), np.ones(shape[-1])
  m = shape[0]
  for x in xs[:2]:
    mean = 0.5 * mean + 0.5 * x.astype(np.float64).mean(0)
    var = 0.5 * var + 0.5 * x.astype(np.float64).var(0) * m / (m - 1)
  y_ref, r_ref, _ = np_renorm(xs[2], params['scale'], params['bias'], mean, var, axes, 3.0, 5.0)
  assert not np.allclose(r_ref, 1.0)
  np.testing.assert_allclose(outs[2][0], y_ref, rtol=1e-4, atol=1e-4)
  assert stats['step'] == 3


def test_renorm_inference_is_batch_norm_with_moving_averages():
  shape, _ = LAYOUTS['conv']
  xs = [data(s, shape)[0] + s for s in range(3)]
  rn = norm.BatchRenorm(renorm=norm.RenormSchedule(2.0, 1.0, 1, 1), momentum=0.6)
  params, _, stats = train_steps(rn, xs)
  x = jnp.asarray(data(7, shape)[0])
  y = rn.apply({'params': params, 'batch_stats': stats}, x, use_running_average=True)
  y_bn = norm.BatchNorm().apply({'params': params, 'batch_stats': {
      'mean': stats['mean'], 'var': stats['var']}}, x, use_running_average=True)
  np.testing.assert_array_equal(y, y_bn)
  # Population statistics (mean and var only) can replace the moving averages.
  y_pop = rn.apply({'params': params, 'batch_stats': {'mean': stats['mean'], 'var': stats['var']}},
                   x, use_running_average=True)
  np.testing.assert_array_equal(y_pop, y)


# ----------------------------------------------------------------------------------
# Group and layer normalization.


def np_group_norm(x, gamma, beta, groups, eps=EPS):
  x = np.asarray(x, np.float64)
  n, c = x.shape[0], x.shape[-1]
  xg = x.reshape(n, -1, groups, c // groups)          # (N, spatial, G, C/G)
  mu = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  return ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta


def np_instance_norm(x, gamma, beta, eps=EPS):
  """Per example and channel over the spatial axes (Ulyanov et al. 2016)."""
  x = np.asarray(x, np.float64)
  mu = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * gamma + beta


def np_layer_norm(x, gamma, beta, eps=EPS):
  """Per example over all of its activations (H, W, C)."""
  x = np.asarray(x, np.float64)
  axes = tuple(range(1, x.ndim))
  mu = x.mean(axis=axes, keepdims=True)
  var = x.var(axis=axes, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_group_norm_matches_numpy(layout):
  shape = {'dense': (5, 12), 'conv': (3, 4, 2, 6)}[layout]
  x, gamma, beta = data(3, shape)
  for g in (1, 2, 3, 6):
    np.testing.assert_allclose(norm.group_norm(jnp.asarray(x), gamma, beta, num_groups=g,
                                               epsilon=EPS),
                               np_group_norm(x, gamma, beta, g), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(norm.layer_norm(jnp.asarray(x), gamma, beta, epsilon=EPS),
                             np_layer_norm(x, gamma, beta), rtol=1e-4, atol=1e-4)
  with jax.enable_x64(True):
    y = norm.group_norm(jnp.asarray(x, jnp.float64), gamma.astype(np.float64),
                        beta.astype(np.float64), num_groups=2, epsilon=EPS)
    np.testing.assert_allclose(y, np_group_norm(x, gamma, beta, 2), rtol=1e-12, atol=1e-12)


def test_group_norm_extremes_are_instance_and_layer_norm():
  x, gamma, beta = data(4, (3, 5, 4, 6))
  np.testing.assert_allclose(
      norm.group_norm(jnp.asarray(x), gamma, beta, num_groups=6, epsilon=EPS),
      np_instance_norm(x, gamma, beta), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      norm.group_norm(jnp.asarray(x), gamma, beta, num_groups=1, epsilon=EPS),
      np_layer_norm(x, gamma, beta), rtol=1e-4, atol=1e-4)


def test_group_norm_gradients_float64():
  with jax.enable_x64(True):
    x, gamma, beta = (a.astype(np.float64) for a in data(5, (2, 3, 2, 4)))
    check_grads(lambda x, g, b: norm.group_norm(x, g, b, num_groups=2, epsilon=1e-3),
                (x, gamma, beta), order=1, modes=['rev'], atol=1e-5, rtol=1e-5)


def test_group_norm_module_is_per_example_and_batch_free():
  x, _, _ = data(6, (4, 3, 3, 8))
  module = norm.GroupNorm(num_groups=4)
  variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
  assert set(variables) == {'params'}
  assert {k: v.shape for k, v in variables['params'].items()} == {'scale': (8,), 'bias': (8,)}
  y = module.apply(variables, jnp.asarray(x))
  # Each example's output does not depend on the rest of the batch.
  np.testing.assert_allclose(module.apply(variables, jnp.asarray(x[:1])), y[:1], rtol=1e-6,
                             atol=1e-6)
  ln = norm.LayerNorm().apply(variables, jnp.asarray(x))
  np.testing.assert_allclose(ln, np_layer_norm(x, 1.0, 0.0), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=re.escape('num_groups=3')):
    norm.group_norm(jnp.asarray(x), None, None, num_groups=3, epsilon=EPS)


# ----------------------------------------------------------------------------------
# Noisy BN.


def test_noisy_distortion_has_the_configured_distribution():
  n, strength = 4000, 0.8
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  s, b = jax.vmap(lambda k: norm.sample_distortion(k, 3, strength))(keys)
  s, b = np.asarray(s, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  # U(1, 1 + n) and U(-n, n): means and variances in closed form, within ~5 standard errors.
  for v, mean, var in ((s, 1 + strength / 2, strength ** 2 / 12),
                       (b, 0.0, strength ** 2 / 3)):
    se = np.sqrt(var / v.size)
    assert abs(v.mean() - mean) < 5 * se
    assert abs(v.var() - var) < 0.05 * var
  assert s.min() >= 1 and s.max() <= 1 + strength and np.abs(b).max() <= strength


def test_noisy_batch_norm_shifts_every_step_and_is_identity_at_inference():
  x, _, _ = data(8, (16, 5))
  x = jnp.asarray(x)
  noisy = norm.NoisyBatchNorm(noise=0.5)
  variables = noisy.init(jax.random.PRNGKey(0), x, use_running_average=True)

  def train(step):
    rng = jax.random.fold_in(jax.random.PRNGKey(1), step)  # as the engine folds its step
    return noisy.apply(variables, x, use_running_average=False, mutable=['batch_stats'],
                       rngs={'dropout': rng})

  y_bn, upd_bn = norm.BatchNorm().apply(variables, x, use_running_average=False,
                                        mutable=['batch_stats'])
  outs = []
  for step in range(3):
    y, upd = train(step)
    # The same moving averages as BN, and per unit an affine map of BN's output whose
    # batch mean (b) is non-zero and variance (s^2) above one.
    jax.tree_util.tree_map(np.testing.assert_array_equal, upd, upd_bn)
    mean, std = np.asarray(y).mean(0), np.asarray(y).std(0)
    assert np.all(np.abs(mean) > 0) and np.all(std > 1.0)
    np.testing.assert_allclose((y - mean) / std, y_bn / np.asarray(y_bn).std(0), atol=1e-4)
    outs.append(np.asarray(y))
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
  np.testing.assert_array_equal(train(1)[0], outs[1])  # the step's key decides the draw
  # Without the rng (Algorithm 2's population passes) the training pass is BN's.
  np.testing.assert_array_equal(
      noisy.apply(variables, x, use_running_average=False, mutable=['batch_stats'])[0], y_bn)
  np.testing.assert_array_equal(
      noisy.apply(variables, x, use_running_average=True),
      norm.BatchNorm().apply(variables, x, use_running_average=True))


# ----------------------------------------------------------------------------------
# By name, in the models, and the config keys.


def test_get_normalizer_by_name():
  assert isinstance(norm.get_normalizer('batch_renorm')(), norm.BatchRenorm)
  assert norm.get_normalizer('batch_renorm')().renorm == norm.RenormSchedule()
  assert norm.get_normalizer('noisy_batch_norm', noise=0.3)().noise == 0.3
  assert norm.get_normalizer('group_norm', num_groups=4)().num_groups == 4
  assert isinstance(norm.get_normalizer('layer_norm')(), norm.LayerNorm)
  with pytest.raises(ValueError, match='virtual_batch_size=4'):
    norm.get_normalizer('layer_norm', virtual_batch_size=4)
  with pytest.raises(ValueError, match='noise=0'):
    norm.get_normalizer('noisy_batch_norm', noise=0)
  with pytest.raises(ValueError, match=re.escape('r_max=0.5')):
    norm.RenormSchedule(r_max=0.5)


def mlp_config(normalizer, **model):
  c = base_config()
  c.model.normalizer = normalizer
  c.model.hidden_sizes = (8, 12)
  c.model.norm_groups = 4
  c.model.update(model)
  return c


@pytest.mark.parametrize('name', [n for n in norm.NORMALIZERS if n != 'virtual_batch_norm'])
def test_every_normalizer_builds_both_models(name):
  from bn_research.models.inception import Inception
  c = mlp_config(name)
  validate_config(c)
  mlp = models.build_model(c.model, num_classes=3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
  variables = mlp.init({'params': jax.random.PRNGKey(0)}, x, train=False)
  y, _ = mlp.apply(variables, x, train=True, mutable=['batch_stats'],
                   rngs={'dropout': jax.random.PRNGKey(1)})
  assert y.shape == (4, 3) and np.all(np.isfinite(y))
  dense = variables['params']['dense_0']
  assert ('bias' in dense) == (name == 'none')  # a normalizer's beta replaces the bias
  # Inception, at width 1/8 where 4 groups divide every width: it trains (the loss on a
  # fixed batch falls over a few small gradient steps) and its outputs stay finite.
  inc = Inception(normalizer=name, small_inputs=True, width_multiplier=0.125,
                  num_classes=3, norm_groups=4)
  rng = np.random.default_rng(0)
  img = jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=8))
  losses, v = helpers.train_few_steps(inc, img, labels, learning_rate=0.02)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  conv = v['params']['inception_3a']['branch1x1']['conv']
  assert ('bias' in conv) == (name == 'none')


@pytest.mark.parametrize('model, needles', [
    ({'normalizer': 'group_norm', 'norm_groups': 5},
     ('model.norm_groups=5', 'width 8 of a normalized layer of mlp', '1, 2, 4 (or 0')),
    ({'normalizer': 'batch_renorm', 'renorm_r_max': 0.5}, ('model.renorm_r_max=0.5',)),
    ({'normalizer': 'batch_renorm', 'renorm_ramp_steps': -1}, ('model.renorm_ramp_steps=-1',)),
    ({'normalizer': 'noisy_batch_norm', 'bn_noise': 0.0}, ('model.bn_noise=0.0', '> 0')),
    ({'normalizer': 'layer_norm', 'virtual_batch_size': 4},
     ('model.virtual_batch_size=4', "'layer_norm'")),
    ({'normalizer': 'group_norm', 'norm_groups': 32, 'name': 'inception',
      'activation': 'relu', 'width_multiplier': 0.125},
     ('model.norm_groups=32', 'width 8 of a normalized layer of inception', '1, 2, 4 (or 0')),
])
def test_bad_normalizer_keys_name_key_value_and_allowed(model, needles):
  c = mlp_config(**model)
  with pytest.raises(ValueError) as err:
    validate_config(c)
  message = str(err.value)
  assert all(n in message for n in needles) and '\n' not in message, message
