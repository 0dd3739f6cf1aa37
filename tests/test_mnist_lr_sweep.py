"""The learning-rate sweep experiment end to end, tiny: files, table keys, the plot."""

import json

import pytest

from tests import helpers


pytestmark = pytest.mark.usefixtures('fast_compiles')


def test_lr_sweep_writes_table_json_and_plot(tmp_path):
  from experiments import mnist_lr_sweep
  root = tmp_path / 'lr_sweep'
  lrs = (0.1, 1e38)  # 1e38 overflows float32 in the first update: a diverged point
  summary = mnist_lr_sweep.run(str(root), steps=20, source='synthetic', lrs=lrs,
                               eval_every=10)
  for name in ('lr_sweep.png', 'lr_sweep.md', 'lr_sweep.json'):
    assert (root / name).stat().st_size > 0, name
  assert json.loads((root / 'lr_sweep.json').read_text()) == json.loads(json.dumps(summary))
  assert [r['lr'] for r in summary['rows']] == list(lrs)
  for row in summary['rows']:
    for net in ('bn', 'baseline'):
      assert {'final_test_accuracy', 'max_test_accuracy', 'diverged_step', 'status',
              'outcome'} <= set(row[net])
  low = summary['rows'][0]
  for net in ('bn', 'baseline'):
    assert low[net]['status'] == 'done' and low[net]['diverged_step'] is None
    assert 0 <= low[net]['final_test_accuracy'] <= 1
    assert low[net]['max_test_accuracy'] >= low[net]['final_test_accuracy']
  high = summary['rows'][1]['bn']
  assert high['outcome'] == 'diverged' and high['diverged_step'] > 0
  assert high['final_test_accuracy'] is None
  table = (root / 'lr_sweep.md').read_text()
  assert '| lr | BN final | BN max | BN diverged at |' in table
  assert f'| 1e+38 |' in table and 'diverged' in table
  # Every point is an ordinary run directory of a sweep (scripts.compare reads them).
  sweep = helpers.read_json(root / 'bn' / 'sweep.json')
  assert [r['params']['optimizer.learning_rate'] for r in sweep['runs']] == list(lrs)
  run_dir = root / 'bn' / sweep['runs'][0]['name']
  config = helpers.read_json(run_dir / 'config.json')
  assert config['num_train_steps'] == 20 and config['optimizer']['learning_rate'] == 0.1
  assert [r['step'] for r in helpers.read_jsonl(run_dir / 'metrics.jsonl')
          if 'eval_accuracy' in r] == [0, 10, 20]
  # Re-running finds every run finished and only rewrites the summary.
  again = mnist_lr_sweep.run(str(root), steps=20, source='synthetic', lrs=lrs, eval_every=10)
  assert again['rows'] == summary['rows']
