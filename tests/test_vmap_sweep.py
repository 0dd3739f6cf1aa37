"""vmapped sweeps: every member equals its own `train_and_evaluate` run.

Kept to five trained configurations (two vmapped programs, three separate runs shared
through a module cache), compiled with XLA's optimizations off, so that the file runs
in well under a minute on two busy cores.
"""

import math
import os

import jax
import numpy as np
import pytest

from tests import helpers

TOL = 1e-5
CONFIG = os.path.join(helpers.REPO, 'configs', 'mnist_mlp.py') + ':bn,source=synthetic'
# BN keeps this tiny MLP finite up to lr ~1e30; at 1e38 the first update overflows
# float32 and the loss of step 2 is NaN (a separate engine run diverges there too).
DIVERGING_LR = 1e38
TINY_OVERRIDES = [  # tests.helpers.tiny_mlp_config, written as --config overrides
    '--config.data.image_size=8', '--config.data.num_train=512',
    '--config.data.num_test=128', '--config.batch_size=16',
    '--config.num_train_steps=40', '--config.eval_every_steps=20',
    '--config.log_every_steps=10', '--config.checkpoint_every_steps=20',
    '--config.steps_per_dispatch=10', '--config.eval_batch_size=64',
    '--config.model.hidden_sizes=(16, 16)', '--config.probe.num_examples=64',
    '--config.optimizer.learning_rate=0.1']


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _config(lr=0.1, seed=0, init=0.1):
  # Every swept value explicit: the config file's defaults may change.
  # Population inference as the MNIST config (and the sweep script's runs) use it:
  # vmapped members then estimate their own population statistics.
  return helpers.tiny_mlp_config(**{'optimizer.learning_rate': lr, 'seed': seed,
                                    'model.init_stddev': init,
                                    'eval.batch_stats': 'population'})


@pytest.fixture(scope='module')
def separate_runs(tmp_path_factory):
  """Separate engine runs keyed by (learning_rate, seed, init_stddev), made on demand."""
  from bn_research import train
  root = tmp_path_factory.mktemp('separate')
  cache = {}

  def get(lr=0.1, seed=0, init=0.1):
    key = (lr, seed, init)
    if key not in cache:
      config = _config(lr, seed, init)
      workdir = root / f'lr{lr}_seed{seed}_init{init}'
      cache[key] = (workdir, train.train_and_evaluate(config, str(workdir)))
    return cache[key]

  return get


def _assert_same_run(vmapped_dir, separate_dir):
  """Same params, batch stats, metric rows (steps and values) and final status."""
  from bn_research import rundir
  a = rundir.load_latest(str(vmapped_dir))
  b = rundir.load_latest(str(separate_dir))
  assert int(a['step']) == int(b['step'])
  for part in ('params', 'batch_stats', 'opt_state'):
    flat_a = jax.tree_util.tree_leaves_with_path(a[part])
    flat_b = jax.tree_util.tree_leaves_with_path(b[part])
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b], part
    for (path, x), (_, y) in zip(flat_a, flat_b):
      np.testing.assert_allclose(x, y, atol=TOL, rtol=0, err_msg=f'{part} {path}')
  rows_a = helpers.read_jsonl(vmapped_dir / 'metrics.jsonl')
  rows_b = helpers.read_jsonl(separate_dir / 'metrics.jsonl')
  assert [sorted(r) for r in rows_a] == [sorted(r) for r in rows_b]
  for ra, rb in zip(rows_a, rows_b):
    for key in ra:
      if key != 'steps_per_second':
        assert ra[key] == pytest.approx(rb[key], abs=TOL), (ra['step'], key)
  sa = helpers.read_json(vmapped_dir / 'status.json')
  sb = helpers.read_json(separate_dir / 'status.json')
  assert sa['status'] == sb['status'] == 'done' and sa['step'] == sb['step']
  assert sa['eval_accuracy'] == pytest.approx(sb['eval_accuracy'], abs=TOL)
  assert helpers.read_json(vmapped_dir / 'config.json') == helpers.read_json(
      separate_dir / 'config.json')


