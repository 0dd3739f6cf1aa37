"""Tests of sweep grids, run names, commands, and skip/resume."""

from __future__ import annotations

import json
import pathlib
import shlex
import subprocess
import sys

import pytest

from bn_research import sweep as sweep_lib
from scripts import sweep as sweep_script

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG_TEXT = '''
import ml_collections

def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 60
  config.num_train_steps = 100
  config.optimizer = ml_collections.ConfigDict({'learning_rate': 0.1})
  config.model = ml_collections.ConfigDict(
      {'name': 'mlp', 'normalizer': 'none', 'hidden': (100, 100)})
  config.arg = arg or ''
  return config
'''


@pytest.fixture
def config_file(tmp_path: pathlib.Path) -> str:
  path = tmp_path / 'tiny_config.py'
  path.write_text(CONFIG_TEXT)
  return str(path)


def test_parse_value_types():
  assert sweep_lib.parse_value('3') == 3 and isinstance(
      sweep_lib.parse_value('3'), int)
  assert sweep_lib.parse_value('1e-2') == 0.01
  assert sweep_lib.parse_value('true') is True
  assert sweep_lib.parse_value('False') is False
  assert sweep_lib.parse_value('None') is None
  assert sweep_lib.parse_value('batch_norm') == 'batch_norm'
  assert sweep_lib.parse_value('(100, 100)') == (100, 100)


def test_parse_sweep_arg_splits_outside_brackets():
  key, values = sweep_lib.parse_sweep_arg('model.hidden=(100,100),(50,50),7')
  assert key == 'model.hidden'
  assert values == [(100, 100), (50, 50), 7]


@pytest.mark.parametrize('arg, fragment', [
    ('optimizer.learning_rate', 'no "=" found'),
    ('optimizer.learning_rate=', 'value #1'),
    ('optimizer.learning_rate=0.1,,0.01', 'value #2'),
    ('optimizer..learning_rate=0.1', "'optimizer..learning_rate'"),
    ('optimizer.learning_rate=0.1,1e-1', 'listed twice'),
    ('optimizer.learning_rate=1,1.0', 'listed twice (equal to 1)'),
    ('seed=2,2e0', 'listed twice'),
    ('model.hidden=(1,2', "unclosed '('"),
])
def test_bad_sweep_syntax_names_the_argument(arg, fragment):
  with pytest.raises(sweep_lib.SweepError) as info:
    sweep_lib.parse_sweep_arg(arg)
  assert f'--sweep={arg}' in str(info.value)
  assert fragment in str(info.value)


def test_expand_grid_product_size_and_order():
  grid = sweep_lib.expand_grid({'a': [1, 2], 'b': ['x', 'y', 'z']})
  assert len(grid) == 6
  # First key varies slowest, keys in sweep order.
  assert [tuple(p.values()) for p in grid] == [
      (1, 'x'), (1, 'y'), (1, 'z'), (2, 'x'), (2, 'y'), (2, 'z')]
  assert all(list(p) == ['a', 'b'] for p in grid)
  assert sweep_lib.expand_grid({}) == [{}]


def test_run_names_are_readable_stable_and_safe():
  params = {'optimizer.learning_rate': 0.1, 'model.normalizer': 'batch_norm'}
  assert (sweep_lib.run_name(params) ==
          'optimizer.learning_rate=0.1,model.normalizer=batch_norm')
  # Same value written differently on the command line -> same directory.
  _, values = sweep_lib.parse_sweep_arg('optimizer.learning_rate=1e-1')
  assert sweep_lib.run_name({'optimizer.learning_rate': values[0]}) == (
      'optimizer.learning_rate=0.1')
  assert sweep_lib.run_name({'use_bn': True}) == 'use_bn=true'
  # Numbers compared as numbers: 1 and 1.0 are one setting, so one directory.
  assert (sweep_lib.run_name({'optimizer.learning_rate': 1}) ==
          sweep_lib.run_name({'optimizer.learning_rate': 1.0}) ==
          'optimizer.learning_rate=1')
  assert sweep_lib.run_name({'x': 1e20}) == 'x=1e+20'  # no 21-digit integers
  odd = [{'x': 'a/b'}, {'x': 'a b'}, {'x': (1, 2)}, {'x': 'a,b=c'}]
  names = [sweep_lib.run_name(p) for p in odd]
  assert len(set(names)) == len(names)
  for name in names:
    assert '/' not in name and ' ' not in name and name.count('=') == 1
  assert names == [sweep_lib.run_name(p) for p in odd]  # Deterministic.
  long_name = sweep_lib.run_name({f'key{i}': 'v' * 30 for i in range(10)})
  assert len(long_name) <= 200


def test_build_command():
  command = sweep_lib.build_command(
      '/py', 'configs/mnist.py:bn', 'out/lr=0.1', {'optimizer.learning_rate': 0.1,
                                                  'model.use_bias': False},
      ['--config.num_train_steps=10'])
  assert command == [
      '/py', '-m', 'bn_research.main', '--config=configs/mnist.py:bn',
      '--workdir=out/lr=0.1', '--config.num_train_steps=10',
      '--config.optimizer.learning_rate=0.1', '--config.model.use_bias=false']


