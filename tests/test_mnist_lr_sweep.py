"""The learning-rate sweep experiment end to end, tiny, through its command line."""

import pytest

from tests import helpers


pytestmark = pytest.mark.usefixtures('fast_compiles')


def test_lr_sweep_writes_table_json_and_plot(tmp_path):
  root = tmp_path / 'lr_sweep'
  # 1e38 overflows float32 in the first update: a diverged point.
  args = [f'--workdir={root}', '--steps=20', '--source=synthetic', '--lrs=0.1,1e38',
          '--eval_every=10']
  proc = helpers.run_module('experiments.mnist_lr_sweep', args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ('lr_sweep.png', 'lr_sweep.md', 'lr_sweep.json'):
    assert (root / name).stat().st_size > 0, name
  summary = helpers.read_json(root / 'lr_sweep.json')
  assert [r['lr'] for r in summary['rows']] == [0.1, 1e38]
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
  assert '| 1e+38 |' in table and 'diverged' in table
  assert 'Command: `python -m experiments.mnist_lr_sweep' in table
  # Every point is an ordinary run directory of a sweep (scripts.compare reads them).
  sweep = helpers.read_json(root / 'bn' / 'sweep.json')
  assert [r['params']['optimizer.learning_rate'] for r in sweep['runs']] == [0.1, 1e38]
  run_dir = root / 'bn' / sweep['runs'][0]['name']
  config = helpers.read_json(run_dir / 'config.json')
  assert config['num_train_steps'] == 20 and config['optimizer']['learning_rate'] == 0.1
  assert [r['step'] for r in helpers.read_jsonl(run_dir / 'metrics.jsonl')
          if 'eval_accuracy' in r] == [0, 10, 20]
  # Re-running finds every run finished and only rewrites the summary.
  again = helpers.run_module('experiments.mnist_lr_sweep', args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert helpers.read_json(root / 'lr_sweep.json')['rows'] == summary['rows']


def test_every_rate_diverged_names_no_rate_that_trains():
  from experiments import mnist_lr_sweep
  diverged = {'final_test_accuracy': None, 'max_test_accuracy': None, 'diverged_step': 3,
              'status': 'diverged', 'outcome': 'diverged', 'last_step': 3}
  summary = {'rows': [{'lr': 1e38, 'bn': diverged, 'baseline': diverged}], 'steps': 20,
             'data': {}, 'at_chance_below': 0.2, 'chance_accuracy': 0.1,
             'bn_trains_up_to_lr': None, 'baseline_trains_up_to_lr': None}
  assert 'BN none of the rates, baseline none of the rates' in mnist_lr_sweep.table(summary)
  mnist_lr_sweep.plot(summary)  # a figure without a single finished run


@pytest.mark.slow
def test_vmap_groups_in_their_own_processes_give_the_same_summary(tmp_path):
  """--how=vmap --parallel=2: each network's rates as one program in its own
  `scripts.sweep --vmap` process, both at once; the same numbers as in this process."""
  summaries = []
  for parallel in (1, 2):
    root = tmp_path / f'p{parallel}'
    proc = helpers.run_module('experiments.mnist_lr_sweep', [
        f'--workdir={root}', '--steps=20', '--source=synthetic', '--lrs=0.1,1e38',
        '--eval_every=10', f'--parallel={parallel}'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries.append(helpers.read_json(root / 'lr_sweep.json')['rows'])
  assert summaries[0] == summaries[1]
  assert (tmp_path / 'p2' / 'bn.log').exists()  # the group's process wrote its console
