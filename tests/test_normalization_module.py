"""Algorithm 2 and the BatchNorm module: population statistics, folding, moving
averages, virtual (ghost) batches, agreement with flax.linen.BatchNorm, bad arguments.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

from bn_research import normalization as bn

EPS = 1e-5


def rand(seed, shape, loc=0.0, spread=1.0):
  rng = np.random.default_rng(seed)
  return (loc + spread * rng.normal(size=shape)).astype(np.float32)


def np_moments(x, axes):
  x = np.asarray(x, np.float64)
  return x.mean(axis=axes), x.var(axis=axes)


def np_batch_norm(x, gamma, beta, axes, eps=EPS):
  return helpers.np_batch_norm(x, gamma, beta, axes, eps)[0]


def np_population(batches, axes):
  """Algorithm 2, step 10: E[x] = E_B[mu_B], Var[x] = m/(m-1) E_B[var_B]."""
  m = np.prod([batches[0].shape[a] for a in axes])
  means, variances = zip(*(np_moments(b, axes) for b in batches))
  return np.mean(means, axis=0), m / (m - 1.0) * np.mean(variances, axis=0)


# ----------------------------------------------------------------------------------
# Population statistics (Algorithm 2, step 10).


def test_population_statistics_is_the_unbiased_estimator():
  axes = (0,)
  batches = [rand(s, (10, 4), loc=s - 1.0, spread=1.0 + s) for s in range(5)]
  moments = []
  for b in batches:
    mean, var = bn.batch_moments(jnp.asarray(b), axes=axes)
    moments.append({'mean': mean, 'var': var, 'count': 10})
  stats = bn.population_statistics(moments)
  mean_ref, var_ref = np_population(batches, axes)
  np.testing.assert_allclose(stats['mean'], mean_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], var_ref, rtol=1e-5)
  # The unbiased estimate is m/(m-1) = 10/9 times the average biased variance.
  avg_biased = np.mean([np_moments(b, axes)[1] for b in batches], axis=0)
  np.testing.assert_allclose(np.asarray(stats['var']) / avg_biased, 10 / 9, rtol=1e-5)


def test_population_statistics_accepts_sown_trees():
  def sown(seed):
    tree = {}
    for layer, features in (('bn_a', 3), ('block', 2)):
      x = rand(seed, (8, features), loc=1.0)
      mean, var = bn.batch_moments(jnp.asarray(x), axes=(0,))
      leaf = {'moments': ({'mean': mean, 'var': var, 'count': jnp.float32(8)},)}
      tree[layer] = leaf if layer == 'bn_a' else {'inner': leaf}
    return tree

  stats = bn.population_statistics([sown(1), sown(2), sown(3)])
  assert set(stats) == {'bn_a', 'block'} and set(stats['block']['inner']) == {'mean', 'var'}
  batches = [rand(s, (8, 3), loc=1.0) for s in (1, 2, 3)]
  mean_ref, var_ref = np_population(batches, (0,))
  np.testing.assert_allclose(stats['bn_a']['mean'], mean_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['bn_a']['var'], var_ref, rtol=1e-5)


def test_population_statistics_needs_a_batch():
  with pytest.raises(ValueError, match='0'):
    bn.population_statistics([])


class DenseNet(nn.Module):
  """Dense -> BN -> relu -> Dense -> BN, as in the paper's MNIST network."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(6, use_bias=False)(x)
    x = bn.BatchNorm(use_running_average=not train, name='bn1')(x)
    x = nn.relu(x)
    x = nn.Dense(4, use_bias=False)(x)
    return bn.BatchNorm(use_running_average=not train, name='bn2')(x)


