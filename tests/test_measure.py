"""Santurkar et al.'s measurements against float64 NumPy and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_research import measure


def _linear_chain_grads(ws, x, y):
  """Gradients of 0.5 mean ||x W1 ... Wk - y||^2 w.r.t. each W, by hand (float64)."""
  acts = [x]
  for w in ws:
    acts.append(acts[-1] @ w)
  back = (acts[-1] - y) / len(x)
  grads = [None] * len(ws)
  for i in reversed(range(len(ws))):
    grads[i] = acts[i].T @ back
    back = back @ ws[i].T
  return grads


def _linear_loss(params, batch):
  h = batch['x']
  for name in sorted(params):
    h = h @ params[name]['kernel']
  return 0.5 * jnp.mean(jnp.sum((h - batch['y']) ** 2, axis=-1))


@pytest.mark.parametrize('depth', [2, 3])
def test_ics_of_a_linear_network_matches_a_hand_computation(depth):
  rng = np.random.default_rng(depth)
  dims = [5, 4, 3, 2][:depth + 1]
  ws = [rng.normal(size=(a, b)) for a, b in zip(dims, dims[1:])]
  new_ws = [w - 0.3 * rng.normal(size=w.shape) for w in ws]
  x, y = rng.normal(size=(16, dims[0])), rng.normal(size=(16, dims[-1]))
  names = [f'layer{i}' for i in range(depth)]
  as_params = lambda w: {n: {'kernel': jnp.asarray(a, jnp.float32)} for n, a in zip(names, w)}
  batch = {'x': jnp.asarray(x, jnp.float32), 'y': jnp.asarray(y, jnp.float32)}

  got = jax.jit(lambda p, q, b: measure.internal_covariate_shift(
      _linear_loss, p, q, names, b))(as_params(ws), as_params(new_ws), batch)

  g = _linear_chain_grads(ws, x, y)
  for i in range(depth):
    # Layers before i at their new values, i and after at their old ones.
    g_shifted = _linear_chain_grads(new_ws[:i] + ws[i:], x, y)
    a, b = g[i].ravel(), g_shifted[i].ravel()
    np.testing.assert_allclose(got['l2'][i], np.linalg.norm(a - b), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(got['cos'][i], a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                               rtol=2e-5)
    np.testing.assert_allclose(got['grad_norm'][i], np.linalg.norm(a), rtol=2e-5)
  assert got['l2'][0] == 0.0 and got['cos'][0] == 1.0  # layer 1: no earlier layer moved
  assert float(got['l2'][-1]) > 1e-3                    # and the measurement is not vacuous


def test_layer_prefixes_are_checked():
  params = {'a': {'kernel': jnp.ones(2)}, 'b': {'kernel': jnp.ones(2)}}
  with pytest.raises(ValueError, match="'c' matches no parameter"):
    measure.layer_index_of_leaves(params, ['a', 'c'])
  with pytest.raises(ValueError, match='in two layers'):
    measure.layer_index_of_leaves(params, ['a', ('b', 'a/kernel')])
  assert measure.layer_index_of_leaves(params, [('a', 'b')]) == [0, 0]
  assert measure.layer_index_of_leaves(params, ['b']) == [1, 0]  # 'a' in no layer


def test_landscape_on_a_quadratic_matches_its_closed_form():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  lams = np.array([0.5, 1.0, 3.0, 8.0])
  a = q @ np.diag(lams) @ q.T
  w = rng.normal(size=4)
  etas = np.array([0.01, 0.05, 0.1, 0.2])
  loss_fn = lambda p, b: 0.5 * p['w'] @ (b @ p['w'])
  landscape = jax.jit(lambda p, b: measure.loss_landscape(loss_fn, p, b, etas))
  got = landscape({'w': jnp.asarray(w, jnp.float32)}, jnp.asarray(a, jnp.float32))

  g = a @ w
  losses = [0.5 * (w - e * g) @ a @ (w - e * g) for e in etas]
  # grad L(w - eta g) - grad L(w) = -eta A g: predictiveness is the largest eta's
  # ||eta A g||, and the ratio to the distance moved, ||A g|| / ||g||, is the same at
  # every eta: sqrt(sum lam^4 c^2 / sum lam^2 c^2) over w's eigen-coordinates c.
  c = q.T @ w
  ratio = np.sqrt(np.sum(lams ** 4 * c ** 2) / np.sum(lams ** 2 * c ** 2))
  np.testing.assert_allclose(got['loss'], losses, rtol=1e-5)
  np.testing.assert_allclose(got['loss_range'], max(losses) - min(losses), rtol=1e-4)
  np.testing.assert_allclose(got['grad_distance'], etas * np.linalg.norm(a @ g), rtol=1e-5)
  np.testing.assert_allclose(got['grad_predictiveness'], etas.max() * np.linalg.norm(a @ g),
                             rtol=1e-5)
  np.testing.assert_allclose(got['beta_smoothness'], ratio, rtol=1e-5)
  assert lams.min() < float(got['beta_smoothness']) <= lams.max()

  # Along an eigenvector the effective smoothness is that eigenvalue exactly.
  on_axis = landscape({'w': jnp.asarray(q[:, 2], jnp.float32)}, jnp.asarray(a, jnp.float32))
  np.testing.assert_allclose(on_axis['beta_smoothness'], lams[2], rtol=1e-5)


def test_mlp_measurement_matches_layer_by_layer_replacement(fast_compiles):
  """The engine's measurement on the BN MLP: a BN layer moves with its dense layer."""
  from bn_research.models.mlp import MLP
  model = MLP(hidden_sizes=(6, 5), num_classes=3, normalizer='batch_norm', init_stddev=0.5)
  rng = np.random.default_rng(1)
  batch = {'image': jnp.asarray(rng.random((12, 2, 2, 1)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 3, 12), jnp.int32)}
  variables = model.init(jax.random.key(0), batch['image'], train=False)
  params = variables['params']
  assert measure.model_layers(measure.creation_order(model, batch['image'])) == [
      ('hidden_0', ('dense_0', 'bn_0')), ('hidden_1', ('dense_1', 'bn_1')),
      ('logits', ('logits',))]
  new_params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.cos(p + 1.0), params)
  m = jax.jit(measure.make_measurement(model, batch['image'], etas=(0.1, 0.5)))(
      params, new_params, variables['batch_stats'], batch, jax.random.key(1))
  assert sorted(m) == sorted(
      [f'ics_{k}/{n}' for k in ('l2', 'cos', 'rel') for n in ('hidden_0', 'hidden_1', 'logits')]
      + ['landscape_loss_range', 'landscape_loss_min', 'landscape_loss_max',
         'landscape_grad_pred', 'landscape_grad_pred_min', 'landscape_beta'])

  # Independently: swap whole subtrees by name and take plain gradients.
  loss = measure.training_loss(model)
  grad = jax.jit(jax.grad(lambda p: loss(p, variables['batch_stats'], batch, jax.random.key(1))))
  g = grad(params)
  flat = lambda t, keys: np.concatenate([np.ravel(x) for k in keys
                                         for x in jax.tree_util.tree_leaves(t[k])])
  layer2 = ('logits',)
  g2 = grad({**params, **{k: new_params[k] for k in ('dense_0', 'bn_0', 'dense_1', 'bn_1')}})
  a, b = flat(g, layer2), flat(g2, layer2)
  np.testing.assert_allclose(m['ics_l2/logits'], np.linalg.norm(a - b), rtol=1e-4)
  np.testing.assert_allclose(m['ics_cos/logits'],
                             a @ b / np.linalg.norm(a) / np.linalg.norm(b), rtol=1e-5)
  np.testing.assert_allclose(m['ics_rel/logits'], np.linalg.norm(a - b) / np.linalg.norm(a),
                             rtol=1e-4)
  layer1 = ('dense_1', 'bn_1')
  g1 = grad({**params, 'dense_0': new_params['dense_0'], 'bn_0': new_params['bn_0']})
  np.testing.assert_allclose(m['ics_l2/hidden_1'],
                             np.linalg.norm(flat(g, layer1) - flat(g1, layer1)), rtol=1e-4)
  assert m['ics_l2/hidden_0'] == 0.0
  for key in ('landscape_loss_range', 'landscape_grad_pred', 'landscape_beta'):
    assert np.isfinite(m[key]) and m[key] > 0
  np.testing.assert_allclose(m['landscape_loss_max'] - m['landscape_loss_min'],
                             m['landscape_loss_range'], rtol=1e-6)
  assert m['landscape_grad_pred_min'] <= m['landscape_grad_pred']


