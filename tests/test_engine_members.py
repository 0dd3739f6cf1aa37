"""Member sweeps through the one engine: spread over devices, any model, kill/resume,
mixed precision, signals.

Each member of a sweep must equal its own separate `train_and_evaluate` run: same
parameters, batch statistics and metric rows, up to float rounding (XLA may pick other
kernels for a batched matmul than for a single one).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from tests import helpers

# The stated tolerance of the Inception member-vs-separate-run comparisons (see
# test_two_member_inception_sweep_equals_separate_runs for where it comes from).
TOL = 1e-5

SPREAD = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, '.')
    from tests import helpers
    from bn_research import train, rundir
    assert jax.device_count() == 8, jax.devices()
    root = {root!r}

    def config(**kw):
        return helpers.tiny_mlp_config(num_train_steps=10, eval_every_steps=10,
                                       log_every_steps=5, checkpoint_every_steps=10,
                                       steps_per_dispatch=5, batch_size=32,
                                       eval_batch_size=64, **kw)

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    out = {{}}
    for k in (8, 4):
        lrs = [0.05 * (i + 1) for i in range(k)]
        points = [(f'{{root}}/k{{k}}_{{i}}', {{'optimizer.learning_rate': lr}})
                  for i, lr in enumerate(lrs)]
        train.train_members(config(), points)
        diffs, meshes = [], []
        for (w, _), lr in zip(points, lrs):
            sep = f'{{root}}/sep_{{lr}}'
            train.train_and_evaluate(config(num_devices=1, **{{'optimizer.learning_rate': lr}}), sep)
            a, b = rundir.load_latest(w), rundir.load_latest(sep)
            la = [r['train_loss'] for r in rundir.read_metrics(w) if 'train_loss' in r]
            lb = [r['train_loss'] for r in rundir.read_metrics(sep) if 'train_loss' in r]
            diffs.append(max(max_diff(a['params'], b['params']),
                             max_diff(a['batch_stats'], b['batch_stats']),
                             float(np.max(np.abs(np.subtract(la, lb))))))
            meshes.append(rundir.read_description(w)['mesh'])
        out[k] = dict(diff=max(diffs), meshes=meshes,
                      spread=max_diff(rundir.load_latest(points[0][0])['params'],
                                      rundir.load_latest(points[-1][0])['params']))
    print('RESULT' + json.dumps(out))
''')


def test_member_sweep_spread_over_8_devices_equals_separate_runs(tmp_path):
  """8 learning rates on 8 devices: one member per device (mesh 8 x 1); 4 on 8: each
  member data-parallel over 2 devices (4 x 2). BN statistics stay within a member."""
  proc = helpers.run_python(SPREAD.format(root=str(tmp_path)), devices=8,
                            env={'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'})
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split('RESULT')[-1])
  assert out['8']['meshes'] == [{'members': 8, 'data': 1}] * 8
  assert out['4']['meshes'] == [{'members': 4, 'data': 2}] * 4
  for k in ('8', '4'):
    assert out[k]['diff'] < 1e-4, out
    assert out[k]['spread'] > 1e-3  # the members did train differently


def _inception_config(**overrides):
  sys.path.insert(0, helpers.REPO)
  from configs import inception_small
  c = inception_small.get_config('model=bn_x5,data=synthetic,steps=2')
  c.data.num_train, c.data.num_test = 64, 16
  c.model.width_multiplier = 0.0625
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_eval_examples = 16
  c.eval_every_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  return helpers.set_keys(c, overrides)


@pytest.mark.usefixtures('fast_compiles')
def test_two_member_inception_sweep_equals_separate_runs(tmp_path):
  """BN-Inception members vmapped in one program: the learning rate and the dropout
  rate (a traced, per-member value) differ; each member equals its own run.

  Stated tolerance: 1e-5 absolute on parameters and BN statistics and 1e-5 relative on
  losses, over 2 steps at small learning rates. Batched convolutions round differently
  from single ones (6e-7 after one step); this tiny network's gradients are so sharp
  (ReLU and max-pool switches, BN on near-constant channels) that at lr 0.05 such
  differences grow to 5e-3 in one more step, so longer or faster comparisons would
  measure chaos, not the engine. A wrong dropout mask, data order or learning rate
  differs by orders of magnitude more.
  """
  from bn_research import rundir, train
  base = _inception_config(**{'eval.batch_stats': 'moving_average'})  # population: below
  points = [(str(tmp_path / 'a'), {'optimizer.learning_rate': 0.01, 'model.dropout_rate': 0.0}),
            (str(tmp_path / 'b'), {'optimizer.learning_rate': 0.005, 'model.dropout_rate': 0.3})]
  results = train.train_members(base, points)
  assert [r['status'] for r in results] == ['done', 'done']
  for workdir, point in points:
    separate = str(tmp_path / ('sep_' + os.path.basename(workdir)))
    train.train_and_evaluate(train.member_config(base, point), separate)
    a, b = rundir.load_latest(workdir), rundir.load_latest(separate)
    for part in ('params', 'batch_stats'):
      for x, y in zip(jax.tree_util.tree_leaves(a[part]), jax.tree_util.tree_leaves(b[part])):
        np.testing.assert_allclose(x, y, atol=TOL, rtol=0)
    rows_a, rows_b = rundir.read_metrics(workdir), rundir.read_metrics(separate)
    assert [r['step'] for r in rows_a] == [r['step'] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
      for key in ('train_loss', 'eval_loss'):
        if key in ra:
          assert ra[key] == pytest.approx(rb[key], rel=TOL)
  assert rundir.read_description(points[0][0])['vmap_members'] == 2


MESH_INCEPTION = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, '.')
    from tests import helpers
    from tests.test_engine_members import _inception_config
    from bn_research import train, rundir
    assert jax.device_count() == 4, jax.devices()
    root = {root!r}
    base = _inception_config(**{{'eval.batch_stats': 'population', 'eval.population_batches': 2}})
    points = [(f'{{root}}/m0', {{'seed': 0, 'optimizer.learning_rate': 0.01}}),
              (f'{{root}}/m1', {{'seed': 1, 'optimizer.learning_rate': 0.005}})]
    train.train_members(base, points)
    out = dict(mesh=rundir.read_description(points[0][0])['mesh'], diffs=[])
    for w, point in points:
        sep = w + '_sep'
        train.train_and_evaluate(train.member_config(base, dict(point, num_devices=1)), sep)
        a, b = rundir.load_latest(w), rundir.load_latest(sep)
        d = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for part in ('params', 'batch_stats')
                for x, y in zip(jax.tree_util.tree_leaves(a[part]), jax.tree_util.tree_leaves(b[part])))
        ra, rb = rundir.read_metrics(w), rundir.read_metrics(sep)
        rel = max(abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(ra, rb)
                  for k in ('train_loss', 'eval_loss') if k in x)
        out['diffs'].append([d, rel, len(ra) == len(rb)])
    print('RESULT' + json.dumps(out))
''')


def test_inception_members_sharded_over_members_and_data_equal_separate_runs(tmp_path):
  """2 BN-Inception members on 4 devices (mesh 2 x 2: each member on its own pair of
  devices, its batch split over the pair) equal their one-device runs, population
  evaluation included. Regression: with the member axis left to XLA's partitioner, a
  vmapped 1x1 convolution sharded over members came out wrong on XLA:CPU (losses off
  from the first step; the members' params still matched at lr 1e-12), so the engine
  maps the member axis by hand. Tolerance as in the 1-device test above."""
  proc = helpers.run_python(MESH_INCEPTION.format(root=str(tmp_path)), devices=4,
                            env={'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'})
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split('RESULT')[-1])
  assert out['mesh'] == {'members': 2, 'data': 2}
  for param_diff, loss_rel, same_rows in out['diffs']:
    assert same_rows
    assert param_diff < TOL, out
    assert loss_rel < TOL, out


MESH_INCEPTION_OPTIMIZED = textwrap.dedent('''
    import sys
    sys.path.insert(0, '.')
    import jax
    from tests.test_engine_members import _inception_config
    from bn_research import train
    assert jax.device_count() == 4, jax.devices()
    root = sys.argv[1]
    # Moving-average evaluation: population evaluation is covered above, and each
    # program compiled with the optimising pipeline costs several times more.
    base = _inception_config(**{'eval.batch_stats': 'moving_average'})
    points = [(f'{root}/m0', {'seed': 0, 'optimizer.learning_rate': 0.01}),
              (f'{root}/m1', {'seed': 1, 'optimizer.learning_rate': 0.005})]
    train.train_members(base, points)           # mesh 2 x 2
    for w, point in points:                     # each member's batch split over 2 devices
      train.train_and_evaluate(train.member_config(base, dict(point, num_devices=2)), w + '_two')
    train.train_and_evaluate(train.member_config(base, dict(points[0][1], num_devices=1)),
                             points[0][0] + '_one')
''')


def test_inception_members_on_a_2x2_mesh_equal_separate_runs_with_the_optimising_compiler(
    tmp_path):
  """The partitioner regression above, compiled as users run it (XLA's default
  pipeline): each member of the 2 x 2 mesh equals its separate run on two devices (the
  same split of each batch) within a tolerance derived from the spread between two
  reassociation-equivalent references, member 0's separate run on one device and on
  two. Member 1 (half the learning rate) is held to member 0's tolerance."""
  proc = helpers.run_python(MESH_INCEPTION_OPTIMIZED.replace('sys.argv[1]', repr(str(tmp_path))),
                            devices=4, env={'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-4000:]
  tol = helpers.reassociation_tolerance(tmp_path / 'm0_one', tmp_path / 'm0_two')
  assert tol < 1e-3, tol  # the references agree: the bound means something
  for name in ('m0', 'm1'):
    helpers.assert_same_run(tmp_path / name, tmp_path / f'{name}_two', atol=tol)


SWEEP_ARGS = [
    '--config=configs/mnist_mlp.py:bn,source=synthetic', '--sweep=optimizer.learning_rate=0.1,0.3',
    '--sweep=seed=0,1', '--vmap', '--config.num_train_steps=60',
    '--config.eval_every_steps=20', '--config.log_every_steps=10',
    '--config.checkpoint_every_steps=20', '--config.steps_per_dispatch=10',
    '--config.data.image_size=8', '--config.data.num_train=200', '--config.data.num_test=64',
    '--config.batch_size=30', '--config.eval_batch_size=64', '--config.model.hidden_sizes=(16, 16)',
    '--config.probe.num_examples=64']


@pytest.mark.parametrize('optimized', [False, True], ids=['fast_compiles', 'optimized'])
def test_member_sweep_killed_and_resumed_equals_uninterrupted(tmp_path, optimized):
  """Bitwise, with XLA's optimisations off (quick to compile) and with the default
  optimising pipeline users run: the resumed process compiles the same programs for the
  same devices and feeds them the same state and batches, so no rounding can differ
  (the derived tolerance is zero)."""
  env = {} if optimized else {'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}
  whole = helpers.run_module('scripts.sweep', SWEEP_ARGS + [f'--workdir={tmp_path / "whole"}'],
                             env=env)
  assert whole.returncode == 0, whole.stderr[-3000:]
  killed = helpers.run_module('scripts.sweep', SWEEP_ARGS + [f'--workdir={tmp_path / "res"}'],
                              env={**env, 'BN_RESEARCH_KILL_AT_STEP': '45'})
  assert killed.returncode != 0
  resumed = helpers.run_module('scripts.sweep', SWEEP_ARGS + [f'--workdir={tmp_path / "res"}'],
                               env=env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from the checkpoint at step 40' in resumed.stderr
  from bn_research import rundir
  names = [r['name'] for r in rundir.read_sweep(str(tmp_path / 'whole'))['runs']]
  assert len(names) == 4
  drop = ('steps_per_second',)
  for name in names:
    a = rundir.load_latest(str(tmp_path / 'whole' / name))
    b = rundir.load_latest(str(tmp_path / 'res' / name))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(x, y)  # bitwise on CPU
    rows = [[{k: v for k, v in r.items() if k not in drop}
             for r in rundir.read_metrics(str(tmp_path / d / name))] for d in ('whole', 'res')]
    assert rows[0] == rows[1]
    assert rundir.read_status(str(tmp_path / 'res' / name))['status'] == 'done'


@pytest.mark.usefixtures('fast_compiles')
def test_bfloat16_computes_in_bf16_keeps_float32_state_and_tracks_float32(tmp_path):
  from bn_research import rundir, train
  import jax.numpy as jnp
  from bn_research.engine import steps
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    config = helpers.tiny_mlp_config(**{'model.dtype': dtype, 'num_train_steps': 60,
                                        'eval_every_steps': 60})
    train.train_and_evaluate(config, str(tmp_path / dtype))
    runs[dtype] = rundir.read_metrics(str(tmp_path / dtype))
    state = rundir.load_latest(str(tmp_path / dtype))
    # Parameters and BN statistics stay float32 whatever the compute dtype.
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(state['params'])} == {'float32'}
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(state['batch_stats'])} == {'float32'}
  # The bf16 network really computes in bf16: its hidden pre-activations are bf16.
  builder = steps.Builder(config, num_classes=10)
  variables = builder.model({}).init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False)
  _, inter = builder.model({}).apply(variables, jnp.zeros((2, 8, 8, 1)), train=False,
                                     mutable=['intermediates'])
  assert inter['intermediates']['hidden_0'][0].dtype == jnp.bfloat16
  # Stated tolerance: the training loss curve tracks float32's within 0.05 nats
  # (bf16 keeps 8 bits of mantissa: about 2-3 significant digits per matmul).
  f32 = [r['train_loss'] for r in runs['float32'] if 'train_loss' in r]
  b16 = [r['train_loss'] for r in runs['bfloat16'] if 'train_loss' in r]
  assert len(f32) == len(b16) == 6
  np.testing.assert_allclose(b16, f32, atol=0.05)
  assert f32[-1] < f32[0] - 0.3  # and it is a curve that moved


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_the_run_interrupted_and_the_same_command_resumes(tmp_path, signum,
                                                                        code):
  args = ['--config=configs/mnist_mlp.py:bn,source=synthetic',
          '--config.num_train_steps=400000', '--config.eval_every_steps=100000',
          '--config.log_every_steps=100', '--config.checkpoint_every_steps=100000',
          '--config.steps_per_dispatch=100', '--config.data.image_size=8',
          '--config.data.num_train=256', '--config.data.num_test=64',
          '--config.probe.num_examples=64', f'--workdir={tmp_path / "run"}']
  proc = subprocess.Popen([sys.executable, '-m', 'bn_research.main', *args],
                          env=helpers.subprocess_env(), cwd=helpers.REPO,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  helpers.wait_for(lambda: metrics.exists() and 'train_loss' in metrics.read_text(),
                   'a training row in metrics.jsonl', proc=proc)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=helpers.CEILING)
  assert proc.returncode == code, stderr[-3000:]
  assert 'Traceback' not in stderr
  from bn_research import rundir
  status = rundir.read_status(str(tmp_path / 'run'))
  assert status['status'] == 'interrupted' and status['signal'] == signum
  # The step it names has a complete checkpoint, and the metrics reach exactly there.
  assert status['step'] in rundir.checkpoint_steps(str(tmp_path / 'run'))
  assert rundir.read_metrics(str(tmp_path / 'run'))[-1]['step'] == status['step']
  # An interrupted run is resumed by the same command (it is not finished).
  import ml_collections
  config = ml_collections.ConfigDict(rundir.read_config(str(tmp_path / 'run')))
  from bn_research.engine import resume
  assert resume.decide(str(tmp_path / 'run'), config, False) == resume.RESUME


@pytest.mark.usefixtures('fast_compiles')
def test_measurements_ride_on_the_cadence_and_members_measure_as_separate_runs(tmp_path):
  """measure.every_steps: ICS and landscape rows at steps 0, 20, 40 (chunks end there
  even when 20 divides no other interval), identical for a sweep member."""
  from bn_research import rundir, train
  config = helpers.tiny_mlp_config(**{'measure.every_steps': 20, 'measure.etas': (0.1, 0.5),
                                      'eval_every_steps': 40, 'log_every_steps': 8,
                                      'steps_per_dispatch': 40})
  train.train_and_evaluate(config, str(tmp_path / 'plain'))
  rows = {r['step']: r for r in rundir.read_metrics(str(tmp_path / 'plain'))}
  measured = sorted(s for s, r in rows.items() if 'landscape_beta' in r)
  assert measured == [0, 20, 40]
  layers = sorted(k for k in rows[20] if k.startswith('ics_cos/'))
  assert layers == ['ics_cos/hidden_0', 'ics_cos/hidden_1', 'ics_cos/logits']
  assert rows[20]['ics_l2/hidden_0'] == 0.0 and rows[20]['ics_cos/hidden_0'] == 1.0
  assert rows[20]['ics_l2/hidden_1'] > 0
  train.train_members(config, [(str(tmp_path / 'a'), {'optimizer.learning_rate': 0.1}),
                               (str(tmp_path / 'b'), {'optimizer.learning_rate': 0.3})])
  member = {r['step']: r for r in rundir.read_metrics(str(tmp_path / 'a'))}
  for step in measured:
    for key in ('landscape_beta', 'landscape_loss_range', 'ics_l2/hidden_1'):
      assert member[step][key] == pytest.approx(rows[step][key], rel=1e-4, abs=1e-6)


def test_a_second_run_on_a_locked_workdir_is_refused_in_one_line(tmp_path):
  """While a process holds the workdir (a run, here a stand-in holding its lock), the
  engine refuses to train in it, with or without --overwrite, and writes nothing."""
  from bn_research import train
  workdir = tmp_path / 'run'
  with helpers.lock_holder(workdir) as holder:
    before = sorted(os.listdir(workdir))
    for overwrite in (False, True):
      with pytest.raises(ValueError) as err:
        train.train_and_evaluate(helpers.tiny_mlp_config(), str(workdir), overwrite=overwrite)
      assert str(holder.pid) in str(err.value) and '\n' not in str(err.value)
      assert sorted(os.listdir(workdir)) == before


def _kill_during_a_checkpoint_write(proc: subprocess.Popen, workdir) -> str:
  """SIGKILLs `proc` while orbax is writing a checkpoint asynchronously: the moment a
  temporary checkpoint directory appears the process is frozen (SIGSTOP); if the write is
  still unfinished then, it is killed, else it goes on to the next checkpoint. Returns
  the name of the unfinished directory left behind."""
  root = workdir / 'checkpoints'

  def partial() -> list[str]:
    try:
      return [n for n in os.listdir(root) if not n.isdigit()]
    except FileNotFoundError:
      return []

  while True:
    helpers.wait_for(lambda: bool(partial()), 'a checkpoint being written', proc=proc)
    proc.send_signal(signal.SIGSTOP)
    caught = partial()
    if caught:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return caught[0]
    proc.send_signal(signal.SIGCONT)


def test_sigkill_from_outside_mid_checkpoint_write_and_at_any_moment_resumes_exactly(
    tmp_path):
  """Killed from outside (not by the engine's hook, which waits for pending saves) first
  while a checkpoint is half written, then at an arbitrary moment of training, the same
  command resumes each time, and the finished run equals the uninterrupted one bitwise
  (the same compiled programs, on the same device, from the same state)."""
  from bn_research import rundir
  args = helpers.tiny_args(**{
      'num_train_steps': 200, 'steps_per_dispatch': 10, 'log_every_steps': 10,
      'eval_every_steps': 50, 'checkpoint_every_steps': 20, 'data.num_train': 200,
      'batch_size': 30})
  whole = helpers.run_main(args + [f'--workdir={tmp_path / "whole"}'])
  assert whole.returncode == 0, whole.stderr[-3000:]
  workdir = tmp_path / 'killed'

  def start() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-m', 'bn_research.main', *args,
                             f'--workdir={workdir}'], env=helpers.subprocess_env(1),
                            cwd=helpers.REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

  left = _kill_during_a_checkpoint_write(start(), workdir)
  assert rundir.read_status(str(workdir))['status'] == 'running'
  # An arbitrary moment: some time after the resumed run logs its first new row.
  proc = start()
  rows_before = len(rundir.read_metrics(str(workdir)))
  helpers.wait_for(lambda: len(rundir.read_metrics(str(workdir))) > rows_before,
                   'a metrics row of the resumed run', proc=proc)
  time.sleep(np.random.default_rng().uniform(0, 0.5))
  proc.kill()
  proc.wait()
  resumed = helpers.run_main(args + [f'--workdir={workdir}'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert rundir.read_status(str(workdir))['status'] == 'done'
  # The half-written directory was replaced when the resumed run saved that step again.
  assert left not in os.listdir(workdir / "checkpoints")
  helpers.assert_same_run(workdir, tmp_path / 'whole', atol=0)


OPTIMIZED_MEMBERS = textwrap.dedent('''
    import sys
    sys.path.insert(0, '.')
    import jax
    from tests import helpers
    from bn_research import train
    assert jax.device_count() == 2, jax.devices()
    root = sys.argv[1]
    base = helpers.tiny_mlp_config(num_train_steps=20, eval_every_steps=20,
                                   checkpoint_every_steps=20, batch_size=32)
    points = [(f'{root}/m0', {'optimizer.learning_rate': 0.1}),
              (f'{root}/m1', {'optimizer.learning_rate': 0.3})]
    train.train_members(base, points)           # one member per device
    for w, point in points:
      member = train.member_config(base, point)
      train.train_and_evaluate(helpers.set_keys(member.copy_and_resolve_references(),
                                                {'num_devices': 1}), w + '_one')
      train.train_and_evaluate(member, w + '_two')  # data-parallel: halves summed apart
''')


def test_member_sweep_equals_separate_runs_with_the_optimising_compiler(tmp_path):
  """Compiled as users run it (XLA's default pipeline), each vmapped member equals its
  separate run within a tolerance derived from the spread between two
  reassociation-equivalent references: the separate run on one device and on two (the
  two-device run sums each batch's halves apart)."""
  proc = helpers.run_python(OPTIMIZED_MEMBERS.replace('sys.argv[1]', repr(str(tmp_path))),
                            devices=2, env={'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-4000:]
  for name in ('m0', 'm1'):
    one, two = tmp_path / f'{name}_one', tmp_path / f'{name}_two'
    tol = helpers.reassociation_tolerance(one, two)
    assert tol < 1e-3, tol  # the references agree: the bound means something
    helpers.assert_same_run(tmp_path / name, one, atol=tol)


def test_a_member_sweep_locks_every_member_and_every_exit_releases_the_locks(
    tmp_path, monkeypatch):
  """Each member's workdir is locked for the sweep's life; a lock held elsewhere on any
  member refuses the whole sweep (nothing written in the others); and no run.lock stays
  behind after a finished sweep, a refusal or an exception in training."""
  from bn_research import rundir, train
  from bn_research.engine import loop
  config = helpers.tiny_mlp_config(num_train_steps=10, eval_every_steps=10,
                                   log_every_steps=10, checkpoint_every_steps=10)
  points = [(str(tmp_path / 'a'), {'optimizer.learning_rate': 0.1}),
            (str(tmp_path / 'b'), {'optimizer.learning_rate': 0.3})]
  locks = [p / rundir.LOCK_FILE for p in (tmp_path / 'a', tmp_path / 'b')]

  with helpers.lock_holder(tmp_path / 'b') as holder:
    with pytest.raises(ValueError, match=f'in use by process {holder.pid}'):
      train.train_members(config, points)
    assert not (tmp_path / 'a').exists()  # locked, then released and removed unwritten

  held_during_training = []
  real_run = loop.run

  def run_and_look(*args, **kwargs):
    held_during_training.append([lock.exists() for lock in locks])
    return real_run(*args, **kwargs)

  monkeypatch.setattr(loop, 'run', run_and_look)
  assert [r['status'] for r in train.train_members(config, points)] == ['done', 'done']
  assert held_during_training == [[True, True]]
  assert not any(lock.exists() for lock in locks)

  def fail(*args, **kwargs):
    raise RuntimeError('a failure inside training')

  monkeypatch.setattr(loop, 'run', fail)
  with pytest.raises(RuntimeError):
    train.train_members(config, [(str(tmp_path / 'c'), {'optimizer.learning_rate': 0.1}),
                                 (str(tmp_path / 'd'), {'optimizer.learning_rate': 0.3})])
  assert not any((tmp_path / d / rundir.LOCK_FILE).exists() for d in 'cd')
