"""The Section 4.2 ablation: every model's config says what the paper says, and trains.

Each of the seven ImageNet configs runs real training steps through the engine and the
ImageNet pipeline under `tfds.testing.mock_data` (shrunk: width 1/8, 32x32 crops,
batch 4); the small preset runs through the ablation experiment itself. XLA's optimisations are
off here: compiling seven Inceptions is what costs time on CPU, not running them.
"""

import json
import math
import os

import pytest

from tests import helpers

MODELS = ('inception', 'bn_baseline', 'bn_x5', 'bn_x30', 'bn_x5_sigmoid',
          'inception_x5', 'inception_sigmoid')


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _imagenet(model, **kw):
  from configs import imagenet_inception
  return imagenet_inception.get_config(f'model={model}' + ''.join(f',{k}={v}' for k, v in kw.items()))


def test_imagenet_configs_set_exactly_the_paper_changes():
  lr = {m: _imagenet(m).optimizer.learning_rate for m in MODELS}
  assert lr['inception'] == pytest.approx(0.0015) and lr['bn_baseline'] == pytest.approx(0.0015)
  assert lr['bn_x5'] == pytest.approx(0.0075) and lr['bn_x5_sigmoid'] == pytest.approx(0.0075)
  assert lr['bn_x30'] == pytest.approx(0.045) and lr['inception_x5'] == pytest.approx(0.0075)
  base, fast = _imagenet('inception'), _imagenet('bn_x5')
  assert base.batch_size == 32 and fast.batch_size == 32
  assert base.model.normalizer == 'none' and fast.model.normalizer == 'batch_norm'
  assert base.model.dropout_rate > 0 and fast.model.dropout_rate == 0
  assert fast.optimizer.weight_decay == pytest.approx(base.optimizer.weight_decay / 5)
  assert fast.optimizer.decay_steps == round(base.optimizer.decay_steps / 6)
  assert base.model.use_lrn and not fast.model.use_lrn
  assert (base.data.shuffle, fast.data.shuffle) == ('within_shard', 'thorough')
  assert (base.data.distortions, fast.data.distortions) == ('full', 'reduced')
  assert _imagenet('bn_x5_sigmoid').model.activation == 'sigmoid'
  assert _imagenet('bn_baseline').model.use_lrn  # BN-Baseline changes nothing else
  # Apart from those keys, BN-x5 and BN-x30 are the same run.
  x5 = helpers.flat(_imagenet('bn_x5'))
  x30 = helpers.flat(_imagenet('bn_x30'))
  assert {k for k in x5 if x5[k] != x30[k]} == {'optimizer.learning_rate'}


def test_imagenet_many_devices_keep_batch_32_statistics():
  c = _imagenet('bn_x30', batch=256)
  assert c.model.virtual_batch_size == 32
  assert c.optimizer.learning_rate == pytest.approx(0.045 * 8)
  assert _imagenet('bn_x30', batch=256, lr_scaling='none').optimizer.learning_rate == pytest.approx(0.045)
  with pytest.raises(ValueError, match='batch=100'):
    _imagenet('bn_x30', batch=100)
  with pytest.raises(ValueError, match="'resnet'"):
    _imagenet('resnet')


def _tiny_imagenet(model, data_dir):
  """An ImageNet ablation config shrunk for TFDS mock data: 32x32, width 1/8, 2 steps."""
  c = _imagenet(model)
  c.data.data_dir = str(data_dir)
  c.data.image_size = 32
  c.data.num_workers = 1
  c.model.width_multiplier = 0.125
  c.batch_size = 4
  c.eval_batch_size = 8
  c.num_train_steps = 2
  c.eval_every_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  return c


# Configs that differ only in the learning rate, a value a member sweep traces, train as
# the two members of one program: one compilation for both (test_member_sweep_on_the_
# imagenet_stream below sweeps the same keys, so its program is the same one, loaded
# from the session's compilation cache).
GROUPS = (('inception', 'inception_x5'), ('bn_baseline',), ('bn_x5', 'bn_x30'),
          ('bn_x5_sigmoid',), ('inception_sigmoid',))


def test_the_groups_hold_every_model_once():
  assert sorted(m for group in GROUPS for m in group) == sorted(MODELS)


