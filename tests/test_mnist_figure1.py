"""The Figure 1 job (on synthetic data, few steps) and its activation tracker."""

import os

import jax
import pytest
import ml_collections
import numpy as np

from tests import helpers


def test_probe_percentiles_match_numpy_on_an_independent_forward_pass():
  from bn_research import config as config_lib
  from bn_research.engine import steps
  config = config_lib.base_config()
  config.model.hidden_sizes = (7, 5)
  config.model.normalizer = 'none'
  config.model.init_stddev = 0.5
  config.probe = ml_collections.ConfigDict(
      {'layer': -1, 'unit': 3, 'percentiles': (15.0, 50.0, 85.0), 'mode': 'inference'})
  builder = steps.Builder(config, num_classes=3)
  rng = np.random.default_rng(0)
  images = rng.random((97, 4, 4, 1)).astype(np.float32)
  variables = builder.model({}).init(jax.random.key(0), images[:2], train=False)
  got = np.asarray(steps.make_probe_fn(builder)({}, variables['params'], {}, images))
  # The last hidden layer's pre-sigmoid input, by hand in float64.
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params'])
  h = images.reshape(97, -1).astype(np.float64)
  h = 1 / (1 + np.exp(-(h @ p['dense_0']['kernel'] + p['dense_0']['bias'])))
  z = h @ p['dense_1']['kernel'] + p['dense_1']['bias']
  np.testing.assert_allclose(got, np.percentile(z[:, 3], [15, 50, 85]), rtol=1e-5, atol=1e-6)


def test_figure1_job_writes_figure_and_numbers(tmp_path):
  proc = helpers.run_module(
      'experiments.mnist_figure1',
      [f'--workdir={tmp_path}', '--source=synthetic', '--steps=40', '--eval_every=20',
       '--set=data.num_train=300', '--set=data.num_test=100', '--set=probe.num_examples=50'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = helpers.read_json(tmp_path / 'figure1.json')
  for net in ('bn', 'baseline'):
    s = summary[net]
    assert [a[0] for a in s['test_accuracy']] == [0, 20, 40]
    assert s['final_test_accuracy'] == s['test_accuracy'][-1][1]
    assert [len(row) for row in s['percentiles']] == [4, 4, 4]
    for _, p15, p50, p85 in s['percentiles']:
      assert p15 <= p50 <= p85
    assert helpers.read_json(tmp_path / net / 'status.json')['status'] == 'done'
  assert summary['data']['dataset'] and summary['data']['num_train'] == 300
  assert os.path.getsize(tmp_path / 'figure1.png') > 10_000
  assert '| bn ' in proc.stdout and '| baseline ' in proc.stdout


def test_core_shares_are_disjoint_and_cover_what_they_can():
  from bn_research.cpu_placement import core_shares
  assert core_shares([0, 1], 2) == [{0}, {1}]
  assert core_shares([3, 5, 8, 9, 10], 2) == [{3, 5}, {8, 9}]
  assert core_shares(list(range(16)), 2) == [set(range(8)), set(range(8, 16))]
  assert core_shares([0], 2) is None  # one core: scheduling is left to the OS


def test_figure1_claims_are_measured_from_the_curves():
  from bn_research.analysis import figure1
  # Ten probe rows; the first tenth (step 0 here) is left out. Median of BN: flat;
  # baseline: drifts by +2 in steps of ~0.22 with a jitter.
  steps = np.arange(0, 1000, 100)
  flat = [[s, -1.0, 0.0, 1.0] for s in steps]
  drifting = [[s, -1.0 - i * 0.1, 0.25 * i + (0.05 if i % 2 else 0), 1.0 + i * 0.3]
              for i, s in enumerate(steps)]
  st = figure1.steadiness(drifting)
  assert st['from_step'] == 100
  assert st['median_drift'] == pytest.approx(0.25 * 9 + 0.05 - (0.25 + 0.05))
  assert st['spread_drift'] == pytest.approx((2.0 + 9 * 0.4) - (2.0 + 0.4))
  changes = np.abs(np.diff([0.25 * i + (0.05 if i % 2 else 0) for i in range(1, 10)]))
  assert st['median_jitter'] == pytest.approx(changes.mean())
  bn_acc = [[0, 0.1], [100, 0.8], [200, 0.95]]
  base_acc = [[0, 0.1], [100, 0.5], [200, 0.9]]
  bn = figure1.network_numbers(bn_acc, flat, target=0.9)
  base = figure1.network_numbers(base_acc, drifting, target=0.9)
  assert bn['steps_to_baseline_max'] == 200 and base['steps_to_baseline_max'] == 200
  verdicts = {c['claim'].split(' (')[0]: c['holds'] for c in figure1.claims(bn, base)}
  assert verdicts['BN trains faster'] is False  # same step: not faster
  assert verdicts['BN ends with the higher test accuracy'] is True
  assert all(v for k, v in verdicts.items() if 'steadier' in k)
  # Swap the roles: every steadiness claim then fails.
  verdicts = [c['holds'] for c in figure1.claims(base, bn)]
  assert verdicts[2:] == [False, False]


def _record(name, status, metrics, percentiles=(15.0, 50.0, 85.0)):
  from bn_research import experiment
  from bn_research import plan as plan_lib
  run = plan_lib.Run(name, f'/nowhere/{name}', None)
  return experiment.RunRecord(run, {'status': status}, metrics,
                              {'probe': {'percentiles': list(percentiles)}}, {})


def _rows(steps, acc, pct=(-1.0, 0.0, 1.0), keys=('act_p15', 'act_p50', 'act_p85')):
  return [{'step': s, 'eval_accuracy': acc, **dict(zip(keys, pct))} for s in steps]


def test_figure1_summary_reports_a_diverged_network_and_a_single_percentile():
  from experiments import mnist_figure1 as job
  # The baseline diverged after its first evaluation: no claim can be judged, and its
  # numbers are missing, not invented; the job still writes its table and figure.
  records = [_record('bn', 'done', _rows(range(0, 100, 10), 0.9)),
             _record('baseline', 'diverged', _rows([0], 0.1))]
  summary = job.summarize(records, None)
  assert summary['bn']['final_test_accuracy'] == 0.9
  assert 'final_test_accuracy' not in summary['baseline']
  assert summary['claims'] == []
  assert any('baseline (diverged)' in w for w in summary['warnings'])
  assert '| baseline | diverged | - |' in job.table(summary)
  job.plot(summary)
  # A probe of one percentile: curves kept, steadiness not measured.
  one = [_record(n, 'done', _rows(range(0, 100, 10), 0.9, (0.5,), ('act_p50',)), (50.0,))
         for n in ('bn', 'baseline')]
  summary = job.summarize(one, None)
  assert summary['bn']['percentiles'][0] == [0, 0.5]
  assert summary['claims'] == []
  job.plot(summary)
