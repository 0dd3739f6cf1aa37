"""The training engine end to end: files, parallel layouts, resume, divergence, bad input."""

import glob
import json
import os
import textwrap

import numpy as np
import pytest

from tests import helpers


def _train(config, workdir, **kw):
  from bn_research import train
  return train.train_and_evaluate(config, str(workdir), **kw)


def test_main_entry_point_writes_the_run_files(tmp_path):
  workdir = tmp_path / 'run'
  proc = helpers.run_main([
      '--config=configs/mnist_mlp.py:bn,source=synthetic', f'--workdir={workdir}',
      '--config.num_train_steps=30', '--config.eval_every_steps=10',
      '--config.log_every_steps=10', '--config.checkpoint_every_steps=20',
      '--config.steps_per_dispatch=10', '--config.data.image_size=8',
      '--config.data.num_train=256', '--config.data.num_test=64',
      '--config.probe.num_examples=64'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = helpers.read_json(workdir / 'config.json')
  assert config['num_train_steps'] == 30 and config['model']['normalizer'] == 'batch_norm'
  for key in ('seed', 'batch_size', 'eval_every_steps', 'log_every_steps',
              'checkpoint_every_steps'):
    assert key in config
  assert config['optimizer']['learning_rate'] > 0
  data = helpers.read_json(workdir / 'data.json')
  assert data['num_params'] > 0
  status = helpers.read_json(workdir / 'status.json')
  assert status['status'] == 'done' and status['step'] == 30
  rows = helpers.read_jsonl(workdir / 'metrics.jsonl')
  train_rows = [r for r in rows if 'train_loss' in r]
  eval_rows = [r for r in rows if 'eval_accuracy' in r]
  assert [r['step'] for r in train_rows] == [10, 20, 30]
  assert [r['step'] for r in eval_rows] == [0, 10, 20, 30]
  for r in train_rows:
    assert {'train_accuracy', 'learning_rate'} <= set(r)
    assert np.isfinite(r['train_loss'])
  assert all(0 <= r['eval_accuracy'] <= 1 for r in eval_rows)
  assert all('act_p50' in r for r in eval_rows)  # the Figure 1 probe rides with evals
  assert glob.glob(str(workdir / 'events.out.tfevents.*'))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['20', '30']
  # Progress lines carry throughput and an ETA.
  assert 'steps/s' in proc.stderr and 'ETA' in proc.stderr


def test_compilation_cache_is_used_and_changes_no_result(tmp_path):
  """A second identical run loads its programs from the persistent cache (fewer
  compilations logged) and writes the same metrics; 'none' leaves no cache."""
  cache = tmp_path / 'cache'
  args = ['--config=configs/mnist_mlp.py:bn,source=synthetic,steps=20',
          '--config.eval_every_steps=10', '--config.log_every_steps=10',
          '--config.checkpoint_every_steps=20', '--config.steps_per_dispatch=10',
          '--config.data.image_size=8', '--config.data.num_train=256',
          '--config.data.num_test=64', '--config.probe.num_examples=64',
          f'--compilation_cache_dir={cache}']
  logs = {}
  for run in ('first', 'second'):
    proc = helpers.run_main(args + [f'--workdir={tmp_path / run}'],
                            env={'JAX_LOG_COMPILES': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs[run] = proc.stderr
  assert any(name.endswith('-cache') for name in os.listdir(cache))
  compiled = {run: log.count('Finished XLA compilation') for run, log in logs.items()}
  assert compiled['first'] >= 4  # init, train chunk, eval, probe at least
  hits = logs['second'].count('Persistent compilation cache hit')
  assert hits >= 4, compiled
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'steps_per_second'}
                        for r in rows]
  assert strip(helpers.read_jsonl(tmp_path / 'first' / 'metrics.jsonl')) == strip(
      helpers.read_jsonl(tmp_path / 'second' / 'metrics.jsonl'))

  off = tmp_path / 'off_cache'
  proc = helpers.run_main([a for a in args if not a.startswith('--compilation')] + [
      f'--workdir={tmp_path / "off"}', '--compilation_cache_dir=none'],
      env={'JAX_COMPILATION_CACHE_DIR': str(off)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not off.exists()


def test_compiler_options_parse_and_change_no_result(tmp_path):
  """Options are typed as XLA expects; YNNPACK vs Eigen matmuls change only rounding."""
  from bn_research import config as config_lib
  from bn_research import train
  assert config_lib.parse_compiler_options('') == {}
  assert config_lib.parse_compiler_options(
      'xla_cpu_experimental_ynn_fusion_type=, xla_cpu_enable_fast_math=false,'
      'xla_backend_optimization_level=0') == {
          'xla_cpu_experimental_ynn_fusion_type': '', 'xla_cpu_enable_fast_math': False,
          'xla_backend_optimization_level': 0}
  # The MNIST config's option is accepted by this XLA, and training with and without it
  # agrees to float32 rounding.
  results = {}
  for name, options in (('eigen', 'xla_cpu_experimental_ynn_fusion_type='),
                        ('default', '')):
    config = helpers.tiny_mlp_config(compiler_options=options, num_train_steps=20,
                                     checkpoint_every_steps=20)
    results[name] = train.train_and_evaluate(config, str(tmp_path / name))
  a, b = results.values()
  assert a['status'] == b['status'] == 'done'
  np.testing.assert_allclose(a['eval_loss'], b['eval_loss'], rtol=1e-4)


def test_compilation_cache_default_location(monkeypatch):
  from bn_research import compile_cache
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/somewhere/jax')
  assert compile_cache.default_dir() == '/somewhere/jax'
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', '/xdg')
  assert compile_cache.default_dir() == '/xdg/bn_research/jax'
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert compile_cache.default_dir() == os.path.expanduser('~/.cache/bn_research/jax')
  import jax  # pylint: disable=g-import-not-at-top
  # enable('none') switches JAX's cache off in this process: put the session's back.
  session_cache = jax.config.jax_compilation_cache_dir
  try:
    assert compile_cache.enable('none') is None and compile_cache.enable('') is None
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update('jax_compilation_cache_dir', session_cache)


def test_training_learns_and_bn_has_batch_stats(tmp_path):
  config = helpers.tiny_mlp_config(num_train_steps=100, eval_every_steps=100)
  result = _train(config, tmp_path / 'bn')
  assert result['status'] == 'done'
  assert result['eval_accuracy'] > 0.5  # 10 classes: chance is 0.1
  from bn_research import rundir
  state = rundir.load_latest(str(tmp_path / 'bn'))
  assert 'bn_0' in state['batch_stats'] and 'bias' not in state['params']['dense_0']
  config = helpers.tiny_mlp_config(**{'model.normalizer': 'none', 'num_train_steps': 20})
  _train(config, tmp_path / 'none')
  state = rundir.load_latest(str(tmp_path / 'none'))
  assert not state['batch_stats'] and 'bias' in state['params']['dense_0']


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
  args = ['--config=configs/mnist_mlp.py:bn,source=synthetic',
          '--config.num_train_steps=120', '--config.eval_every_steps=20',
          '--config.log_every_steps=10', '--config.checkpoint_every_steps=40',
          '--config.steps_per_dispatch=10', '--config.data.image_size=8',
          '--config.data.num_train=200', '--config.data.num_test=64',
          '--config.batch_size=30',  # 200 / 30: batches straddle epochs
          '--config.probe.num_examples=64']
  whole = helpers.run_main(args + [f'--workdir={tmp_path / "whole"}'])
  assert whole.returncode == 0, whole.stderr[-3000:]
  killed = helpers.run_main(args + [f'--workdir={tmp_path / "resumed"}'],
                            env={'BN_RESEARCH_KILL_AT_STEP': '90'})
  assert killed.returncode != 0  # SIGKILL: no clean shutdown happened
  status = helpers.read_json(tmp_path / 'resumed' / 'status.json')
  # The status names a checkpoint that was complete when it was written: 40, or 80 if
  # orbax's background write of step 80 happened to finish before the status was
  # written (the kill hook waits for pending saves, so both are on disk by now).
  assert status['status'] == 'running' and status['step'] in (40, 80)
  from bn_research import rundir
  assert {40, 80} <= set(rundir.checkpoint_steps(str(tmp_path / 'resumed')))
  resumed = helpers.run_main(args + [f'--workdir={tmp_path / "resumed"}'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from the checkpoint at step 80' in resumed.stderr

  a = rundir.load_latest(str(tmp_path / 'whole'))
  b = rundir.load_latest(str(tmp_path / 'resumed'))
  import jax
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)  # bitwise on CPU
  drop = ('steps_per_second',)
  rows_a = [{k: v for k, v in r.items() if k not in drop}
            for r in helpers.read_jsonl(tmp_path / 'whole' / 'metrics.jsonl')]
  rows_b = [{k: v for k, v in r.items() if k not in drop}
            for r in helpers.read_jsonl(tmp_path / 'resumed' / 'metrics.jsonl')]
  assert rows_a == rows_b

  # Running the finished command again changes nothing.
  again = helpers.run_main(args + [f'--workdir={tmp_path / "resumed"}'])
  assert again.returncode == 0 and 'nothing to do' in again.stderr


def test_divergence_is_recorded_not_raised(tmp_path):
  config = helpers.tiny_mlp_config(**{
      'model.normalizer': 'none', 'model.activation': 'relu',
      'model.init_stddev': 1.0, 'optimizer.learning_rate': 1e38,
      'num_train_steps': 60})
  result = _train(config, tmp_path / 'run')
  assert result['status'] == 'diverged'
  status = helpers.read_json(tmp_path / 'run' / 'status.json')
  assert status['status'] == 'diverged'
  assert 1 <= status['diverged_step'] <= 60
  from bn_research import rundir
  import jax
  kept = rundir.load_latest(str(tmp_path / 'run'))
  assert kept is not None  # the last finite state
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(kept['params']))


def test_a_loss_above_max_loss_is_divergence_and_zero_disables_the_test(tmp_path):
  """Divergence as the paper means it: this ReLU net at lr 10 stays finite but its
  training loss reaches 2e4 nats (chance is ln 10 = 2.3) and it ends at chance."""
  config = helpers.tiny_mlp_config(**{
      'model.activation': 'relu', 'model.init_stddev': 1.0,
      'optimizer.learning_rate': 10.0, 'num_train_steps': 60})
  result = _train(config, tmp_path / 'run')
  assert result['status'] == 'diverged' and result['reason'] == 'loss above 20'
  status = helpers.read_json(tmp_path / 'run' / 'status.json')
  assert status['reason'] == 'loss above 20' and status['diverged_step'] == status['step']
  rows = helpers.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
  assert rows[-1]['step'] == status['step'] and rows[-1]['train_loss'] > 20
  assert all(r['train_loss'] <= 20 for r in rows[1:-1] if 'train_loss' in r)
  from bn_research import rundir
  import jax
  kept = rundir.load_latest(str(tmp_path / 'run'))
  assert int(kept['step']) < status['step']  # the last checkpoint before it is kept
  config.divergence.max_loss = 0.0
  assert _train(config, tmp_path / 'off')['status'] == 'done'


@pytest.mark.parametrize('key,value,needle', [
    ('optimizer.learning_rate', 0.0, 'optimizer.learning_rate=0.0'),
    ('optimizer.learning_rate', -1.0, 'optimizer.learning_rate=-1.0'),
    ('batch_size', 0, 'batch_size=0'),
    ('model.name', 'resnet', "model.name='resnet'"),
    ('model.normalizer', 'instance_norm', "model.normalizer='instance_norm'"),
    ('data.name', 'cifar', "data.name='cifar'"),
    ('data.data_dir', '/no/such/dir', '/no/such/dir'),
    ('parallelism', 'pjit', "parallelism='pjit'"),
    ('compiler_options', 'fast=1', "'fast=1'"),
    ('compiler_options', 'xla_no_such_option=1', 'xla_no_such_option=1'),
    ('compiler_options', 'xla_cpu_experimental_ynn_fusion_type=bogus',
     "xla_cpu_experimental_ynn_fusion_type='bogus'"),
])
def test_bad_config_values_fail_before_touching_the_workdir(tmp_path, key, value, needle):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('keep me')
  config = helpers.tiny_mlp_config(**{key: value})
  with pytest.raises(ValueError, match=None) as err:
    _train(config, workdir)
  assert needle in str(err.value)
  assert '\n' not in str(err.value)
  assert sorted(os.listdir(workdir)) == ['notes.txt']


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
  workdir = tmp_path / 'run'
  proc = helpers.run_main(['--config=configs/mnist_mlp.py:bn,source=synthetic',
                           f'--workdir={workdir}', '--config.optimizer.learning_rat=0.1'])
  assert proc.returncode == 2
  assert 'learning_rat' in proc.stderr
  assert not workdir.exists()
  proc = helpers.run_main(['--config=configs/mnist_mlp.py:bn,source=synthetic',
                           f'--workdir={workdir}', '--config.batch_size=-4'])
  assert proc.returncode == 2 and 'batch_size=-4' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_workdir_of_another_config_is_refused_then_overwritten_safely(tmp_path):
  workdir = tmp_path / 'run'
  _train(helpers.tiny_mlp_config(num_train_steps=20), workdir)
  before = sorted(os.listdir(workdir))
  other = helpers.tiny_mlp_config(num_train_steps=20, seed=7)
  with pytest.raises(ValueError, match='different config.*seed'):
    _train(other, workdir)
  assert sorted(os.listdir(workdir)) == before
  assert _train(other, workdir, overwrite=True)['status'] == 'done'
  moved = glob.glob(str(workdir) + '.replaced-*')
  assert len(moved) == 1 and os.path.exists(os.path.join(moved[0], 'metrics.jsonl'))
  assert helpers.read_json(workdir / 'config.json')['seed'] == 7


MULTI_DEVICE = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, '.')
    from tests import helpers
    from bn_research import train, rundir
    assert jax.device_count() == 8, jax.devices()
    root = sys.argv[1] if len(sys.argv) > 1 else {root!r}

    def run(name, **kw):
        c = helpers.tiny_mlp_config(num_train_steps=10, eval_every_steps=10,
                                    log_every_steps=5, checkpoint_every_steps=10,
                                    steps_per_dispatch=5, batch_size=32, **kw)
        train.train_and_evaluate(c, root + '/' + name)
        state = rundir.load_latest(root + '/' + name)
        rows = helpers.read_jsonl(root + '/' + name + '/metrics.jsonl')
        return state, np.array([r['train_loss'] for r in rows if 'train_loss' in r])

    def max_diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(
            jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    def compare(name, reference, ref_loss, **kw):
        s, l = run(name, **kw)
        out[name] = dict(loss=max_diff(l, ref_loss),
                         params=max_diff(s['params'], reference['params']),
                         stats=max_diff(s['batch_stats'], reference['batch_stats']))

    out = {{}}
    one, loss1 = run('one', num_devices=1)
    compare('jit8', one, loss1, num_devices=8)
    compare('pmap8', one, loss1, num_devices=8, parallelism='pmap')
    # Per-device statistics == ghost batches of the per-device size on one device.
    ghost, lg = run('ghost1', num_devices=1, **{{'model.virtual_batch_size': 4}})
    compare('pmap_local', ghost, lg, num_devices=8, parallelism='pmap',
            **{{'model.bn_cross_replica': False}})
    compare('jit_ghost', ghost, lg, num_devices=8, **{{'model.virtual_batch_size': 4}})
    out['ghost_vs_global'] = max_diff(ghost['params'], one['params'])
    # A batch that does not split over the devices is refused before compiling.
    try:
        train.train_and_evaluate(helpers.tiny_mlp_config(batch_size=12, num_devices=8), root + '/bad')
        out['bad'] = None
    except ValueError as e:
        out['bad'] = str(e)
    print('RESULT' + json.dumps(out))
''')


def test_jit_mesh_and_pmap_on_8_devices_match_one_device(tmp_path):
  proc = helpers.run_python(MULTI_DEVICE.format(root=str(tmp_path)), devices=8)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split('RESULT')[-1])
  for name in ('jit8', 'pmap8', 'pmap_local', 'jit_ghost'):
    assert out[name]['loss'] < 1e-4, (name, out[name])
    assert out[name]['params'] < 1e-4, (name, out[name])
    assert out[name]['stats'] < 1e-4, (name, out[name])
  # ...and the comparison is not vacuous: ghost statistics do change training.
  assert out['ghost_vs_global'] > 1e-3
  assert out['bad'] is not None and 'batch_size=12' in out['bad'] and '8 devices' in out['bad']


def test_stream_input_opens_at_the_first_step_asked_for():
  from bn_research import inputs

  class Pipeline:
    opened = []

    def train_batches(self, start_step):
      self.opened.append(start_step)
      step = start_step
      while True:
        yield {'image': np.full((2, 1), step, np.float32), 'label': np.full(2, step, np.int32)}
        step += 1

  source = inputs.StreamInput(Pipeline())
  chunk = source.chunk(40, 3)  # a run resumed at step 40
  assert chunk['label'][:, 0].tolist() == [40, 41, 42]
  assert source.chunk(43, 1)['label'][0, 0] == 43
  assert Pipeline.opened == [40]
  with pytest.raises(RuntimeError, match='step 50'):
    source.chunk(50, 1)


def test_event_writer_import_leaves_torch_importable(tmp_path):
  """TensorBoard's writer is loaded with torch hidden (a 2 s import it does not need);
  the hiding must not outlive the import."""
  code = textwrap.dedent('''
      import sys
      from bn_research import rundir
      writer = rundir._summary_writer_class()
      assert 'torch' not in sys.modules, 'torch was imported or its blocker left behind'
      import importlib.util
      print('torch installed' if importlib.util.find_spec('torch') else 'no torch')
      w = writer(%r, flush_secs=1)
      w.add_scalar('loss', 0.5, 3)
      w.close()
  ''' % str(tmp_path))
  proc = helpers.run_python(code)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