def test_split_config_overrides():
  overrides, rest = sweep_lib.split_config_overrides([
      '--config=c.py:x', '--config.seed=3', '--config.batch_size', '10',
      '--noconfig.model.flag', '--sweep=seed=1,2', '--workdir=w'])
  assert overrides == ['--config.seed=3', '--config.batch_size=10',
                       '--noconfig.model.flag']
  assert rest == ['--config=c.py:x', '--sweep=seed=1,2', '--workdir=w']
  assert [sweep_lib.override_key(o) for o in overrides] == [
      'seed', 'batch_size', 'model.flag']


def test_override_of_swept_key_is_refused(tmp_path):
  with pytest.raises(sweep_lib.SweepError, match='seed'):
    sweep_lib.plan_sweep('c.py', tmp_path, {'seed': [0, 1]},
                         ['--config.seed=3'])


def _write_status(run_dir: pathlib.Path, status: str) -> None:
  run_dir.mkdir(parents=True, exist_ok=True)
  record = {'status': status, 'step': 50, 'message': ''}
  if status == 'diverged':
    record['diverged_step'] = 50
  (run_dir / 'status.json').write_text(json.dumps(record))


class FakeEngine:
  """Stands in for `bn_research.main`: records launches, marks runs done."""

  def __init__(self, fail_on: str | None = None):
    self.commands: list[list[str]] = []
    self.fail_on = fail_on

  def __call__(self, command):
    self.commands.append(list(command))
    workdir = pathlib.Path(
        next(a for a in command if a.startswith('--workdir='))[len('--workdir='):])
    if self.fail_on and workdir.name == self.fail_on:
      _write_status(workdir, 'failed')
      return 1
    _write_status(workdir, 'done')
    return 0

  def launched_names(self) -> list[str]:
    return [pathlib.Path(c[4][len('--workdir='):]).name for c in self.commands]


def test_rerun_skips_finished_and_relaunches_unfinished(tmp_path):
  grid = {'seed': [0, 1, 2], 'model.normalizer': ['none', 'batch_norm']}
  planned = sweep_lib.plan_sweep('c.py', tmp_path, grid, python='/py')
  names = [r.name for r in planned]
  assert len(names) == 6
  # A partially done sweep: two finished results, three interrupted states,
  # one never started.
  states = dict(zip(names, ['done', 'diverged', 'running', 'failed', None,
                            'done']))
  for name, state in states.items():
    if state:
      _write_status(tmp_path / name, state)
  (tmp_path / names[4]).mkdir()  # Directory without status: treated as new.

  engine = FakeEngine()
  result = sweep_lib.run_sweep(planned, engine)
  expected = [n for n, s in states.items() if s not in ('done', 'diverged')]
  assert engine.launched_names() == expected
  assert result.launched == expected
  assert result.skipped == [(names[0], 'done'), (names[1], 'diverged'),
                            (names[5], 'done')]
  assert not result.failed

  # Everything is finished now: a second pass launches nothing.
  again = FakeEngine()
  assert sweep_lib.run_sweep(planned, again).launched == []
  assert again.commands == []


def test_failed_run_does_not_stop_the_sweep(tmp_path):
  planned = sweep_lib.plan_sweep('c.py', tmp_path, {'seed': [0, 1, 2]})
  engine = FakeEngine(fail_on='seed=1')
  result = sweep_lib.run_sweep(planned, engine)
  assert engine.launched_names() == ['seed=0', 'seed=1', 'seed=2']
  assert result.failed == [('seed=1', 1)]
  # Re-running retries just the failed one.
  retry = FakeEngine()
  sweep_lib.run_sweep(planned, retry)
  assert retry.launched_names() == ['seed=1']


def test_sweep_file_and_command_line_merge(tmp_path):
  path = tmp_path / 'exp.py'
  path.write_text("CONFIG = 'configs/x.py:bn'\n"
                  "SWEEP = {'seed': [0, 1], 'optimizer.learning_rate': "
                  "[0.1, 0.01]}\n")
  sweep, config = sweep_lib.load_sweep_file(path)
  assert config == 'configs/x.py:bn'
  merged = sweep_lib.merge_sweeps(sweep, ['seed=5'])
  assert merged == {'seed': [5], 'optimizer.learning_rate': [0.1, 0.01]}
  bad = tmp_path / 'bad.py'
  bad.write_text("SWEEP = {'seed': 'abc'}\n")
  with pytest.raises(sweep_lib.SweepError, match='non-empty list'):
    sweep_lib.load_sweep_file(bad)