@pytest.mark.parametrize('group', GROUPS, ids='+'.join)
def test_every_imagenet_config_trains_on_mock_data(tmp_path, group):
  import tensorflow_datasets as tfds
  from bn_research import train
  configs = {m: _tiny_imagenet(m, tmp_path) for m in group}
  base = configs[group[0]]
  points = [(str(tmp_path / m), {'optimizer.learning_rate': configs[m].optimizer.learning_rate,
                                 'seed': configs[m].seed}) for m in group]
  for (_, point), m in zip(points, group):  # each member is exactly its model's config
    assert helpers.flat(train.member_config(base, point)) == helpers.flat(configs[m])
  with tfds.testing.mock_data(num_examples=8):
    if len(group) == 1:
      results = [train.train_and_evaluate(base, points[0][0])]
    else:
      results = train.train_members(base, points)
  for (workdir, _), result in zip(points, results):
    assert result['status'] == 'done' and result['step'] == 2, (workdir, result)
    rows = helpers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    assert [r['step'] for r in rows if 'train_loss' in r] == [1, 2]
    assert all(math.isfinite(r['train_loss']) for r in rows if 'train_loss' in r)
    assert 0 <= rows[-1]['eval_accuracy'] <= 1


def test_ablation_experiment_writes_figures_2_and_3(tmp_path):
  """Two models, two seeds each (one vmapped program per model): the table's numbers
  are those of the seed-mean curve, recomputed here from the runs' metric files."""
  proc = helpers.run_module(
      'experiments.inception_ablation',
      [f'--workdir={tmp_path}', '--preset=small', '--data=synthetic', '--steps=4',
       '--seeds=2', '--models=inception,bn_x30', '--set=eval_every_steps=2',
       '--set=log_every_steps=2', '--set=checkpoint_every_steps=4',
       '--set=num_eval_examples=32', '--set=eval.population_batches=2'],
      env={'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = helpers.read_json(tmp_path / 'figure3.json')
  assert set(table['models']) == {'inception', 'bn_x30'}
  curves = {}
  for model in ('inception', 'bn_x30'):
    rows = [helpers.read_jsonl(tmp_path / model / f'seed={s}' / 'metrics.jsonl')
            for s in (0, 1)]
    assert helpers.read_json(tmp_path / model / 'seed=0' / 'data.json')['vmap_members'] == 2
    acc = [[r['eval_accuracy'] for r in seed_rows if 'eval_accuracy' in r] for seed_rows in rows]
    curves[model] = [(a + b) / 2 for a, b in zip(*acc)]
    entry = table['models'][model]
    assert entry['mean_curve']['steps'] == [0, 2, 4]
    assert entry['mean_curve']['eval_accuracy'] == pytest.approx(curves[model])
    assert entry['max_accuracy'] == pytest.approx(max(curves[model]))
    assert [s['max_accuracy'] for s in entry['seeds']] == pytest.approx([max(a) for a in acc])
    assert [s['curve']['eval_accuracy'] for s in entry['seeds']] == acc  # Figure 2's lines
    assert entry['status'] in ('trains', 'at chance')
  # The target is the inception model's own seed-mean maximum: it reaches it at its max.
  inception = table['models']['inception']
  assert table['target'] == pytest.approx(max(curves['inception']))
  assert inception['steps_to_target'] == inception['step_of_max']
  expected = next((s for s, v in zip([0, 2, 4], curves['bn_x30']) if v >= table['target']),
                  None)
  assert table['models']['bn_x30']['steps_to_target'] == expected
  assert os.path.getsize(tmp_path / 'figure2.png') > 1000
  assert '| bn_x30 |' in (tmp_path / 'figure3.md').read_text()


def test_seed_mean_curve_and_outcome_rules():
  from bn_research.analysis import curves as ab
  done, div = {'status': 'done'}, {'status': 'diverged', 'diverged_step': 30}
  assert ab.outcome([done, done], 0.5, 0.2) == 'trains'
  assert ab.outcome([done, done], 0.15, 0.2) == 'at chance'
  assert ab.outcome([div, div], 0.5, 0.2) == 'diverged'
  assert ab.outcome([done, div], 0.5, 0.2) == 'diverged in 1/2 seeds'
  steps, mean = ab.mean_curve([([0, 10, 20], [0.1, 0.5, 0.7]), ([0, 10], [0.3, 0.7])])
  assert steps == [0, 10] and mean == pytest.approx([0.2, 0.6])  # ends where a seed ended


def test_member_sweep_on_the_imagenet_stream(tmp_path):
  """Two BN-x5 members (learning rate and seed) as one program on the streamed ImageNet
  pipeline (TFDS mock data): both finish, share the batch stream, and differ."""
  import jax
  import numpy as np
  import tensorflow_datasets as tfds
  from bn_research import rundir, train
  c = _tiny_imagenet('bn_x5', tmp_path)
  points = [(str(tmp_path / 'a'), {'optimizer.learning_rate': 0.01, 'seed': 0}),
            (str(tmp_path / 'b'), {'optimizer.learning_rate': 0.1, 'seed': 1})]
  with tfds.testing.mock_data(num_examples=8):
    results = train.train_members(c, points)
  assert [r['status'] for r in results] == ['done', 'done']
  for workdir, _ in points:
    assert rundir.read_description(workdir)['vmap_members'] == 2
    assert [r['step'] for r in rundir.read_metrics(workdir) if 'train_loss' in r] == [1, 2]
  a, b = (rundir.load_latest(w)['params'] for w, _ in points)
  assert max(float(np.max(np.abs(x - y))) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))) > 1e-3