def test_learning_rate_sweep_equals_separate_runs_and_a_diverging_member_stops(
    tmp_path, separate_runs):
  from bn_research import train
  base = _config()
  lrs = (0.1, 0.3, DIVERGING_LR)
  points = [(str(tmp_path / f'lr={lr}'), {'optimizer.learning_rate': lr}) for lr in lrs]
  results = train.train_members(base, points)
  assert [r['status'] for r in results] == ['done', 'done', 'diverged']
  for lr in lrs[:2]:
    _assert_same_run(tmp_path / f'lr={lr}', separate_runs(lr=lr)[0])

  # The diverging member is recorded as the engine records it, while the others finish.
  bad = tmp_path / f'lr={DIVERGING_LR}'
  status = helpers.read_json(bad / 'status.json')
  assert status['status'] == 'diverged'
  assert 0 < status['diverged_step'] == status['step'] <= 10
  rows = helpers.read_jsonl(bad / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [0, status['diverged_step']]
  assert rows[-1]['train_loss'] == 'nan'
  assert helpers.read_json(bad / 'config.json')['optimizer']['learning_rate'] == DIVERGING_LR
  from bn_research import rundir
  final = rundir.load_latest(str(bad))  # the step-0 state: finite
  assert int(final['step']) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(final['params']))

  # Re-running finds every member finished: it compiles nothing (no XLA compilation is
  # requested, from the persistent cache or not) and leaves every file as it was.
  files = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
  with helpers.count_compilations() as compiled:
    again = train.train_members(base, points)
  assert [r['status'] for r in again] == ['done', 'done', 'diverged']
  assert compiled == [], compiled
  assert {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()} == files


def test_seed_and_init_sweep_through_the_sweep_script(tmp_path, separate_runs):
  from scripts import sweep as sweep_script
  sweep_dir = tmp_path / 'sweep'
  code = sweep_script.sweep(
      CONFIG, str(sweep_dir),
      ['seed=0,1', 'model.init_stddev=0.1,0.5'], None, TINY_OVERRIDES, vmap=True)
  assert code == 0
  sweep = helpers.read_json(sweep_dir / 'sweep.json')
  assert len(sweep['runs']) == 4
  for seed, init in ((0, 0.1), (1, 0.5)):
    member = sweep_dir / f'seed={seed},model.init_stddev={init}'
    assert helpers.read_json(member / 'data.json')['vmap_members'] == 4
    _assert_same_run(member, separate_runs(seed=seed, init=init)[0])
  # Members with other seeds read other data and start elsewhere.
  acc = [helpers.read_json(sweep_dir / r['name'] / 'status.json')['eval_accuracy']
         for r in sweep['runs']]
  assert len({round(a, 6) for a in acc}) > 1


@pytest.mark.parametrize('args, fragment', [
    (['--sweep=model.normalizer=batch_norm,none'], "cannot sweep 'model.normalizer'"),
    (['--sweep=model.init_stddev=0.1,1', '--config.model.name=inception',
      '--config.probe.enabled=false'],
     'read only by the MLP'),
    (['--sweep=seed=0,1', '--config.parallelism=pmap',
      '--config.eval.batch_stats=moving_average'], 'needs parallelism=jit'),
    (['--sweep=seed=0,1', '--print_commands'], 'no per-run commands'),
])
def test_vmap_refuses_what_it_cannot_run(tmp_path, args, fragment):
  from bn_research import sweep as sweep_lib
  from scripts import sweep as sweep_script
  overrides, rest = sweep_lib.split_config_overrides(args)
  sweeps = [a.split('=', 1)[1] for a in rest if a.startswith('--sweep=')]
  with pytest.raises(ValueError, match=fragment):
    sweep_script.sweep(CONFIG, str(tmp_path / 's'),
                       sweeps, None, overrides, print_commands='--print_commands' in rest,
                       vmap=True)
  assert not (tmp_path / 's').exists()  # refused before anything was written


def test_member_config_types_and_rejects_fractional_seeds():
  from bn_research import train
  base = _config()
  c = train.member_config(base, {'optimizer.learning_rate': 1, 'seed': 3.0})
  assert isinstance(c.optimizer.learning_rate, float) and c.seed == 3
  assert base.seed == 0 and math.isclose(base.optimizer.learning_rate, 0.1)
  with pytest.raises(train.SweepError, match='integer'):
    train.member_config(base, {'seed': 1.5})


def test_sigterm_to_a_vmap_sweep_saves_every_member_and_exits_143_in_one_line(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  sweep_dir = tmp_path / 's'
  long_run = [o for o in TINY_OVERRIDES if 'num_train_steps' not in o] + [
      '--config.num_train_steps=400000']
  env = dict(os.environ)
  env['PYTHONPATH'] = helpers.REPO + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'scripts.sweep', f'--config={CONFIG}', f'--workdir={sweep_dir}',
       '--sweep=seed=0,1', '--vmap', *long_run], cwd=helpers.REPO, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = sweep_dir / 'seed=1' / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and 'train_loss' in metrics.read_text()):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 143, stderr[-3000:]
  assert 'Traceback' not in stderr
  assert 'signal 15' in stderr.strip().splitlines()[-1]
  for seed in (0, 1):
    status = helpers.read_json(sweep_dir / f'seed={seed}' / 'status.json')
    assert status['status'] == 'interrupted'