class ConvNet(nn.Module):
  """Conv -> BN over (batch, height, width): m' = m * p * q values per channel."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(5, (3, 3), padding='SAME', use_bias=False, name='conv')(x)
    return bn.BatchNorm(use_running_average=not train, name='bn')(x)


def random_variables(module, x, seed, **init_kwargs):
  """`module`'s variables with random, non-trivial params and default batch_stats.

  Shapes come from jax.eval_shape (nothing is compiled) and values from NumPy: kernels
  ~ N(0, 1/fan_in), gamma ~ 1 + N(0, 0.25), biases and beta ~ N(0, 0.25); moving
  means 0 and variances 1, as BatchNorm initialises them.
  """
  shapes = jax.eval_shape(
      lambda x: module.init(jax.random.PRNGKey(0), x, **init_kwargs), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'mean':
      value = np.zeros(shape)
    elif name == 'var':
      value = np.ones(shape)
    elif name == 'kernel':
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == 'scale':
      value = 1.0 + 0.5 * rng.normal(size=shape)
    else:
      value = 0.5 * rng.normal(size=shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_estimate_population_statistics_dense_model():
  model = DenseNet()
  batches = [rand(s, (12, 5), loc=0.5) for s in range(4)]
  variables = random_variables(model, batches[0], 1, train=False)
  stats = bn.estimate_population_statistics(model.apply, variables, batches, train=True)
  assert (jax.tree_util.tree_structure(stats)
          == jax.tree_util.tree_structure(dict(variables['batch_stats'])))

  # Pre-BN activations of each layer in training mode, recomputed in float64.
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params'])
  h1 = [b.astype(np.float64) @ p['Dense_0']['kernel'] for b in batches]
  a1 = [np.maximum(np_batch_norm(h, p['bn1']['scale'], p['bn1']['bias'], (0,)), 0.0)
        for h in h1]
  h2 = [a @ p['Dense_1']['kernel'] for a in a1]
  for name, acts in (('bn1', h1), ('bn2', h2)):
    mean_ref, var_ref = np_population(acts, (0,))
    np.testing.assert_allclose(stats[name]['mean'], mean_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats[name]['var'], var_ref, rtol=1e-4, atol=1e-6)

  # Dropped in for the moving averages, inference applies Algorithm 2's affine maps.
  y = model.apply({'params': variables['params'], 'batch_stats': stats}, batches[0],
                  train=False)
  s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), stats)

  def affine(h, name):
    return (p[name]['scale'] * (h - s[name]['mean']) / np.sqrt(s[name]['var'] + EPS)
            + p[name]['bias'])

  a1 = np.maximum(affine(batches[0].astype(np.float64) @ p['Dense_0']['kernel'], 'bn1'), 0)
  np.testing.assert_allclose(y, affine(a1 @ p['Dense_1']['kernel'], 'bn2'), rtol=1e-4,
                             atol=1e-4)


def test_estimate_population_statistics_conv_model():
  model = ConvNet()
  batches = [rand(s, (3, 6, 5, 2), loc=1.0) for s in range(3)]
  variables = random_variables(model, batches[0], 2, train=False)
  stats = bn.estimate_population_statistics(model.apply, variables, batches, train=True)
  conv = nn.Conv(5, (3, 3), padding='SAME', use_bias=False)
  acts = [np.asarray(conv.apply({'params': variables['params']['conv']}, b), np.float64)
          for b in batches]
  mean_ref, var_ref = np_population(acts, (0, 1, 2))
  # m' = m * p * q = 3 * 6 * 5 values per channel: the factor is 90/89, not 3/2.
  np.testing.assert_allclose(stats['bn']['mean'], mean_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats['bn']['var'], var_ref, rtol=1e-4)


# ----------------------------------------------------------------------------------
# Folding inference BN into the preceding layer.


def conv(u, w):
  return jax.lax.conv_general_dilated(u, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('kind', ['dense', 'conv'])
@pytest.mark.parametrize('with_bias', [True, False], ids=['bias', 'no_bias'])
def test_fold_batch_norm(kind, with_bias):
  rng = np.random.default_rng(5)
  if kind == 'dense':
    u, kernel, layer = rand(6, (7, 5), loc=1.0), rand(7, (5, 4)), lambda u, w: u @ w
  else:
    u, kernel, layer = rand(6, (2, 5, 5, 3), loc=1.0), rand(7, (3, 3, 3, 4)), conv
  bias = rand(8, (4,)) if with_bias else None
  gamma, beta = rand(9, (4,), loc=1.0, spread=0.5), rand(10, (4,))
  mean = rand(11, (4,))
  var = rng.uniform(0.2, 3.0, size=4).astype(np.float32)

  h = layer(u, kernel) + (0.0 if bias is None else bias)
  expected = bn.batch_norm_inference(h, gamma, beta, mean, var, epsilon=EPS)
  new_kernel, new_bias = bn.fold_batch_norm(kernel, bias, gamma, beta, mean, var,
                                            epsilon=EPS)
  assert new_kernel.shape == kernel.shape and new_bias.shape == (4,)
  np.testing.assert_allclose(layer(u, new_kernel) + new_bias, expected, rtol=1e-4,
                             atol=1e-4)
  # And the inference transform itself is Algorithm 2's affine map.
  h64 = np.asarray(h, np.float64)
  np.testing.assert_allclose(expected, gamma / np.sqrt(var + EPS) * h64
                             + (beta - gamma * mean / np.sqrt(var + EPS)),
                             rtol=1e-4, atol=1e-4)


def test_fold_batch_norm_flax_conv_and_defaults():
  layer = nn.Conv(3, (2, 2), padding='VALID')
  u = rand(12, (2, 4, 4, 2), loc=-1.0)
  params = random_variables(layer, u, 3)['params']
  mean, var = rand(13, (3,)), np.full(3, 0.7, np.float32)
  expected = bn.batch_norm_inference(layer.apply({'params': params}, u), None, None,
                                     mean, var, epsilon=1e-3)
  k, b = bn.fold_batch_norm(params['kernel'], params['bias'], None, None, mean, var,
                            epsilon=1e-3)
  np.testing.assert_allclose(layer.apply({'params': {'kernel': k, 'bias': b}}, u),
                             expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='5'):
    bn.fold_batch_norm(jnp.ones((2, 5)), None, None, None, mean, var, epsilon=1e-3)


# ----------------------------------------------------------------------------------
# The module: moving averages.


def train_steps(module, xs):
  """Training-mode outputs and batch_stats over the batches, from random variables."""
  return helpers.normalizer_train_steps(
      module, xs, variables=random_variables(module, xs[0], 4, use_running_average=True))


@pytest.mark.parametrize('shape, axes', [((20, 3), (0,)), ((4, 3, 2, 3), (0, 1, 2))],
                         ids=['dense', 'conv'])
@pytest.mark.parametrize('unbiased', [True, False], ids=['unbiased', 'biased'])
def test_moving_averages_follow_the_recurrence(shape, axes, unbiased):
  momentum = 0.8
  xs = [rand(s, shape, loc=2.0 * s - 3.0, spread=0.5 + s) for s in range(3)]
  module = bn.BatchNorm(momentum=momentum, unbiased_running_var=unbiased)
  params, ys, stats = train_steps(module, xs)

  m = np.prod([shape[a] for a in axes])
  ra_mean, ra_var = np.zeros(shape[-1]), np.ones(shape[-1])
  for x, y in zip(xs, ys):
    mu, var = np_moments(x, axes)
    ra_mean = momentum * ra_mean + (1 - momentum) * mu
    ra_var = momentum * ra_var + (1 - momentum) * (var * m / (m - 1) if unbiased else var)
    np.testing.assert_allclose(
        y, np_batch_norm(x, params['scale'], params['bias'], axes), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats['mean'], ra_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], ra_var, rtol=1e-5)

  # Inference mode uses the moving averages and leaves them alone.
  y, updates = module.apply({'params': params, 'batch_stats': stats}, xs[0],
                            use_running_average=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y, params['scale'] * (xs[0] - ra_mean) / np.sqrt(ra_var + EPS)
                             + params['bias'], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(updates['batch_stats']['mean'], stats['mean'])


def test_init_leaves_default_statistics_and_collects_no_moments():
  x = rand(0, (6, 2), loc=5.0)
  variables = bn.BatchNorm().init(jax.random.PRNGKey(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.0)
  np.testing.assert_array_equal(variables['batch_stats']['var'], 1.0)
  np.testing.assert_array_equal(variables['params']['scale'], 1.0)
  np.testing.assert_array_equal(variables['params']['bias'], 0.0)
  assert 'batch_moments' not in variables


def test_init_with_axis_name_outside_pmap():
  # Like Flax's BatchNorm, initialising does not need the mapped axis to be bound.
  variables = bn.BatchNorm(axis_name='batch').init(
      jax.random.PRNGKey(0), rand(0, (4, 3)), use_running_average=False)
  assert set(variables['batch_stats']) == {'mean', 'var'}


# ----------------------------------------------------------------------------------
# Virtual (ghost) batch normalization.


@pytest.mark.parametrize('shape', [(12, 3), (6, 3, 2, 2)], ids=['dense', 'conv'])
def test_virtual_batch_of_the_whole_batch_is_plain_batch_norm(shape):
  xs = [rand(s, shape, loc=1.0 + s) for s in range(2)]
  params_v, ys_v, stats_v = train_steps(bn.BatchNorm(virtual_batch_size=shape[0]), xs)
  params_p, ys_p, stats_p = train_steps(bn.BatchNorm(), xs)
  for y_v, y_p in zip(ys_v, ys_p):
    np.testing.assert_allclose(y_v, y_p, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats_v['mean'], stats_p['mean'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats_v['var'], stats_p['var'], rtol=1e-5)


@pytest.mark.parametrize('shape', [(12, 3), (6, 3, 2, 2)], ids=['dense', 'conv'])
@pytest.mark.parametrize('vbs', [2, 3])
def test_virtual_batches_are_normalized_separately(shape, vbs):
  momentum = 0.9
  x = rand(20, shape, loc=-2.0, spread=3.0)
  x[vbs:2 * vbs] += 10.0  # groups with very different statistics
  params, (y,), stats = train_steps(
      bn.BatchNorm(virtual_batch_size=vbs, momentum=momentum), [x])
  axes = tuple(range(x.ndim - 1))
  groups = [x[i:i + vbs] for i in range(0, shape[0], vbs)]
  expected = np.concatenate(
      [np_batch_norm(g, params['scale'], params['bias'], axes) for g in groups])
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  # Moving averages: Algorithm 2 with mini-batch size m = vbs (* p * q).
  m = np.prod(groups[0].shape[:-1])
  mean_ref = np.mean([np_moments(g, axes)[0] for g in groups], axis=0)
  var_ref = m / (m - 1) * np.mean([np_moments(g, axes)[1] for g in groups], axis=0)
  np.testing.assert_allclose(stats['mean'], (1 - momentum) * mean_ref, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(stats['var'], momentum + (1 - momentum) * var_ref, rtol=1e-5)


def test_virtual_batch_population_statistics():
  x = [rand(s, (8, 2), loc=1.0) for s in range(3)]
  module = bn.BatchNorm(virtual_batch_size=4)
  variables = random_variables(module, x[0], 5, use_running_average=True)
  stats = bn.estimate_population_statistics(module.apply, variables, x,
                                            use_running_average=False)
  mean_ref, var_ref = np_population([g for b in x for g in (b[:4], b[4:])], (0,))
  np.testing.assert_allclose(stats['mean'], mean_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], var_ref, rtol=1e-5)


# ----------------------------------------------------------------------------------
# An independent oracle: flax.linen.BatchNorm where the definitions coincide.


@pytest.mark.parametrize('shape', [(16, 5), (4, 3, 3, 5)], ids=['dense', 'conv'])
def test_agrees_with_flax_batch_norm(shape):
  momentum, eps = 0.7, 1e-3
  xs = [rand(s, shape, loc=0.5 * s, spread=1.0 + 0.5 * s) for s in range(3)]
  ours = bn.BatchNorm(momentum=momentum, epsilon=eps, unbiased_running_var=False)
  theirs = nn.BatchNorm(momentum=momentum, epsilon=eps, use_fast_variance=False)
  params, ys, stats = train_steps(ours, xs)
  flax_stats = random_variables(theirs, xs[0], 0, use_running_average=True)['batch_stats']
  ct = rand(9, shape)

  def loss(module, params, stats, x):
    y, updates = module.apply({'params': params, 'batch_stats': stats}, x,
                              use_running_average=False, mutable=['batch_stats'])
    return jnp.sum(y * ct), (y, updates['batch_stats'])

  grad_flax = jax.jit(jax.value_and_grad(lambda p, s, x: loss(theirs, p, s, x),
                                          argnums=(0, 2), has_aux=True))
  for x, y in zip(xs, ys):
    (_, (y_flax, flax_stats)), g_flax = grad_flax(params, flax_stats, x)
    np.testing.assert_allclose(y, y_flax, rtol=1e-4, atol=1e-4)
  g_ours = jax.jit(jax.grad(lambda p, s, x: loss(ours, p, s, x)[0], argnums=(0, 2)))(
      params, stats, xs[-1])
  np.testing.assert_allclose(stats['mean'], flax_stats['mean'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], flax_stats['var'], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_flax)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  # Inference mode with the same statistics.
  y_ours = ours.apply({'params': params, 'batch_stats': stats}, xs[0],
                      use_running_average=True)
  y_flax = theirs.apply({'params': params, 'batch_stats': flax_stats}, xs[0],
                        use_running_average=True)
  np.testing.assert_allclose(y_ours, y_flax, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------
# Module and factory arguments.


def test_module_bad_arguments_raise():
  x = rand(0, (8, 3))
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=re.escape('virtual_batch_size=3')):
    bn.BatchNorm(virtual_batch_size=3).init(key, x, use_running_average=False)
  with pytest.raises(ValueError, match=re.escape('virtual_batch_size=0')):
    bn.BatchNorm(virtual_batch_size=0).init(key, x, use_running_average=False)
  with pytest.raises(ValueError, match=re.escape('epsilon=0.0')):
    bn.BatchNorm(epsilon=0.0).init(key, x, use_running_average=False)
  with pytest.raises(ValueError, match=re.escape('epsilon=-0.001')):
    bn.BatchNorm(epsilon=-1e-3).init(key, x, use_running_average=True)
  with pytest.raises(ValueError, match=re.escape('momentum=1.5')):
    bn.BatchNorm(momentum=1.5).init(key, x, use_running_average=False)
  # A batch of one example has no batch statistics in training mode.
  variables = bn.BatchNorm().init(key, x, use_running_average=True)
  with pytest.raises(ValueError, match=re.escape('(1, 3)')):
    bn.BatchNorm().apply(variables, x[:1], use_running_average=False,
                         mutable=['batch_stats'])
  assert bn.BatchNorm().apply(variables, x[:1], use_running_average=True).shape == (1, 3)


def test_get_normalizer():
  assert bn.get_normalizer('none') is None
  make = bn.get_normalizer('batch_norm', momentum=0.9, epsilon=1e-3)
  module = make(name='bn')
  assert isinstance(module, bn.BatchNorm)
  assert (module.momentum, module.epsilon, module.virtual_batch_size) == (0.9, 1e-3, None)
  vbn = bn.get_normalizer('virtual_batch_norm', virtual_batch_size=4)()
  assert vbn.virtual_batch_size == 4
  assert set(bn.NORMALIZERS) == {'batch_norm', 'virtual_batch_norm', 'batch_renorm',
                                 'layer_norm', 'group_norm', 'noisy_batch_norm',
                                 'stop_gradient_batch_norm', 'none'}


@pytest.mark.parametrize('kwargs, match', [
    ({'name': 'weight_norm'}, 'weight_norm'),
    ({'name': 'BatchNorm'}, 'BatchNorm'),
    ({'name': 'virtual_batch_norm'}, 'virtual_batch_size'),
    ({'name': 'virtual_batch_norm', 'virtual_batch_size': 0}, 'virtual_batch_size'),
    ({'name': 'batch_norm', 'epsilon': 0.0}, re.escape('epsilon=0.0')),
])
def test_get_normalizer_bad_arguments_raise(kwargs, match):
  kwargs = dict(kwargs)
  name = kwargs.pop('name')
  with pytest.raises(ValueError, match=match):
    bn.get_normalizer(name, **kwargs)
