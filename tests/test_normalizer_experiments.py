"""The normalizer experiments end to end, tiny: bn_batch_size and bn_only on synthetic data."""

import json

import pytest

from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')

TINY = ['model.hidden_sizes=(16,16)', 'data.image_size=8', 'data.num_train=256',
        'data.num_test=64', 'eval_batch_size=64', 'optimizer.learning_rate=0.5',
        'model.init_stddev=0.1']


def test_bn_batch_size_runs_table_figure_and_resume(tmp_path):
  from experiments import bn_batch_size
  root = tmp_path / 'bbs'
  kw = dict(steps=4, models=('mlp',), data='synthetic', ghost_sizes=(2, 64),
            normalizers=('batch_norm', 'batch_renorm', 'group_norm'), extra=TINY)
  summary = bn_batch_size.run(str(root), **kw)
  for name in ('bn_batch_size.png', 'bn_batch_size.json', 'bn_batch_size.md'):
    assert (root / name).stat().st_size > 0, name
  assert json.loads((root / 'bn_batch_size.json').read_text()) == json.loads(json.dumps(summary))
  got = {(r['normalizer'], r['examples_per_norm_batch']) for r in summary['rows']}
  assert got == {('batch_norm', 64), ('batch_norm', 2), ('batch_renorm', 64),
                 ('batch_renorm', 2), ('group_norm', None)}
  for r in summary['rows']:
    assert r['status'] == 'done' and 0 <= r['final_test_error'] <= 1, r
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
  # A re-run finds every run finished: nothing is trained again.
  before = (root / 'mlp' / 'group_norm' / 'metrics.jsonl').stat().st_mtime_ns
  again = bn_batch_size.run(str(root), **kw)
  assert again['rows'] == summary['rows']
  assert (root / 'mlp' / 'group_norm' / 'metrics.jsonl').stat().st_mtime_ns == before


def test_bn_only_trains_gamma_beta_from_the_same_init(tmp_path):
  from experiments import bn_only
  root = tmp_path / 'bn_only'
  summary = bn_only.run(str(root), steps=20, models=('mlp',), data='synthetic', extra=TINY)
  for name in ('bn_only.png', 'bn_only.json', 'bn_only.md'):
    assert (root / name).stat().st_size > 0, name
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


@pytest.mark.parametrize('module', ['bn_batch_size', 'bn_only'])
@pytest.mark.parametrize('flag, needle', [
    ('--steps=1', '--steps=1'),
    ('--models=resnet', "--models='resnet'"),
    ('--models=mlp,mlp', "--models='mlp,mlp'"),
    ('--set=seed', "--set='seed'"),
    ('--set=model.normalizer=none', 'sets model.normalizer for each run'),
    ('--set=model.bn_epsilon=-1.0', 'model.bn_epsilon=-1.0'),
])
def test_bad_flags_are_one_line_exit_2_before_any_run(tmp_path, capsys, module, flag, needle):
  import importlib
  main = importlib.import_module(f'experiments.{module}').main
  with pytest.raises(SystemExit) as exit_info:
    main([f'--workdir={tmp_path / "job"}', '--data=synthetic', flag])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert needle in err and err.count('\n') == 1, err
  assert not (tmp_path / 'job').exists()


@pytest.mark.parametrize('flag, needle', [
    ('--ghost_sizes=3', '--ghost_sizes'), ('--ghost_sizes=1', '--ghost_sizes'),
    ('--ghost_sizes=2,3', '3 divides no chosen batch'), ('--ghost_sizes=2,2', 'twice'),
    ('--normalizers=batch_norm,weight_norm', '--normalizers'),
    ('--normalizers=batch_norm,batch_norm', 'each named once'),
])
def test_bn_batch_size_flags(tmp_path, capsys, flag, needle):
  from experiments import bn_batch_size
  with pytest.raises(SystemExit) as exit_info:
    bn_batch_size.main([f'--workdir={tmp_path / "job"}', '--models=mlp', flag])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and needle in err and err.count('\n') == 1, err
