"""Inference as Algorithm 2: evaluation with population statistics, checked in float64 NumPy."""

import subprocess
import sys

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
  eps = config.model.bn_epsilon
  stats = _algorithm_2(state['params'], [ds.train_images[b] for b in
                                         source.example_indices(0, n_batches)], eps)
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


def _algorithm_2(params, batches, eps):
  """Algorithm 2's (E[x], Var[x]) of both BN layers in float64, from training batches:
  the mean of the batch means and m/(m-1) times the mean of the batch variances."""
  stats = []
  for layer in range(2):
    # Algorithm 2 runs the training network: the layers below use their batch moments.
    pres = [_pre_bn(params, x, layer, eps) for x in batches]
    m = len(batches[0])
    stats.append((np.mean([z.mean(0) for z in pres], 0),
                  m / (m - 1) * np.mean([z.var(0) for z in pres], 0)))
  return stats


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


def _probe_reference(params, images, eps, stats=None):
  """The probed unit's BN output (hidden layer 1, unit 0) in float64: normalised with
  `stats` (inference) or, when None, with the probe batch's own moments in every layer
  (the training network, probe.mode='train')."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
  if stats is None:
    z = _pre_bn(params, images, 1, eps)
    mean, var = z.mean(0), z.var(0)
  else:
    h = images.reshape(len(images), -1).astype(np.float64)
    for i in range(2):
      z = h @ p[f'dense_{i}']['kernel']
      mean, var = stats[i]
      if i == 0:
        h = _sigmoid((z - mean) / np.sqrt(var + eps) * p['bn_0']['scale'] + p['bn_0']['bias'])
  out = (z - mean) / np.sqrt(var + eps) * p['bn_1']['scale'] + p['bn_1']['bias']
  return out[:, 0], p['bn_1']['scale'][0], p['bn_1']['bias'][0], var[0]


@pytest.mark.parametrize('batch_stats', ['moving_average', 'population'])
def test_probe_in_train_mode_normalises_the_probe_batch_by_its_own_moments(tmp_path,
                                                                           batch_stats):
  """probe.mode='train': the probed unit's BN output on the probe batch is normalised
  with that batch's own moments, so over the batch it has mean beta and standard
  deviation gamma (the paper's stated property), whatever statistics evaluation uses;
  the logged percentiles are those of the float64 reference."""
  from bn_research import data as data_lib
  from bn_research import rundir, train
  qs = (10.0, 50.0, 90.0)
  config = helpers.tiny_mlp_config(**{
      'probe.mode': 'train', 'probe.percentiles': qs, 'eval.batch_stats': batch_stats,
      'eval.population_batches': 3, 'num_train_steps': 20, 'eval_every_steps': 20})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  state = rundir.load_latest(str(tmp_path / 'run'))
  images = data_lib.load_dataset(config.data).test_images[:config.probe.num_examples]
  eps = config.model.bn_epsilon
  out, gamma, beta, var = _probe_reference(state['params'], images, eps)
  assert out.mean() == pytest.approx(beta, abs=1e-9)
  # gamma, up to BN's epsilon in the denominator.
  assert out.std() == pytest.approx(abs(gamma) * np.sqrt(var / (var + eps)), rel=1e-9)
  final = rundir.read_metrics(str(tmp_path / 'run'))[-1]
  logged = [final[f'act_p{q:g}'] for q in qs]
  np.testing.assert_allclose(logged, np.percentile(out, qs), rtol=1e-4, atol=1e-5)
  # At step 0 (gamma 1, beta 0) the median of a standardised unit is near 0.
  assert abs(rundir.read_metrics(str(tmp_path / 'run'))[0]['act_p50']) < 0.3


def test_population_probe_uses_algorithm_2_statistics(tmp_path):
  """probe.mode='inference' with eval.batch_stats='population': the probe normalises
  with the population statistics of Algorithm 2 (computed here in float64 from the
  first N training batches), not with the moving averages nor the probe batch's own."""
  from bn_research import data as data_lib
  from bn_research import inputs, rundir, train
  n_batches, qs = 5, (10.0, 50.0, 90.0)
  config = helpers.tiny_mlp_config(**{
      'eval.batch_stats': 'population', 'eval.population_batches': n_batches,
      'probe.mode': 'inference', 'probe.percentiles': qs, 'num_train_steps': 20,
      'eval_every_steps': 20})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  state = rundir.load_latest(str(tmp_path / 'run'))
  ds = data_lib.load_dataset(config.data)
  source = inputs.InMemoryInput(ds.train_images, ds.train_labels,
                                batch_size=config.batch_size, seed=config.seed)
  eps = config.model.bn_epsilon
  stats = _algorithm_2(state['params'], [ds.train_images[b] for b in
                                         source.example_indices(0, n_batches)], eps)
  images = ds.test_images[:config.probe.num_examples]
  final = rundir.read_metrics(str(tmp_path / 'run'))[-1]
  logged = [final[f'act_p{q:g}'] for q in qs]
  expected = np.percentile(_probe_reference(state['params'], images, eps, stats)[0], qs)
  np.testing.assert_allclose(logged, expected, rtol=1e-4, atol=1e-5)
  own = np.percentile(_probe_reference(state['params'], images, eps)[0], qs)
  assert np.max(np.abs(np.asarray(logged) - own)) > 1e-3  # not the batch's own moments


_ON_DEVICES = """
import sys
import jax
import numpy as np
from bn_research import evaluate as ev
workdir, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
plan = ev.make_plan([workdir], crops=['center'], batch_stats='population',
                    population_batches=n)
(data, state), = ev.load_runs(plan)
out = {}
for count in (1, 2):
  program, variables, kind = ev.inference_variables(plan.runs[0], plan, data, state,
                                                    jax.devices()[:count])
  assert kind == 'population', kind
  assert program.mesh['data'] == count, program.mesh
  for layer, stats in jax.device_get(variables['batch_stats']).items():
    for name, value in stats.items():
      out[f'{count}/{layer}/{name}'] = np.asarray(value)
np.savez(path, **out)
"""


@pytest.mark.slow
def test_population_statistics_split_over_devices_are_the_one_device_ones(tmp_path):
  """`bn_research.evaluate`'s Algorithm 2 (the engine's, through
  `evaluate.inference_variables`) with each of the N training batches split over 2
  (forced host) devices: the statistics of the whole batches, as on 1 device.

  Tolerance, derived: both results are float32 evaluations of the same sums in another
  order, so each is within float32's rounding error of the float64 NumPy Algorithm 2;
  the 2-device result may be at most twice as far from it as the 1-device result is
  (plus half an ulp of float32, where the 1-device result happens to be exact). Per-device
  batch moments (statistics of half-batches) would be far outside it."""
  from bn_research import data as data_lib
  from bn_research import inputs, rundir, train
  n_batches = 5
  config = helpers.tiny_mlp_config(**{'num_train_steps': 20, 'eval_every_steps': 20})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  path = str(tmp_path / 'stats.npz')
  proc = subprocess.run(
      [sys.executable, '-c', _ON_DEVICES, workdir, str(n_batches), path], cwd=helpers.REPO,
      env=helpers.subprocess_env(2, cpu=True), capture_output=True, text=True,
      timeout=helpers.CEILING)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(path)
  state = rundir.load_latest(workdir)
  ds = data_lib.load_dataset(config.data)
  source = inputs.InMemoryInput(ds.train_images, ds.train_labels,
                                batch_size=config.batch_size, seed=config.seed)
  reference = _algorithm_2(state['params'], [ds.train_images[b] for b in
                                             source.example_indices(0, n_batches)],
                           config.model.bn_epsilon)
  for layer, (mean, var) in enumerate(reference):
    for name, exact in (('mean', mean), ('var', var)):
      one, two = (np.asarray(got[f'{c}/bn_{layer}/{name}'], np.float64) for c in (1, 2))
      own_error = np.max(np.abs(one - exact))
      assert own_error < 1e-4 * np.max(np.abs(exact)), (layer, name)  # it is Algorithm 2
      bound = 2 * own_error + 2.0 ** -24 * np.abs(exact)
      assert np.all(np.abs(two - exact) <= bound), (layer, name, np.abs(two - exact), bound)
