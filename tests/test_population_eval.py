"""Inference as Algorithm 2: evaluation with population statistics, checked in float64 NumPy."""

import numpy as np
import pytest

from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


def _forward(params, stats, x, eps):
  """The BN MLP at inference (dense without bias -> BN with `stats` -> sigmoid, twice,
  then the logits), in float64."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()} for k, layer in params.items()}
  h = x.reshape(len(x), -1).astype(np.float64)
  for i in range(2):
    z = h @ p[f'dense_{i}']['kernel']
    mean, var = stats[i]
    z = (z - mean) / np.sqrt(var + eps) * p[f'bn_{i}']['scale'] + p[f'bn_{i}']['bias']
    h = _sigmoid(z)
  return h @ p['logits']['kernel'] + p['logits']['bias']


def test_population_eval_is_algorithm_2_and_leaves_the_moving_averages_alone(tmp_path):
  from bn_research import data as data_lib
  from bn_research import inputs, rundir, train
  n_batches = 7
  config = helpers.tiny_mlp_config(**{'eval.batch_stats': 'population',
                                      'eval.population_batches': n_batches,
                                      'num_train_steps': 40, 'eval_every_steps': 40})
  train.train_and_evaluate(config, str(tmp_path / 'population'))
  moving = helpers.tiny_mlp_config(num_train_steps=40, eval_every_steps=40)
  train.train_and_evaluate(moving, str(tmp_path / 'moving'))

  state = rundir.load_latest(str(tmp_path / 'population'))
  other = rundir.load_latest(str(tmp_path / 'moving'))
  # Training (and the checkpointed moving averages) are the same bit for bit.
  for part in ('params', 'batch_stats'):
    for key in state[part]:
      for name in state[part][key]:
        np.testing.assert_array_equal(state[part][key][name], other[part][key][name])

  # Algorithm 2 by hand: the first N training batches of the run's data order.
  ds = data_lib.load_dataset(config.data)
  source = inputs.InMemoryInput(ds.train_images, ds.train_labels,
                                batch_size=config.batch_size, seed=config.seed)
  idx = source.example_indices(0, n_batches)
  eps, m = config.model.bn_epsilon, config.batch_size
  stats = []
  for layer in range(2):
    means, variances = [], []
    for b in idx:
      # Algorithm 2 runs the training network: the layers below use their batch moments.
      pre = _pre_bn(state['params'], ds.train_images[b], layer, eps)
      means.append(pre.mean(0))
      variances.append(pre.var(0))
    stats.append((np.mean(means, 0), m / (m - 1) * np.mean(variances, 0)))
  logits = _forward(state['params'], stats, ds.test_images, eps)
  logits = logits - logits.max(1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  loss = -np.mean(log_probs[np.arange(len(ds.test_labels)), ds.test_labels])
  accuracy = np.mean(np.argmax(logits, 1) == ds.test_labels)
  final = rundir.read_metrics(str(tmp_path / 'population'))[-1]
  assert final['eval_loss'] == pytest.approx(loss, rel=1e-4)
  assert final['eval_accuracy'] == pytest.approx(accuracy, abs=1e-9)
  # ... and it is not what the moving averages give.
  with_moving = rundir.read_metrics(str(tmp_path / 'moving'))[-1]
  assert abs(with_moving['eval_loss'] - final['eval_loss']) > 1e-4


def _pre_bn(params, x, layer, eps):
  """The input to BN layer `layer` of the training-mode network (batch moments below)."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
  h = x.reshape(len(x), -1).astype(np.float64)
  for i in range(layer + 1):
    z = h @ p[f'dense_{i}']['kernel']
    if i == layer:
      return z
    z = (z - z.mean(0)) / np.sqrt(z.var(0) + eps) * p[f'bn_{i}']['scale'] + p[f'bn_{i}']['bias']
    h = _sigmoid(z)


def test_probe_modes_and_population_probe(tmp_path):
  """probe.mode='train' normalises the probe batch with its own moments: its BN output
  has mean beta and std gamma over the batch (the paper's stated property), which the
  inference-mode probe does not have."""
  from bn_research import rundir, train
  rows = {}
  for mode in ('inference', 'train'):
    config = helpers.tiny_mlp_config(**{'probe.mode': mode, 'probe.percentiles': (50.0,),
                                        'num_train_steps': 20, 'eval_every_steps': 20})
    train.train_and_evaluate(config, str(tmp_path / mode))
    rows[mode] = rundir.read_metrics(str(tmp_path / mode))
  # At step 0 (gamma 1, beta 0) the training-mode median of a standardised unit is near 0.
  assert abs(rows['train'][0]['act_p50']) < 0.3
  assert rows['train'][-1]['act_p50'] != rows['inference'][-1]['act_p50']
