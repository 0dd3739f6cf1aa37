"""The library parts of the paper's remaining claims, each against an independent reference:
BN with the statistics outside the gradient (Section 2), the layers' Jacobian singular
values (Section 3.3), the sigmoids' saturation and the parameter norms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_research import measure
from bn_research import normalization
from bn_research.models.mlp import MLP
from tests import helpers

jax.config.update('jax_enable_x64', False)


# ---- Section 2: the statistics treated as constants by the gradient ------------------

def _np_stop_gradient_grads(x, gamma, beta, w, eps):
  """float64 NumPy gradients of sum(w * y) with mu_B, var_B held fixed (constants)."""
  mu, var = x.mean(0), x.var(0)
  xhat = (x - mu) / np.sqrt(var + eps)
  return {'x': w * gamma / np.sqrt(var + eps), 'scale': (w * xhat).sum(0),
          'bias': w.sum(0), 'y': gamma * xhat + beta}


def test_stop_gradient_batch_norm_gradient_is_that_of_fixed_statistics():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(12, 5))
  gamma, beta, w = rng.normal(size=5), rng.normal(size=5), rng.normal(size=(12, 5))
  eps = 1e-3
  want = _np_stop_gradient_grads(x, gamma, beta, w, eps)

  def loss(x, scale, bias):
    y, _, _ = normalization.batch_norm_stop_gradient(x, scale, bias, axes=(0,),
                                                      epsilon=eps)
    return jnp.sum(jnp.asarray(w, jnp.float32) * y)

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(f32(x), f32(gamma), f32(beta))
  np.testing.assert_allclose(gx, want['x'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gs, want['scale'], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gb, want['bias'], rtol=1e-5, atol=1e-5)
  # The forward pass is BN's (Algorithm 1).
  y, _, _ = normalization.batch_norm_stop_gradient(f32(x), f32(gamma), f32(beta), axes=(0,),
                                                   epsilon=eps)
  np.testing.assert_allclose(y, want['y'], rtol=1e-4, atol=1e-5)
  # And the gradient differs from BN's, which flows through the statistics.
  bn_gx = jax.grad(lambda x: jnp.sum(jnp.asarray(w, jnp.float32) * normalization.batch_norm(
      x, f32(gamma), f32(beta), axes=(0,), epsilon=eps)[0]))(f32(x))
  assert float(jnp.max(jnp.abs(bn_gx - gx))) > 0.1


def _bias_gradient(normalizer):
  model = MLP(hidden_sizes=(6,), normalizer=normalizer, pre_norm_bias=True, init_stddev=0.5)
  x = jax.random.normal(jax.random.key(0), (10, 4))
  labels = jnp.arange(10) % 10
  v = model.init(jax.random.key(1), x, train=False)

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(10), labels])

  return jax.grad(loss)(v['params'])['dense_0']['bias']


def test_pre_normalization_bias_gets_a_gradient_only_without_the_statistics():
  # Through BN the bias cancels (x + b - mean(x + b)): its gradient is zero. With the
  # statistics constant it is not, though the output does not depend on b either way.
  bn = _bias_gradient('batch_norm')
  sg = _bias_gradient('stop_gradient_batch_norm')
  assert float(jnp.max(jnp.abs(bn))) < 1e-6
  assert float(jnp.max(jnp.abs(sg))) > 1e-3


def test_stop_gradient_normalizer_is_selectable_by_name_in_a_config():
  from bn_research import config as config_lib
  c = helpers.tiny_mlp_config(**{'model.normalizer': 'stop_gradient_batch_norm',
                                 'model.pre_norm_bias': True})
  config_lib.validate_config(c)
  assert 'stop_gradient_batch_norm' in normalization.MOVING_AVERAGE_NORMALIZERS


# ---- Section 3.3: the layers' Jacobians ---------------------------------------------

def _np_mlp_layers(params, stats, normalized, eps):
  """The MLP's layers as float64 NumPy functions u_i -> u_{i+1} of one example, BN
  with fixed statistics (stats[i] = (mean, var)), and the last one -> logits input."""
  fns = []
  for i in range(len(stats)):
    k = np.asarray(params[f'dense_{i}']['kernel'], np.float64)
    b = (np.asarray(params[f'dense_{i}']['bias'], np.float64)
         if 'bias' in params[f'dense_{i}'] else 0.0)
    if normalized:
      g = np.asarray(params[f'bn_{i}']['scale'], np.float64)
      beta = np.asarray(params[f'bn_{i}']['bias'], np.float64)
      mean, var = (np.asarray(a, np.float64) for a in stats[i])
      fns.append(lambda u, k=k, g=g, beta=beta, mean=mean, var=var: 1 / (1 + np.exp(
          -(g * (u @ k - mean) / np.sqrt(var + eps) + beta))))
    else:
      fns.append(lambda u, k=k, b=b: 1 / (1 + np.exp(-(u @ k + b))))
  return fns


def _finite_difference_jacobian(f, u, h=1e-6):
  return np.stack([(f(u + h * e) - f(u - h * e)) / (2 * h) for e in np.eye(len(u))], axis=1)


@pytest.mark.parametrize('normalizer', ['batch_norm', 'none'])
def test_jacobian_singular_values_match_finite_differences(normalizer):
  eps = 1e-5
  model = MLP(hidden_sizes=(7, 5, 6), normalizer=normalizer, init_stddev=0.7,
              bn_kwargs={'epsilon': eps})
  images = jax.random.normal(jax.random.key(3), (16, 3, 3))
  v = model.init(jax.random.key(4), images, train=False)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(5), p.shape), v['params'])
  layers = measure.model_layers(measure.creation_order(model, images))
  assert [name for name, _ in layers] == ['hidden_0', 'hidden_1', 'hidden_2', 'logits']
  fixed = {'params': params}
  stats = [None] * 3
  if normalizer != 'none':
    _, state = model.apply({'params': params, 'batch_stats': v['batch_stats']}, images,
                           train=True, mutable=['batch_stats', 'batch_moments'])
    fixed['batch_stats'] = measure.batch_statistics(v['batch_stats'], state['batch_moments'])
    # The statistics of the mini-batch, computed here by NumPy, not read from BN.
    u = np.asarray(images, np.float64).reshape(16, -1)
    np_params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    for i in range(3):
      pre = u @ np_params[f'dense_{i}']['kernel']
      stats[i] = (pre.mean(0), pre.var(0))
      g, beta = np_params[f'bn_{i}']['scale'], np_params[f'bn_{i}']['bias']
      u = 1 / (1 + np.exp(-(g * (pre - pre.mean(0)) / np.sqrt(pre.var(0) + eps) + beta)))
  fns = _np_mlp_layers(params, stats, normalizer != 'none', eps)

  n = 4
  for i, f in enumerate(fns):
    first, second = layers[i][1][0], layers[i + 1][1][0]
    got = np.asarray(jax.jit(lambda v, x: measure.layer_jacobian_singular_values(
        model, v, x, first, second))(fixed, images[:n]))
    for j in range(n):
      u = np.asarray(images[j], np.float64).reshape(-1)
      for g in fns[:i]:
        u = g(u)
      want = np.linalg.svd(_finite_difference_jacobian(f, u), compute_uv=False)
      np.testing.assert_allclose(got[j], want, rtol=2e-3, atol=1e-5)


def test_singular_value_summary_closed_forms():
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
  s = np.linalg.svd(q, compute_uv=False)  # an orthogonal matrix: all ones
  out = measure.singular_value_summary(jnp.asarray(s))
  np.testing.assert_allclose(out['log_spread'], 0.0, atol=1e-6)
  out = measure.singular_value_summary(jnp.asarray([0.5, 2.0, 4.0]))
  np.testing.assert_allclose(out['log_spread'], (np.log(2) + np.log(2) + np.log(4)) / 3,
                             rtol=1e-6)
  assert (float(out['min']), float(out['max'])) == (0.5, 4.0)
  np.testing.assert_allclose(out['mean'], 6.5 / 3, rtol=1e-6)


# ---- saturation and parameter norms ---------------------------------------------------

def test_saturation_fractions_and_histogram_against_numpy():
  rng = np.random.default_rng(1)
  a = rng.normal(0, 3, size=(50, 4))
  b = rng.normal(1, 1, size=(30, 2))
  out = measure.nonlinearity_saturation({'hidden_0': jnp.asarray(a, jnp.float32),
                                         'hidden_1': jnp.asarray(b, jnp.float32)})
  for name, x in (('hidden_0', a), ('hidden_1', b)):
    np.testing.assert_allclose(out[f'saturation_2/{name}'], np.mean(np.abs(x) > 2), rtol=1e-6)
    np.testing.assert_allclose(out[f'saturation_4/{name}'], np.mean(np.abs(x) > 4), rtol=1e-6)
    edges = np.asarray(measure.HIST_EDGES)
    want, _ = np.histogram(np.clip(x, edges[0], edges[-1] - 1e-3), bins=edges)
    got = [float(out[f'input_hist/{name}/{lo:g}']) for lo in edges[:-1]]
    np.testing.assert_allclose(got, want / x.size, rtol=1e-6, atol=1e-7)
  assert float(out['saturation_4/hidden_0']) > 0  # the test is not vacuous


def test_parameter_norms_against_numpy():
  params = {'dense_0': {'kernel': np.arange(6.0).reshape(2, 3), 'bias': np.asarray([3.0, 4.0])},
            'bn_0': {'scale': -np.ones(4)}}
  out = measure.parameter_norms(jax.tree_util.tree_map(jnp.asarray, params))
  assert out['param_norm/dense_0/bias'] == pytest.approx(5.0)
  assert out['param_norm/dense_0/kernel'] == pytest.approx(np.sqrt(55.0))
  assert out['param_norm/bn_0/scale'] == pytest.approx(2.0)


# ---- through the engine --------------------------------------------------------------

def test_engine_writes_the_claims_measurements_into_metrics(tmp_path):
  from bn_research import train
  c = helpers.tiny_mlp_config(**{
      'model.normalizer': 'stop_gradient_batch_norm', 'model.pre_norm_bias': True,
      'measure.every_steps': 20, 'measure.ics': False, 'measure.landscape': False,
      'measure.jacobian': True, 'measure.jacobian_examples': 3, 'measure.saturation': True,
      'measure.param_norms': True})
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  rows = [r for r in helpers.read_jsonl(str(tmp_path / 'run' / 'metrics.jsonl'))
          if 'param_norm/dense_0/bias' in r]
  assert [r['step'] for r in rows] == [0, 20, 40]
  for r in rows:
    for layer in ('hidden_0', 'hidden_1'):
      assert 0 < r[f'jacobian_sv_min/{layer}'] <= r[f'jacobian_sv_mean/{layer}'] <= (
          r[f'jacobian_sv_max/{layer}'])
      assert 0 <= r[f'saturation_4/{layer}'] <= r[f'saturation_2/{layer}'] <= 1
      hist = [v for k, v in r.items() if k.startswith(f'input_hist/{layer}/')]
      assert len(hist) == len(measure.HIST_EDGES) - 1
      assert sum(hist) == pytest.approx(1.0, abs=1e-5)
  assert 'jacobian_sv_mean/logits' not in rows[0]  # the output layer has no next layer
  # The bias starts at zero and moves: it gets a gradient through the frozen statistics.
  assert rows[0]['param_norm/dense_0/bias'] == 0.0 < rows[-1]['param_norm/dense_0/bias']


@pytest.mark.parametrize('key,value,message', [
    ('measure.jacobian_examples', 99, 'measure.jacobian_examples=99 is more than the batch'),
    ('model.name', 'small_cnn', 'measure.jacobian=True measures the hidden layers'),
])
def test_measurement_config_is_checked(key, value, message):
  from bn_research import config as config_lib
  c = helpers.tiny_mlp_config(**{'measure.every_steps': 10, 'measure.jacobian': True,
                                 'probe.enabled': False,
                                 key: value})
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(c)
