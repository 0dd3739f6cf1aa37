"""The claims jobs (experiments/claims.py and its five job modules): bad input, the claim
rules on hand-made runs, and each MLP job end to end at tiny scale on synthetic data."""

import os
import sys

import numpy as np
import pytest

from experiments import claims
from experiments import dropout_need
from experiments import init_sensitivity
from experiments import jacobians
from experiments import saturation
from experiments import stats_gradient
from tests import helpers


# ---- bad input: one line naming the flag, exit code 2, nothing written ---------------

@pytest.mark.parametrize('args,program,flag', [
    (['--claim=dropouts'], 'claims', '--claim'),
    (['--claim=init', '--stddevs=0.1,0'], 'init_sensitivity', '--stddevs'),
    (['--claim=init', '--stddevs=-1'], 'init_sensitivity', '--stddevs'),
    (['--claim=dropout', '--dropout_rates=0,1'], 'dropout_need', '--dropout_rates'),
    (['--claim=dropout', '--dropout_rates=-0.1'], 'dropout_need', '--dropout_rates'),
    (['--claim=init', '--steps=0'], 'init_sensitivity', '--steps'),
    (['--claim=jacobians', '--data=cifar'], 'jacobians', '--data'),
    (['--claim=jacobians', '--set=model.init_stddev=-1'], 'jacobians', 'model.init_stddev'),
])
def test_bad_flag_is_one_line_exit_2_nothing_written(tmp_path, args, program, flag):
  proc = helpers.run_module('experiments.claims', [f'--workdir={tmp_path}/out', *args])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f'{program}: error: ') and flag in lines[0], lines[0]
  assert not os.listdir(tmp_path)


# ---- the rules ---------------------------------------------------------------------

def test_init_rule_needs_a_wider_range_that_covers_the_baseline():
  sds = [1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0]
  judge = lambda bn, base: init_sensitivity.judge({'bn': bn, 'baseline': base}, sds)['verdict']
  assert judge([1e-3, 1e-2, 0.1, 0.5], [0.1, 0.5]) == 'holds'
  assert judge([1e-2, 0.1, 0.5], [0.1, 0.5]) == 'does not hold'        # one more only
  assert judge([1e-3, 1e-2, 0.1, 0.5], [0.1, 2.0]) == 'does not hold'  # misses one
  assert judge([], []) == 'does not hold'


def test_dropout_rule_compares_gains_with_a_margin():
  judge = lambda **g: dropout_need.judge(g)['verdict']
  assert judge(inception=0.05, bn_baseline=0.0, bn_x5=0.03) == 'holds'
  assert judge(inception=0.05, bn_baseline=0.045, bn_x5=0.0) == 'does not hold'
  assert judge(inception=-0.01, bn_baseline=-0.03, bn_x5=-0.05) == 'holds'
  assert judge(inception=None, bn_baseline=0.0, bn_x5=0.0) == 'not judged'


def _sg(status='done', half=1.0, end=2.0, first=2.3, final=2.2):
  return {'status': status, 'halfway_bias_norm': half, 'final_bias_norm': end,
          'first_loss': first, 'final_loss': final, 'final_eval_accuracy': 0.5}


def test_stats_gradient_rules():
  bn = _sg(half=0.0, end=0.0, final=0.3)
  verdicts = lambda sg: [r['verdict'] for r in stats_gradient.judge(
      {'bn': bn, 'stop_gradient': sg})]
  assert verdicts(_sg()) == ['holds', 'holds']
  assert verdicts(_sg(end=1.2, final=0.4)) == ['does not hold', 'does not hold']
  assert verdicts(_sg(status='diverged at step 300', final=0.1)) == ['holds', 'holds']


def _load(root, names):
  """The driver's records of hand-made run directories."""
  from bn_research import experiment
  from bn_research import plan as plan_lib
  return [experiment.read(plan_lib.Run(n, os.path.join(root, n), None)) for n in names]


def test_jacobian_summary_and_rules_from_run_directories(tmp_path):
  spreads = {'bn': [0.3, 0.5, 0.6], 'baseline': [0.3, 1.5, 2.5]}
  for network, values in spreads.items():
    rows = [{'step': 10 * i, 'eval_accuracy': 0.5,
             **{f'jacobian_sv_{s}/{layer}': v for s in jacobians.STATS
                for layer in ('hidden_0', 'hidden_1')}} for i, v in enumerate(values)]
    helpers.write_run(tmp_path / f'{network}_seed0', rows)
  s = jacobians.summarize(_load(tmp_path, ['bn_seed0', 'baseline_seed0']),
                          _args(jacobians))
  assert s['networks']['bn']['layers'] == ['hidden_0', 'hidden_1']
  # Step 0 is left out of the mean over training.
  assert s['networks']['bn']['mean_log_spread'] == pytest.approx(0.55)
  assert s['networks']['baseline']['mean_log_spread'] == pytest.approx(2.0)
  assert [c['verdict'] for c in s['claims']] == ['holds', 'holds']  # 0.55 < log 2
  jacobians.plot(s).savefig(tmp_path / 'j.png')