def test_script_runs_grid_writes_sweep_json_and_passes_overrides(
    tmp_path, config_file):
  workdir = tmp_path / 'sweep'
  engine = FakeEngine()
  code = sweep_script.sweep(
      config_file + ':arg', str(workdir),
      ['optimizer.learning_rate=0.1,0.01', 'model.normalizer=none,batch_norm'],
      None, ['--config.num_train_steps=5'], python='/py', launcher=engine)
  assert code == 0
  assert len(engine.commands) == 4
  assert engine.commands[0] == [
      '/py', '-m', 'bn_research.main', f'--config={config_file}:arg',
      f'--workdir={workdir}/optimizer.learning_rate=0.1,model.normalizer=none',
      '--config.num_train_steps=5', '--config.optimizer.learning_rate=0.1',
      '--config.model.normalizer=none']
  record = json.loads((workdir / 'sweep.json').read_text())
  assert record['sweep'] == {'optimizer.learning_rate': [0.1, 0.01],
                             'model.normalizer': ['none', 'batch_norm']}
  assert [r['name'] for r in record['runs']] == engine.launched_names()

  # Same directory, different base config: refused before launching.
  with pytest.raises(sweep_lib.SweepError, match='another --workdir'):
    sweep_script.sweep(config_file, str(workdir), ['seed=1'], None, [],
                       launcher=FakeEngine())


def test_script_rejects_unknown_keys_before_launching(tmp_path, config_file):
  engine = FakeEngine()
  with pytest.raises(sweep_lib.SweepError, match="'optimizer.lr'"):
    sweep_script.sweep(config_file, str(tmp_path / 'w'), ['optimizer.lr=1,2'],
                       None, [], launcher=engine)
  assert engine.commands == []
  assert not (tmp_path / 'w').exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'scripts.sweep', *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_print_commands_leaves_out_finished_runs(tmp_path, config_file):
  workdir = tmp_path / 'sweep'
  _write_status(workdir / 'seed=1', 'done')
  proc = _run_cli(f'--config={config_file}', f'--workdir={workdir}',
                  '--sweep=seed=0,1,2', '--config.batch_size', '30',
                  '--print_commands')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2
  argvs = [shlex.split(line) for line in lines]
  assert [a[4] for a in argvs] == [f'--workdir={workdir}/seed=0',
                                   f'--workdir={workdir}/seed=2']
  assert all('--config.batch_size=30' in a for a in argvs)
  assert (workdir / 'sweep.json').is_file()
  assert not (workdir / 'seed=0').exists()  # Nothing was run.


def test_cli_bad_syntax_fails_before_anything(tmp_path, config_file):
  workdir = tmp_path / 'sweep'
  proc = _run_cli(f'--config={config_file}', f'--workdir={workdir}',
                  '--sweep=seed=0,1', '--sweep=optimizer.learning_rate=0.1,,1',
                  '--print_commands')
  assert proc.returncode != 0
  assert '--sweep=optimizer.learning_rate=0.1,,1' in proc.stderr
  assert 'value #2' in proc.stderr
  assert proc.stdout == ''
  assert not workdir.exists()


FAKE_MAIN = '''#!{python}
import os, pathlib, sys, time
workdir = pathlib.Path(next(a for a in sys.argv if a.startswith('--workdir='))[10:])
workdir.mkdir(parents=True, exist_ok=True)
(workdir / 'started').write_text('')
others = [p for p in workdir.parent.iterdir() if p.is_dir() and p != workdir]
deadline = time.time() + 60
while not all((p / 'started').exists() for p in others):  # both must be running at once
  if time.time() > deadline:
    sys.exit(3)
  time.sleep(0.05)
print('hello from', workdir.name)
sys.exit(1 if workdir.name == 'seed=1' else 0)
'''


def test_parallel_sweep_runs_the_points_at_once_with_a_log_each(tmp_path):
  fake = tmp_path / 'fake_python'
  fake.write_text(FAKE_MAIN.format(python=sys.executable))
  fake.chmod(0o755)
  planned = sweep_lib.plan_sweep('c.py', tmp_path / 'sweep', {'seed': [0, 1]},
                                 python=str(fake))
  result = sweep_lib.run_sweep(planned, parallel=2)
  # Each waited for the other to start, so neither exited 3: they ran concurrently.
  assert result.launched == ['seed=0', 'seed=1']
  assert result.failed == [('seed=1', 1)]
  assert 'hello from seed=0' in (tmp_path / 'sweep' / 'seed=0.log').read_text()


def test_parallel_and_vmap_are_refused_together(tmp_path, config_file):
  with pytest.raises(sweep_lib.SweepError, match='choose one'):
    sweep_script.sweep(config_file, str(tmp_path / 'w'), ['seed=0,1'], None, [],
                       vmap=True, parallel=2, launcher=FakeEngine())
  with pytest.raises(sweep_lib.SweepError, match='--parallel=0'):
    sweep_script.sweep(config_file, str(tmp_path / 'w'), ['seed=0,1'], None, [],
                       parallel=0, launcher=FakeEngine())
  assert not (tmp_path / 'w').exists()