def test_calibration_rule_scores_the_end_of_training_and_flags_the_grid_edge():
  from experiments import inception_lr_calibration as cal
  assert cal.score([0.1, 0.5, 0.6, 0.7, 0.8], 'done') == pytest.approx(0.7)
  assert cal.score([0.1, 0.9, 0.9, 0.9], 'diverged') is None  # diverged: no score
  assert cal.score([0.5, 0.6], 'done') is None                  # too short to score
  assert cal.choose({0.01: 0.6, 0.02: 0.7, 0.05: 0.65}) == (0.02, False)
  # A diverged rate above the best brackets it: the edge is the grid's own ends.
  assert cal.choose({0.01: 0.6, 0.02: 0.7, 0.05: None}) == (0.02, False)
  assert cal.choose({0.01: 0.7, 0.02: 0.6}) == (0.01, True)
  assert cal.choose({0.005: 0.5, 0.01: 0.7, 0.02: 0.7, 0.05: 0.1}) == (0.01, False)  # tie
  assert cal.choose({0.01: None}) == (None, False)


def test_calibration_job_runs_its_sweep_and_applies_its_rule(tmp_path):
  """The calibration job end to end on synthetic data (2 rates, 6 steps, a thin
  network, two runs side by side): its choice is the rule applied to the runs' files."""
  from experiments import inception_lr_calibration as cal
  proc = helpers.run_module(
      'experiments.inception_lr_calibration',
      [f'--workdir={tmp_path}', '--data=synthetic', '--steps=6', '--lrs=0.01,0.1',
       '--set=model.width_multiplier=0.0625', '--set=eval_every_steps=2',
       '--set=eval.population_batches=2', '--set=num_eval_examples=32'],
      env={'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = helpers.read_json(tmp_path / 'lr_calibration.json')
  assert record['grid'] == [0.01, 0.1] and record['steps'] == 6
  scores = {}
  for lr in (0.01, 0.1):
    rows = helpers.read_jsonl(tmp_path / f'optimizer.learning_rate={lr:g}' / 'metrics.jsonl')
    acc = [r['eval_accuracy'] for r in rows if 'eval_accuracy' in r]
    assert [r['step'] for r in rows if 'eval_accuracy' in r] == [0, 2, 4, 6]
    scores[lr] = sum(acc[1:]) / 3  # the last 3 evaluations
  chosen = max(sorted(scores), key=lambda lr: scores[lr])
  assert record['base_learning_rate'] == chosen
  assert record['at_grid_edge']  # with two rates the best is always at an edge
  assert [r['score'] for r in record['rows']] == pytest.approx([scores[0.01], scores[0.1]])
  assert cal.choose(scores) == (chosen, True)
  assert os.path.getsize(tmp_path / 'lr_calibration.png') > 1000


def test_the_small_preset_uses_the_rate_its_calibration_chose():
  """BASE_LR is not chosen by hand: it is the committed calibration's choice, made at the
  preset's own step budget on its own data, with the rule the job states."""
  from configs import inception_small
  from experiments import inception_lr_calibration as cal
  record = helpers.read_json(os.path.join(helpers.REPO, inception_small.CALIBRATION))
  assert inception_small.BASE_LR == record['base_learning_rate']
  assert not record['at_grid_edge']
  assert record['grid'] == list(cal.GRID) and record['procedure'] == cal.RULE
  assert record['steps'] == inception_small.get_config('model=inception').num_train_steps
  assert record['data']['dataset'] == 'fashion_mnist'
  scores = {r['lr']: cal.score(r['eval_accuracy'][1:], 'done' if r['status'] == 'done'
                               else r['status']) for r in record['rows']}
  assert cal.choose(scores) == (record['base_learning_rate'], False)


CLAIMS = '''
import json, sys
sys.path.insert(0, '.')
from experiments import inception_ablation as ab
def row(steps, best, status='trains'):
    return {'steps_to_target': steps, 'max_accuracy': best, 'status': status}
table = {'models': {
    'inception': row(1400, 0.78), 'bn_baseline': row(600, 0.80), 'bn_x5': row(300, 0.83),
    'bn_x30': row(500, 0.82), 'bn_x5_sigmoid': row(None, 0.75),
    'inception_x5': row(None, 0.11, 'at chance'),
    'inception_sigmoid': row(None, 0.10, 'at chance')}}
print('RESULT' + json.dumps([[c['claim'], c['holds']] for c in ab.claims(table)]))
table['models']['inception_x5'] = row(None, 0.11, 'diverged in 1/2 seeds')
print('RESULT' + json.dumps({c['claim']: c['verdict'] for c in ab.claims(table)}))
table['models'] = {k: table['models'][k] for k in ('inception', 'bn_x30')}
print('RESULT' + json.dumps(ab.claims(table)))
tie = {'models': {'inception': row(100, 0.5), 'bn_baseline': row(100, 0.6)}}
print('RESULT' + json.dumps({c['claim']: c['verdict'] for c in ab.claims(tie)}))
'''


def test_the_papers_orderings_are_judged_from_the_table():
  proc = helpers.run_python(CLAIMS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  full, one_seed, partial, tie = (json.loads(part.splitlines()[0])
                             for part in proc.stdout.split('RESULT')[1:])
  holds = dict(full)
  assert len(full) == 14
  assert holds["BN-Baseline reaches Inception's maximum in fewer steps"]     # 600 < 1400
  assert holds["BN-Baseline ends above Inception's maximum"]                 # 0.80 > 0.78
  assert holds["BN-x5 reaches Inception's maximum in far fewer steps than Inception"]
  assert holds['BN-x5 reaches it in fewer steps than BN-Baseline']           # 300 < 600
  assert holds['BN-x30 reaches it in fewer steps than BN-Baseline']          # 500 < 600
  assert holds['BN-x30 starts slower than BN-x5 (reaches the target later)']  # 500 > 300
  assert not holds['BN-x30 ends above BN-x5']                                # 0.82 < 0.83
  assert not holds['Inception without BN at 5x the rate diverges']  # at chance, no NaN
  assert holds['Inception with sigmoids and no BN stays at chance']
  assert holds['BN-x5-Sigmoid trains']
  assert holds["BN-x5-Sigmoid stays below Inception's maximum"]              # 0.75 < 0.78
  assert one_seed['Inception without BN at 5x the rate diverges'] == 'partly'
  assert one_seed['Inception with sigmoids and no BN stays at chance'] == 'holds'
  # Only the claims whose models are all in the table are judged.
  assert [c['claim'] for c in partial] == [
      "BN-x30 reaches Inception's maximum in far fewer steps than Inception",
      "BN-x30 ends above Inception's maximum"]
  # Both at the target at the same evaluation (a scaled-down run): no verdict from a tie.
  assert tie["BN-Baseline reaches Inception's maximum in fewer steps"] == 'too short to judge'
  assert tie["BN-Baseline ends above Inception's maximum"] == 'holds'    # 0.6 > 0.5


def test_evaluate_a_streamed_imagenet_run_with_population_statistics(tmp_path):
  """`bn_research.evaluate` on the ImageNet stream (TFDS mock data): its centre view with
  the moving averages is the engine's logged evaluation, and Algorithm 2's statistics
  come from the stream's first training batches (which the engine refuses to do)."""
  import tensorflow_datasets as tfds
  from bn_research import evaluate as ev
  from bn_research import train
  c = _tiny_imagenet('bn_x5', tmp_path)
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=8):
    assert train.train_and_evaluate(c, workdir)['status'] == 'done'
    logged = [r for r in helpers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
              if 'eval_accuracy' in r][-1]
    plain = ev.evaluate(ev.make_plan([workdir], crops=['center']))
    population = ev.evaluate(ev.make_plan([workdir], crops=['center', 'flip'],
                                          batch_stats='population', population_batches=2))
  (row,) = plain['rows']
  assert plain['runs'][0]['batch_stats'] == 'moving_average'
  assert row['top1_accuracy'] == pytest.approx(logged['eval_accuracy'], abs=1e-6)
  assert row['nll'] == pytest.approx(logged['eval_loss'], rel=1e-4)
  assert row['top5_accuracy'] == pytest.approx(logged['eval_top5_accuracy'], abs=1e-6)
  assert population['runs'][0]['batch_stats'] == 'population'
  assert [r['views'] for r in population['rows']] == [1, 2]
  assert all(r['count'] == row['count'] > 0 and math.isfinite(r['nll'])
             for r in population['rows'])
  assert population['rows'][0]['nll'] != pytest.approx(row['nll'], rel=1e-6)