def test_inception_layers_are_stem_units_modules_and_classifier():
  from bn_research.models.inception import Inception
  model = Inception(small_inputs=True, width_multiplier=0.125, num_classes=10)
  names = [name for name, _ in measure.model_layers(
      measure.creation_order(model, np.zeros((2, 28, 28, 1))))]
  assert names[:3] == ['stem_conv1', 'stem_conv2_reduce', 'stem_conv2']
  assert names[3] == 'inception_3a' and names[-1] == 'classifier'
  assert len(names) == 3 + 10 + 1


@pytest.mark.parametrize('key, value, match', [
    ('every_steps', -1, 'measure.every_steps=-1'),
    ('etas', ('0.1',), r"measure.etas=\('0.1',\)"),
    ('etas', (), r'measure.etas=\(\)'),
    ('etas', (0.1, -0.2), r'measure.etas=\(0.1, -0.2\)'),
])
def test_measure_config_is_validated(key, value, match):
  from bn_research import config as config_lib
  c = config_lib.base_config()
  config_lib.validate_config(c)  # off by default, and valid
  assert c.measure.every_steps == 0
  c.measure.every_steps = 10
  config_lib.validate_config(c)
  c.measure[key] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c)


def test_measure_config_needs_something_to_measure():
  from bn_research import config as config_lib
  c = config_lib.base_config()
  c.measure.every_steps = 5
  c.measure.ics = c.measure.landscape = False
  with pytest.raises(ValueError, match='are all False'):
    config_lib.validate_config(c)
