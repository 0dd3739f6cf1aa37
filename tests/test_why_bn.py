"""The why-BN experiment: its configs, and its summary of measurement rows."""

import os
import types

import numpy as np
import pytest

from bn_research import experiment
from bn_research import plan as plan_lib
from experiments import why_bn
from tests import helpers


def _rows(scale, seed):
  rng = np.random.default_rng(seed)
  rows = [{'step': 0, 'eval_accuracy': 0.1}]
  for step in (10, 20, 30):
    row = {'step': step, 'eval_accuracy': 0.5 + step / 100}
    for i, layer in enumerate(('hidden_0', 'hidden_1', 'logits')):
      row[f'ics_l2/{layer}'] = 0.0 if i == 0 else scale * float(rng.random())
      row[f'ics_cos/{layer}'] = 1.0 if i == 0 else float(rng.random())
    lo = scale * float(rng.random())
    row.update(landscape_loss_min=lo, landscape_loss_max=lo + scale,
               landscape_loss_range=scale, landscape_grad_pred_min=scale / 2,
               landscape_grad_pred=scale * float(rng.random()) + scale,
               landscape_beta=10 * scale)
    rows.append(row)
  return rows


def test_summary_means_and_comparison_from_run_directories(tmp_path):
  bn_rows, base_rows = _rows(0.1, 0), _rows(10.0, 1)
  helpers.write_run(tmp_path / 'bn', bn_rows)
  helpers.write_run(tmp_path / 'baseline', base_rows)
  records = [experiment.read(plan_lib.Run(n, str(tmp_path / n), None))
             for n in ('bn', 'baseline')]
  summary = why_bn.summarize(records, types.SimpleNamespace(model='mlp', etas=(0.1,)))
  bn = summary['bn']
  assert bn['layers'] == ['hidden_0', 'hidden_1', 'logits']
  assert [s for s, _ in bn['ics_l2']['logits']] == [10, 20, 30]
  np.testing.assert_allclose(bn['mean_ics_l2']['hidden_1'],
                             np.mean([r['ics_l2/hidden_1'] for r in bn_rows[1:]]))
  np.testing.assert_allclose(summary['baseline']['mean_landscape_grad_pred'],
                             np.mean([r['landscape_grad_pred'] for r in base_rows[1:]]))
  assert bn['final_eval_accuracy'] == pytest.approx(0.8)
  c = summary['comparison']
  assert c['layers_compared'] == ['hidden_1', 'logits']  # layer 1: no shift by definition
  assert c['layers_where_bn_ics_l2_is_lower'] == ['hidden_1', 'logits']
  assert c['bn_loss_range_lower'] and c['bn_grad_pred_lower'] and c['bn_beta_lower']
  assert '| BN | 0.8000 |' in why_bn.table(summary)
  why_bn.plot(summary).savefig(tmp_path / 'why_bn.png')
  assert os.path.getsize(tmp_path / 'why_bn.png') > 10_000


def _args(**kw):
  base = dict(model='mlp', data='synthetic', steps=40, measure_every=20, etas=(0.1, 0.2),
              workdir='/nonexistent/why_bn', overrides={})
  return types.SimpleNamespace(**{**base, **kw})


def test_network_configs_differ_only_in_normalizer_and_measure_by_default():
  bn, base = (why_bn.network_run(net, _args()).config for net in ('bn', 'baseline'))
  assert (bn.model.normalizer, base.model.normalizer) == ('batch_norm', 'none')
  assert bn.measure.every_steps == 20 and bn.measure.etas == (0.1, 0.2)
  assert bn.eval_every_steps == 20 and bn.num_train_steps == 40
  base.model.normalizer = 'batch_norm'
  assert base.to_json() == bn.to_json()
  tuned = why_bn.network_run('bn', _args(overrides={'optimizer.learning_rate': 0.5}))
  assert tuned.config.optimizer.learning_rate == 0.5
  with pytest.raises(ValueError, match='optimizer.lr=0.5: no such config key'):
    why_bn.network_run('bn', _args(overrides={'optimizer.lr': 0.5}))


def test_bad_flag_is_one_line_and_exit_code_2(tmp_path):
  proc = helpers.run_module('experiments.why_bn', [f'--workdir={tmp_path}/out',
                                                   '--networks=bn,batchnorm'])
  assert proc.returncode == 2
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith("why_bn: error: --networks='batchnorm' is invalid: must be one of "
                         "'bn', 'noisy_bn', 'baseline'"), line
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('args, fragment', [
    (['--data=fashion_mnist'], "--data='fashion_mnist' is invalid for --model=mlp"),
    (['--model=inception', '--data=offline'], "--data='offline' is invalid"),
    (['--etas=0.1,-1'], '--etas=-1'),
    (['--measure_every=0'], '--measure_every=0'),
    (['--set=optimizer.learning_rate=-1'], 'optimizer.learning_rate'),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, args, fragment):
  proc = helpers.run_module('experiments.why_bn', [f'--workdir={tmp_path}/out', *args])
  assert proc.returncode == 2, proc.stderr[-2000:]
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith('why_bn: error: ') and fragment in line, line
  assert not os.listdir(tmp_path)


def test_job_measures_every_network(tmp_path):
  """End to end through the command line: the engine runs the measurement (config
  measure.*) for the noisy BN normalizer and the others. A renamed normalizer or hook
  fails here, never skips."""
  from bn_research import normalization
  from bn_research.engine import steps as engine_steps  # pylint: disable=g-import-not-at-top
  assert 'noisy_batch_norm' in normalization.NORMALIZERS
  assert callable(engine_steps.make_measure_fn)
  proc = helpers.run_module('experiments.why_bn', [
      f'--workdir={tmp_path}', '--data=synthetic', '--steps=40', '--measure_every=20',
      '--etas=0.05,0.1'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = helpers.read_json(tmp_path / 'why_bn.json')
  assert summary['etas'] == [0.05, 0.1] and summary['model'] == 'mlp'
  for net in why_bn.NETWORKS:
    s = summary[net]
    assert s['layers'] == ['hidden_0', 'hidden_1', 'hidden_2', 'logits']
    assert [step for step, _ in s['ics_l2']['logits']] == [0, 20, 40]
    assert s['mean_ics_l2']['hidden_0'] == 0.0
    assert s['mean_landscape_loss_range'] >= 0 and s['mean_landscape_beta'] > 0
  assert os.path.getsize(tmp_path / 'why_bn.png') > 10_000
  assert '| noisy BN |' in (tmp_path / 'why_bn.md').read_text()


def test_a_diverged_network_is_summarised_as_a_result(tmp_path):
  proc = helpers.run_module('experiments.why_bn', [
      f'--workdir={tmp_path}', '--data=synthetic', '--steps=4', '--measure_every=2',
      '--etas=0.1', '--networks=baseline', '--set=optimizer.learning_rate=1e38'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  s = helpers.read_json(tmp_path / 'why_bn.json')['baseline']
  assert s['status'] == 'diverged'
  assert '| no BN |' in (tmp_path / 'why_bn.md').read_text()


def test_a_library_error_is_one_line_and_exit_code_2(tmp_path):
  a_file = tmp_path / 'not_a_dir'
  a_file.write_text('')
  proc = helpers.run_module('experiments.why_bn', [f'--workdir={a_file}', '--data=synthetic',
                                                   '--steps=4'])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and str(a_file) in lines[0] and 'Traceback' not in proc.stderr
