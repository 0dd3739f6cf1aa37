"""The normalizer jobs end to end, tiny, through their command lines: bn_batch_size and
bn_only on synthetic data (the experiment driver's flags, outputs and refusals)."""

import pytest

from tests import helpers

TINY = ['--data=synthetic', '--models=mlp', '--set=model.hidden_sizes=(16,16)',
        '--set=data.image_size=8', '--set=data.num_train=256', '--set=data.num_test=64',
        '--set=eval_batch_size=64', '--set=model.init_stddev=0.1']


def _run(module, root, *args):
  proc = helpers.run_module(f'experiments.{module}', [f'--workdir={root}', *TINY, *args])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_bn_batch_size_runs_table_figure_and_resume(tmp_path):
  root = tmp_path / 'bbs'
  args = ['--steps=4', '--ghost_sizes=2,64', '--normalizers=batch_norm,batch_renorm,group_norm',
          '--set=optimizer.learning_rate=0.5']
  _run('bn_batch_size', root, *args)
  for name in ('bn_batch_size.png', 'bn_batch_size.json', 'bn_batch_size.md'):
    assert (root / name).stat().st_size > 0, name
  summary = helpers.read_json(root / 'bn_batch_size.json')
  got = {(r['normalizer'], r['examples_per_norm_batch']) for r in summary['rows']}
  assert got == {('batch_norm', 64), ('batch_norm', 2), ('batch_renorm', 64),
                 ('batch_renorm', 2), ('group_norm', None)}
  for r in summary['rows']:
    assert r['status'] == 'done' and 0 <= r['final_test_error'] <= 1, r
    metrics = helpers.read_jsonl(root / r['run'] / 'metrics.jsonl')
    final = [m['eval_accuracy'] for m in metrics if 'eval_accuracy' in m][-1]
    assert r['final_test_error'] == round(1 - final, 4)
  # Ghost batches of 2 are the statistics' batch; the whole batch is plain BN / renorm.
  def config(name):
    return helpers.read_json(root / 'mlp' / name / 'config.json')['model']
  assert (config('batch_norm_g2')['normalizer'], config('batch_norm_g2')['virtual_batch_size']) \
      == ('virtual_batch_norm', 2)
  assert (config('batch_norm_g64')['normalizer'], config('batch_norm_g64')['virtual_batch_size']) \
      == ('batch_norm', 0)
  renorm = config('batch_renorm_g2')
  assert (renorm['normalizer'], renorm['virtual_batch_size']) == ('batch_renorm', 2)
  assert config('group_norm')['norm_groups'] == 4
  assert '| BN |' in (root / 'bn_batch_size.md').read_text()
  # A re-run finds every run finished: nothing is trained again, the summary is the same.
  before = (root / 'mlp' / 'group_norm' / 'metrics.jsonl').stat().st_mtime_ns
  _run('bn_batch_size', root, *args)
  assert helpers.read_json(root / 'bn_batch_size.json')['rows'] == summary['rows']
  assert (root / 'mlp' / 'group_norm' / 'metrics.jsonl').stat().st_mtime_ns == before


def test_bn_batch_size_summarises_a_diverged_run_as_a_result(tmp_path):
  root = tmp_path / 'bbs'
  # 1e38 overflows float32 in the first update.
  _run('bn_batch_size', root, '--steps=4', '--normalizers=group_norm',
       '--set=optimizer.learning_rate=1e38')
  [row] = helpers.read_json(root / 'bn_batch_size.json')['rows']
  assert row['status'].startswith('diverged at step') and row['final_test_error'] is None
  assert 'diverged at step' in (root / 'bn_batch_size.md').read_text()


def test_bn_only_trains_gamma_beta_from_the_same_init(tmp_path):
  root = tmp_path / 'bn_only'
  _run('bn_only', root, '--steps=20', '--set=optimizer.learning_rate=0.5')
  for name in ('bn_only.png', 'bn_only.json', 'bn_only.md'):
    assert (root / name).stat().st_size > 0, name
  summary = helpers.read_json(root / 'bn_only.json')
  rows = {r['variant']: r for r in summary['rows']}
  assert set(rows) == {'full', 'bn_only', 'random'}
  total = 8 * 8 * 16 + 16 * 16 + 16 * 10 + 10  # kernels + the classifier's bias
  total += 2 * (16 + 16)                        # BN's gamma and beta
  assert rows['full']['total_params'] == rows['full']['trainable_params'] == total
  assert rows['bn_only']['trainable_params'] == 2 * (16 + 16)
  assert rows['random']['trainable_params'] == 0
  # Both runs start from the one random network that the 'random' row reports.
  curves = summary['curves']
  assert curves['mlp/full'][0] == curves['mlp/bn_only'][0] == [0, rows['random']['final_test_accuracy']]
  assert rows['full']['final_test_accuracy'] > 0.2  # twice chance: the full network learns


@pytest.mark.parametrize('module, flag, needle', [
    ('bn_only', '--steps=1', '--steps=1'),
    ('bn_batch_size', '--steps=1', '--steps=1'),
    ('bn_only', '--models=resnet', "--models='resnet'"),
    ('bn_batch_size', '--models=mlp,mlp', "--models='mlp,mlp'"),
    ('bn_only', '--set=seed', "--set='seed'"),
    ('bn_only', '--set=optimizer.trainable=all', 'sets optimizer.trainable for each run'),
    ('bn_batch_size', '--set=model.normalizer=none', 'sets model.normalizer for each run'),
    ('bn_batch_size', '--set=model.bn_epsilon=-1.0', 'model.bn_epsilon=-1.0'),
    ('bn_only', 'stray', 'unexpected arguments: stray'),
    ('bn_batch_size', '--ghost_sizes=3', '--ghost_sizes'),
    ('bn_batch_size', '--ghost_sizes=1', '--ghost_sizes'),
    ('bn_batch_size', '--ghost_sizes=2,3', '3 divides no chosen batch'),
    ('bn_batch_size', '--ghost_sizes=2,2', 'twice'),
    ('bn_batch_size', '--normalizers=batch_norm,weight_norm', '--normalizers'),
    ('bn_batch_size', '--normalizers=batch_norm,batch_norm', 'twice'),
])
def test_bad_flags_are_one_line_exit_2_before_any_run(tmp_path, module, flag, needle):
  proc = helpers.run_module(f'experiments.{module}',
                            [f'--workdir={tmp_path / "job"}', '--data=synthetic',
                             '--models=mlp', flag])
  err = proc.stderr
  assert proc.returncode == 2, err[-2000:]
  assert needle in err and err.count('\n') == 1 and err.startswith(f'{module}: error: '), err
  assert not (tmp_path / 'job').exists()