def test_saturation_summary_rule_and_histogram_moments(tmp_path):
  from bn_research import measure
  bins = [f'{lo:g}' for lo in measure.HIST_EDGES[:-1]]
  for network, end in (('bn', 0.1), ('baseline', 0.6)):
    rows = []
    for i in range(5):
      row = {'step': 10 * i}
      for layer in ('hidden_0', 'hidden_1'):
        row[f'saturation_2/{layer}'] = end * i / 4
        row[f'saturation_4/{layer}'] = end * i / 8
        row.update({f'input_hist/{layer}/{b}': float(j == i) for j, b in enumerate(bins)})
      rows.append(row)
    helpers.write_run(tmp_path / f'mnist_{network}', rows)
  s = saturation.summarize(_load(tmp_path, ['mnist_bn', 'mnist_baseline']),
                           _args(saturation, data='mnist'))
  base = s['datasets']['mnist']['baseline']
  assert base['final_saturation_2'] == pytest.approx(0.6)
  assert base['histogram']['layer'] == 'hidden_1'
  assert base['histogram']['steps'] == [0, 20, 40]            # first, middle, last
  assert [int(np.argmax(f)) for f in base['histogram']['fractions']] == [0, 2, 4]
  assert [c['verdict'] for c in s['claims']] == ['holds']
  saturation.plot(s).savefig(tmp_path / 's.png')


def _args(module, **values):
  """A job's args as the driver parses them: its flags' defaults, then `values`."""
  import types
  out = {name: flag.default for name, flag in module.FLAGS.items()}
  out.update(workdir='unused', overrides={}, **values)
  return types.SimpleNamespace(**out)


def test_runs_differing_in_vmappable_keys_share_a_program():
  from bn_research import plan as plan_lib
  args = _args(init_sensitivity, data='synthetic', steps=20, eval_every=10,
               stddevs=(0.01, 1.0), seeds=2)
  groups = plan_lib.vmap_groups(init_sensitivity.plan(args))
  assert [len(g) for g in groups] == [4, 4]
  assert {r.config.model.normalizer for r in groups[0]} == {'batch_norm'}
  assert sorted((r.config.model.init_stddev, r.config.seed) for r in groups[1]) == [
      (0.01, 0), (0.01, 1), (1.0, 0), (1.0, 1)]
  # A non-vmappable difference (the normalizer) makes programs of their own.
  sg = stats_gradient.plan(_args(stats_gradient, data='synthetic', steps=20, eval_every=10))
  assert [len(g) for g in plan_lib.vmap_groups(sg)] == [1, 1]
  assert {r.config.model.pre_norm_bias for r in sg} == {True}


# ---- end to end, tiny ----------------------------------------------------------------

@pytest.mark.parametrize('claim,extra', [
    ('init', ['--stddevs=0.01,1']),
    ('stats_gradient', []),
    ('jacobians', []),
    ('saturation', []),
])
def test_mlp_job_end_to_end_on_synthetic_data(tmp_path, claim, extra):
  proc = helpers.run_module('experiments.claims', [
      f'--claim={claim}', f'--workdir={tmp_path}/{claim}', '--data=synthetic', '--steps=20',
      '--eval_every=10', '--set=model.hidden_sizes=(16, 16)', *extra])
  assert proc.returncode == 0, proc.stderr[-3000:]
  module = sys.modules[claims.CLAIMS[claim]]
  root = tmp_path / claim
  for ext in ('json', 'md', 'png'):
    assert (root / f'{module.NAME}.{ext}').stat().st_size > 100
  summary = helpers.read_json(str(root / f'{module.NAME}.json'))
  assert summary['claims'] and all(
      c['verdict'] in ('holds', 'does not hold', 'not judged') for c in summary['claims'])
  md = (root / f'{module.NAME}.md').read_text()
  assert 'Command: `python -m experiments.' in md and "| the paper's claim |" in md
  if claim == 'stats_gradient':
    sg, bn = summary['networks']['stop_gradient'], summary['networks']['bn']
    # Through BN the bias's gradient is zero up to rounding; without the statistics not.
    assert bn['final_bias_norm'] < 1e-4 < sg['final_bias_norm']
  if claim == 'jacobians':
    assert summary['networks']['bn']['layers'] == ['hidden_0', 'hidden_1']
  if claim == 'saturation':
    assert summary['datasets']['synthetic']['bn']['histogram']['steps'] == [0, 10, 20]


