"""Tests of sweep grids, run names, the typed plan's validation, its backends and the
sweep command line (skip/resume, --parallel, --print_commands, signals)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from bn_research import plan as plan_lib
from bn_research import sweep as sweep_lib
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = 'configs/mnist_mlp.py:bn,source=synthetic,steps=20'


def test_parse_value_types():
  assert sweep_lib.parse_value('3') == 3 and isinstance(
      sweep_lib.parse_value('3'), int)
  assert sweep_lib.parse_value('1e-2') == 0.01
  assert sweep_lib.parse_value('true') is True
  assert sweep_lib.parse_value('False') is False
  assert sweep_lib.parse_value('None') is None
  assert sweep_lib.parse_value('batch_norm') == 'batch_norm'
  assert sweep_lib.parse_value('(100, 100)') == (100, 100)
  assert sweep_lib.parse_value('inf') == float('inf')  # a number, for the spec to refuse


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
  grid = plan_lib.expand_grid({'a': [1, 2], 'b': ['x', 'y', 'z']})
  assert len(grid) == 6
  # First key varies slowest, keys in sweep order.
  assert [tuple(p.values()) for p in grid] == [
      (1, 'x'), (1, 'y'), (1, 'z'), (2, 'x'), (2, 'y'), (2, 'z')]
  assert all(list(p) == ['a', 'b'] for p in grid)
  assert plan_lib.expand_grid({}) == [{}]


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


def test_split_config_overrides():
  overrides, rest = sweep_lib.split_config_overrides([
      '--config=c.py:x', '--config.seed=3', '--config.batch_size', '10',
      '--noconfig.model.flag', '--sweep=seed=1,2', '--workdir=w'])
  assert overrides == ['--config.seed=3', '--config.batch_size=10',
                       '--noconfig.model.flag']
  assert rest == ['--config=c.py:x', '--sweep=seed=1,2', '--workdir=w']
  assert [sweep_lib.parse_override(o) for o in overrides] == [
      ('seed', 3), ('batch_size', 10), ('model.flag', False)]


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


# ---------------------------------------------------------------- the typed plan


def test_grid_sets_typed_values_and_the_command_text_loads_the_same_config(tmp_path):
  from bn_research import config_files
  runs = plan_lib.grid(CONFIG, str(tmp_path), {'optimizer.learning_rate': [0.1, 1],
                                               'model.hidden_sizes': [(20, 10)]},
                       {'data.num_train': 300, 'optimizer.nesterov': True})
  assert [r.name.rsplit('-', 1)[0] for r in runs] == [
      'optimizer.learning_rate=0.1,model.hidden_sizes=20_10',
      'optimizer.learning_rate=1,model.hidden_sizes=20_10']
  assert runs[1].config.optimizer.learning_rate == 1.0
  assert isinstance(runs[1].config.optimizer.learning_rate, float)
  assert runs[0].config.model.hidden_sizes == (20, 10)
  assert dict(runs[0].params) == {'optimizer.learning_rate': 0.1,
                                  'model.hidden_sizes': (20, 10)}
  # The one text the process backend writes is read back by ml_collections' own
  # override parser (the engine's) into the very same config.
  for run in runs:
    argv = plan_lib.command(run, '/py')
    assert argv[:5] == ['/py', '-m', 'bn_research.main', f'--config={CONFIG}',
                        f'--workdir={run.workdir}']
    again = config_files.load_config(CONFIG, argv[5:])
    assert helpers.flat(again) == helpers.flat(run.config)
  assert not any(tmp_path.iterdir())  # planning writes nothing


@pytest.mark.parametrize('sweep, fragment', [
    ({'optimizer.learning_rate': [0.1, float('inf')]}, 'optimizer.learning_rate=inf'),
    ({'optimizer.learning_rate': [0.1, None]}, 'optimizer.learning_rate=None'),
    ({'optimizer.learning_rate': [0.1, 10**400]}, 'too large'),
    ({'seed': [0, True]}, 'seed=True'),
    ({'seed': [0, 2**40]}, 'seed=1099511627776'),
    ({'seed': [0, 1.5]}, 'seed=1.5'),
    ({'batch_size': [60, 0]}, 'batch_size=0'),
    ({'model.normalizer': ['batch_norm', 'batchnorm']}, "model.normalizer='batchnorm'"),
    ({'optimizer.lr': [0.1]}, 'optimizer.lr=0.1: no such config key'),
    ({'optimizer.momentum': [0.5, 0.9]}, "optimizer.name='sgd' has no momentum"),
    ({'optimizer.decay_steps': [10, 20]}, 'decay_rate=1 keeps'),
    ({'optimizer.regularize_batch_norm': [True, False]}, 'optimizer.weight_decay=0'),
])
def test_every_value_of_a_sweep_is_checked_with_its_keys_spec(tmp_path, sweep, fragment):
  common = {'optimizer.name': 'sgd'} if 'optimizer.momentum' in sweep else {}
  with pytest.raises(ValueError) as info:
    plan_lib.grid(CONFIG, str(tmp_path / 's'), sweep, common)
  assert fragment in str(info.value) and '\n' not in str(info.value)


def test_a_key_is_not_both_swept_and_set_and_names_and_workdirs_are_unique(tmp_path):
  with pytest.raises(plan_lib.SweepError, match='seed is both swept and set'):
    plan_lib.grid(CONFIG, str(tmp_path), {'seed': [0, 1]}, {'seed': 3})
  a = plan_lib.make_run('a', str(tmp_path / 'x'), CONFIG)
  b = plan_lib.make_run('b', str(tmp_path / 'x'), CONFIG)
  with pytest.raises(plan_lib.SweepError, match='share the workdir'):
    plan_lib.run_plan([a, b], 'print', out=lambda line: None)
  with pytest.raises(plan_lib.SweepError, match="how='queue' is invalid"):
    plan_lib.run_plan([a], 'queue')


# ---------------------------------------------------------------- the process backend

# Stands in for `python -m bn_research.main`: logs its start and end to the sweep's
# events file, then behaves as FAKE_MODE says.
FAKE_MAIN = '''#!{python}
import json, os, pathlib, signal, sys, time
workdir = pathlib.Path(next(a for a in sys.argv if a.startswith('--workdir='))[10:])
workdir.mkdir(parents=True, exist_ok=True)
events = workdir.parent / 'events.txt'
def log(what):
  with open(events, 'a') as f:
    f.write(f'{{what}} {{workdir.name}}\\n')
def status(s, code):
  (workdir / 'status.json').write_text(json.dumps({{'status': s, 'step': 7}}))
  log('end')
  sys.exit(code)
log('start')
(workdir / 'argv.json').write_text(json.dumps(sys.argv[1:]))
mode = os.environ.get('FAKE_MODE', 'done')
print('hello from', workdir.name, flush=True)
if mode.startswith('together:'):  # every sibling must be running at once
  deadline = time.time() + 60
  while events.read_text().count('start') < int(mode.split(':')[1]):
    if time.time() > deadline:
      status('failed', 3)
    time.sleep(0.05)
  time.sleep(0.3)  # so that an end never precedes a sibling's start
if mode == 'hang':
  signal.signal(signal.SIGTERM, lambda s, f: status('interrupted', 128 + s))
  signal.signal(signal.SIGINT, lambda s, f: status('interrupted', 128 + s))
  while True:
    time.sleep(0.05)
if workdir.name == os.environ.get('FAKE_FAIL'):
  status('failed', 1)
time.sleep(0.2)
status('done', 0)
'''


@pytest.fixture
def fake_python(tmp_path) -> str:
  fake = tmp_path / 'fake_python'
  fake.write_text(FAKE_MAIN.format(python=sys.executable))
  fake.chmod(0o755)
  return str(fake)


def _events(sweep_dir: pathlib.Path) -> list[str]:
  return (sweep_dir / 'events.txt').read_text().splitlines()


def _write_status(run_dir: pathlib.Path, status: str) -> None:
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / 'status.json').write_text(json.dumps({'status': status, 'step': 5}))


def test_parallel_one_runs_in_order_skips_finished_and_a_failure_stops_nothing(
    tmp_path, fake_python, monkeypatch):
  sweep_dir = tmp_path / 'sweep'
  runs = plan_lib.grid(CONFIG, str(sweep_dir), {'seed': [0, 1, 2, 3, 4]})
  _write_status(sweep_dir / 'seed=1', 'done')
  _write_status(sweep_dir / 'seed=3', 'diverged')
  _write_status(sweep_dir / 'seed=4', 'interrupted')
  monkeypatch.setenv('FAKE_FAIL', 'seed=2')
  outcomes = plan_lib.run_plan(runs, 'processes', parallel=1, python=fake_python)
  # One after another, in plan order: each run ends before the next starts.
  assert _events(sweep_dir) == ['start seed=0', 'end seed=0', 'start seed=2',
                                'end seed=2', 'start seed=4', 'end seed=4']
  assert [(o.name, o.status, o.skipped, o.returncode) for o in outcomes] == [
      ('seed=0', 'done', False, 0), ('seed=1', 'done', True, 0),
      ('seed=2', 'failed', False, 1), ('seed=3', 'diverged', True, 0),
      ('seed=4', 'done', False, 0)]
  assert 'hello from seed=0' in (sweep_dir / 'seed=0.log').read_text()
  # Re-running retries only the failed run.
  monkeypatch.delenv('FAKE_FAIL')
  plan_lib.run_plan(runs, 'processes', python=fake_python)
  assert _events(sweep_dir)[6:] == ['start seed=2', 'end seed=2']


def test_parallel_two_runs_the_points_at_once(tmp_path, fake_python, monkeypatch):
  sweep_dir = tmp_path / 'sweep'
  runs = plan_lib.grid(CONFIG, str(sweep_dir), {'seed': [0, 1]})
  monkeypatch.setenv('FAKE_MODE', 'together:2')
  outcomes = plan_lib.run_plan(runs, 'processes', parallel=2, python=fake_python)
  # Each waited until both had started: one after the other, the first would time out.
  assert [(o.status, o.returncode) for o in outcomes] == [('done', 0), ('done', 0)]
  assert sorted(_events(sweep_dir)[:2]) == ['start seed=0', 'start seed=1']


# ---------------------------------------------------------------- the command line


def _run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
  return helpers.run_module('scripts.sweep', list(args), **kwargs)


def test_cli_runs_the_grid_writes_sweep_json_and_prints_a_table(tmp_path, fake_python):
  workdir = tmp_path / 'sweep'
  proc = _run_cli(f'--config={CONFIG}', f'--workdir={workdir}', '--sweep=seed=0,1',
                  '--sweep=optimizer.learning_rate=0.1,1e-2', '--config.batch_size', '30',
                  f'--python={fake_python}')
  assert proc.returncode == 0, proc.stderr
  names = ['seed=0,optimizer.learning_rate=0.1', 'seed=0,optimizer.learning_rate=0.01',
           'seed=1,optimizer.learning_rate=0.1', 'seed=1,optimizer.learning_rate=0.01']
  assert json.loads((workdir / names[1] / 'argv.json').read_text())[4:] == [
      '--config.batch_size=30', '--config.seed=0', '--config.optimizer.learning_rate=0.01']
  record = json.loads((workdir / 'sweep.json').read_text())
  assert record['sweep'] == {'seed': [0, 1], 'optimizer.learning_rate': [0.1, 0.01]}
  assert [r['name'] for r in record['runs']] == names
  table = [line.split() for line in proc.stdout.splitlines() if line.startswith('seed=')]
  assert [row[:3] for row in table] == [[n, 'done', '7'] for n in names]
  # The same directory with another base config: refused before anything runs.
  again = _run_cli(f'--config={CONFIG}', f'--workdir={workdir}', '--sweep=seed=5',
                   f'--python={fake_python}')
  assert again.returncode == 2 and 'another --workdir' in again.stderr
  assert not (workdir / 'seed=5').exists()


def test_cli_print_commands_leaves_out_finished_runs(tmp_path):
  workdir = tmp_path / 'sweep'
  _write_status(workdir / 'seed=1', 'done')
  proc = _run_cli(f'--config={CONFIG}', f'--workdir={workdir}', '--sweep=seed=0,1,2',
                  '--config.batch_size', '30', '--print_commands')
  assert proc.returncode == 0, proc.stderr
  argvs = [shlex.split(line) for line in proc.stdout.strip().splitlines()]
  assert [a[4] for a in argvs] == [f'--workdir={workdir}/seed=0',
                                   f'--workdir={workdir}/seed=2']
  assert all('--config.batch_size=30' in a for a in argvs)
  assert (workdir / 'sweep.json').is_file()
  assert not (workdir / 'seed=0').exists()  # Nothing was run.


@pytest.mark.parametrize('args, fragment', [
    (['--sweep=seed=0,1', '--sweep=optimizer.learning_rate=0.1,,1'], 'value #2'),
    (['--sweep=optimizer.learning_rate=0.1,inf'], 'optimizer.learning_rate=inf'),
    (['--sweep=seed=0,1', '--config.batch_size=0'], 'batch_size=0'),
    (['--sweep=optimizer.momentum=0.5,0.9', '--config.optimizer.name=sgd'],
     'changes nothing'),
    (['--sweep=seed=0,True', '--vmap'], 'seed=True'),
    (['--sweep=seed=0,1', '--vmap', '--parallel=2'], 'choose one'),
    (['--sweep=seed=0,1', '--parallel=0'], '--parallel=0'),
    (['--sweep=seed=0,1', 'stray'], 'unexpected arguments: stray'),
])
def test_cli_bad_input_is_one_line_before_anything(tmp_path, args, fragment):
  workdir = tmp_path / 'sweep'
  # Nothing would run anyway: the vmap cases fail before training, the others print.
  extra = [] if '--vmap' in args else ['--print_commands']
  proc = _run_cli(f'--config={CONFIG}', f'--workdir={workdir}', *args, *extra)
  assert proc.returncode == 2, proc.stderr
  assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
  assert proc.stdout == ''
  assert not workdir.exists()


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_every_run_of_a_parallel_sweep(tmp_path, fake_python, signum, code):
  workdir = tmp_path / 'sweep'
  env = dict(os.environ, FAKE_MODE='hang',
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.Popen(
      [sys.executable, '-m', 'scripts.sweep', f'--config={CONFIG}', f'--workdir={workdir}',
       '--sweep=seed=0,1,2', '--parallel=2', f'--python={fake_python}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and not (
      (workdir / 'events.txt').exists() and _events(workdir).count('start seed=0') +
      _events(workdir).count('start seed=1') == 2):
    time.sleep(0.1)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == code, stderr[-3000:]
  assert 'Traceback' not in stderr
  assert f'interrupted by signal {signum}' in stderr.strip().splitlines()[-1]
  # Both started runs got the signal and recorded it; the third never started.
  for name in ('seed=0', 'seed=1'):
    status = json.loads((workdir / name / 'status.json').read_text())
    assert status['status'] == 'interrupted'
  assert not (workdir / 'seed=2').exists()


def test_a_vmap_group_in_its_own_process_is_the_sweep_of_its_grid(tmp_path):
  """how='vmap' with parallel > 1: each group is `scripts.sweep --vmap` over exactly its
  grid, in the directory of its runs, with the common overrides; the sweep script's
  own parsing gives back the same typed values and run names."""
  spec = 'configs/mnist_mlp.py:bn,source=synthetic'
  runs = plan_lib.grid(spec, str(tmp_path / 'bn'),
                       {'seed': [0, 1], 'optimizer.learning_rate': [0.1, 1e-3]},
                       {'num_train_steps': 8, 'model.hidden_sizes': (16, 16)})
  [group] = plan_lib.vmap_groups(runs)
  argv = plan_lib.group_command(group, 'PY')
  assert argv[:6] == ['PY', '-m', 'scripts.sweep', f'--config={spec}',
                      f'--workdir={tmp_path / "bn"}', '--vmap']
  sweeps = [a[len('--sweep='):] for a in argv if a.startswith('--sweep=')]
  assert dict(sweep_lib.parse_sweep_arg(a) for a in sweeps) == {
      'seed': [0, 1], 'optimizer.learning_rate': [0.1, 1e-3]}
  overrides, _ = sweep_lib.split_config_overrides(argv)
  assert dict(map(sweep_lib.parse_override, overrides)) == {
      'num_train_steps': 8, 'model.hidden_sizes': (16, 16)}
  # Not a whole grid (one point missing): the sweep would train a run not planned.
  with pytest.raises(plan_lib.SweepError, match='not one whole grid'):
    plan_lib.group_command(group[:3], 'PY')
  renamed = [dataclasses.replace(r, workdir=str(tmp_path / 'bn' / f'r{i}'))
             for i, r in enumerate(group)]
  with pytest.raises(plan_lib.SweepError, match='not one whole grid'):
    plan_lib.group_command(renamed, 'PY')