@pytest.mark.slow
def test_dropout_job_end_to_end_on_synthetic_data(tmp_path):
  """The job through its command line on one network (one Inception program: two steps,
  two rates, one seed); the three networks' summary is checked on hand-made runs below."""
  proc = helpers.run_module('experiments.claims', [
      '--claim=dropout', f'--workdir={tmp_path}/dropout', '--data=synthetic', '--steps=2',
      '--eval_every=1', '--seeds=1', '--dropout_rates=0,0.4', '--networks=bn_x5',
      '--set=num_eval_examples=0'],  # the preset's 1,000 held-out images are real data's
      timeout=2400, env={'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = helpers.read_json(str(tmp_path / 'dropout' / 'dropout_need.json'))
  assert set(summary['networks']) == {'bn_x5'}
  rows = summary['networks']['bn_x5']['rows']
  assert [r['rate'] for r in rows] == [0.0, 0.4]
  assert all(r['final_accuracy'] is not None and r['train_test_gap'] is not None
             for r in rows)
  assert summary['networks']['bn_x5']['dropout_gain'] is not None
  # One network cannot judge the claim: it says so instead of a verdict.
  assert summary['claims'][0]['verdict'] == 'not judged'
  assert (tmp_path / 'dropout' / 'dropout_need.png').stat().st_size > 100


def test_dropout_summary_from_run_directories(tmp_path):
  """Per network and rate, means over seeds of the final/best accuracy and the
  train-test gap; the gain is best-with minus best-without; the verdict follows."""
  best = {'inception': (0.30, 0.40), 'bn_baseline': (0.90, 0.91), 'bn_x5': (0.92, 0.92)}
  names = []
  for network, (without, with_) in best.items():
    for rate, top in ((0.0, without), (0.4, with_)):
      for seed, shift in ((0, -0.01), (1, 0.01)):
        rows = [{'step': 0, 'eval_accuracy': 0.1, 'train_accuracy': 0.1},
                {'step': 5, 'eval_accuracy': top + shift, 'train_accuracy': 0.99},
                {'step': 10, 'eval_accuracy': top + shift - 0.02, 'train_accuracy': 0.97}]
        name = dropout_need._name(network, rate, seed)  # pylint: disable=protected-access
        helpers.write_run(tmp_path / name, rows)
        names.append(name)
  s = dropout_need.summarize(_load(tmp_path, names), _args(
      dropout_need, dropout_rates=(0.0, 0.4), seeds=2, data='synthetic'))
  for network, (without, with_) in best.items():
    rows = s['networks'][network]['rows']
    assert [r['best_accuracy'] for r in rows] == pytest.approx([without, with_])
    assert [r['final_accuracy'] for r in rows] == pytest.approx([without - 0.02,
                                                                 with_ - 0.02])
    assert [r['train_test_gap'] for r in rows] == pytest.approx(
        [0.97 - (without - 0.02), 0.97 - (with_ - 0.02)])
    assert s['networks'][network]['dropout_gain'] == pytest.approx(with_ - without)
  # Inception gains 0.10, the BN networks 0.01 and 0: the claim holds.
  assert s['claims'][0]['verdict'] == 'holds'
  dropout_need.plot(s).savefig(tmp_path / 'd.png')


def test_dropout_claim_is_not_judged_when_a_network_did_not_train(tmp_path):
  """A network whose best held-out accuracy stays below TRAINED x chance at every rate
  gives no dropout gain worth comparing: the verdict is 'not judged', whatever the
  gains say (here they would say 'holds')."""
  chance = 0.1  # helpers.write_run's runs have no num_classes: 10 classes
  best = {'inception': (0.10, dropout_need.TRAINED * chance - 0.01),
          'bn_baseline': (0.90, 0.88)}
  names = []
  for network, (without, with_) in best.items():
    for rate, top in ((0.0, without), (0.4, with_)):
      name = dropout_need._name(network, rate, 0)  # pylint: disable=protected-access
      helpers.write_run(tmp_path / name, [
          {'step': 0, 'eval_accuracy': 0.05, 'train_accuracy': 0.1},
          {'step': 5, 'eval_accuracy': top, 'train_accuracy': 0.5}])
      names.append(name)
  args = _args(dropout_need, dropout_rates=(0.0, 0.4), seeds=1, data='synthetic',
               networks=tuple(best))
  s = dropout_need.summarize(_load(tmp_path, names), args)
  assert s['networks']['inception']['dropout_gain'] > s['networks']['bn_baseline'][
      'dropout_gain'] + dropout_need.MARGIN
  assert not s['networks']['inception']['trained']
  assert s['networks']['bn_baseline']['trained']
  assert s['claims'][0]['verdict'] == 'not judged'
  assert 'inception did not train' in s['claims'][0]['here']
  # Just above the line the same runs are judged.
  assert dropout_need.judge({'inception': 0.1, 'bn_baseline': -0.02})['verdict'] == 'holds'
  gain = claims.fmt(s['networks']['inception']['dropout_gain'])
  assert f'| inception | {gain} | no |' in dropout_need.table(s)
  assert '| bn_baseline | -0.020 | yes |' in dropout_need.table(s)
