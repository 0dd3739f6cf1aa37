"""The run directory: lock, damaged checkpoints, unreadable files, status rebuilt.

Each test reproduces a defect of issue 14 against `bn_research.rundir`, the one owner
of the run directory's files, and `bn_research.engine.resume`, which decides from them.
"""

from __future__ import annotations

import json
import os
import socket

from absl import logging as absl_logging
import numpy as np
import pytest

from bn_research import rundir
from bn_research.engine import resume
from tests import helpers


@pytest.fixture
def warnings_logged(monkeypatch):
  """The absl warnings rundir logs, as formatted strings."""
  lines = []
  monkeypatch.setattr(absl_logging, 'warning',
                      lambda msg, *args: lines.append(msg % args if args else msg))
  return lines


# ---------------------------------------------------------------- the lock


def test_a_second_holder_is_refused_and_a_killed_holders_lock_is_taken_over(
    tmp_path, warnings_logged):
  workdir = tmp_path / 'run'
  # The holder ends with SIGKILL (helpers.lock_holder), which runs no cleanup.
  with helpers.lock_holder(workdir) as proc:
    with pytest.raises(rundir.RunDirError) as refused:
      rundir.WorkdirLock(str(workdir)).acquire()
    message = str(refused.value)
    assert '\n' not in message
    assert f'process {proc.pid}' in message and socket.gethostname() in message
    assert str(workdir / rundir.LOCK_FILE) in message
    # --overwrite must not move the run from under its live process.
    (workdir / rundir.CONFIG_FILE).write_text('{}')
    with pytest.raises(rundir.RunDirError, match=f'process {proc.pid}'):
      rundir.move_aside(str(workdir))
    assert (workdir / rundir.CONFIG_FILE).exists()
  # SIGKILL runs no cleanup: the lock file stays, naming a pid that no longer runs.
  assert json.loads((workdir / rundir.LOCK_FILE).read_text())['pid'] == proc.pid
  with rundir.WorkdirLock(str(workdir)) as lock:
    assert json.loads((workdir / rundir.LOCK_FILE).read_text())['pid'] == os.getpid()
    assert any(f'process {proc.pid}' in w and 'no longer runs' in w
               for w in warnings_logged)
    # Our own lock does not stop our own --overwrite, and it stays held across it.
    backup = rundir.move_aside(str(workdir))
    assert os.listdir(backup) == [rundir.CONFIG_FILE]
    assert os.listdir(workdir) == [rundir.LOCK_FILE] and lock.held
  assert not (workdir / rundir.LOCK_FILE).exists()


def test_two_holders_in_one_process_and_release_on_an_exception(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(RuntimeError, match='inside'):
    with rundir.WorkdirLock(workdir):
      with pytest.raises(rundir.RunDirError, match='in use by process'):
        rundir.WorkdirLock(workdir).acquire()
      raise RuntimeError('inside the run')
  # Released, and the workdir it created (still empty) is gone: no trace left.
  assert not os.path.exists(workdir)
  with rundir.WorkdirLock(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write('{"step": 1}\n')
  assert os.listdir(workdir) == ['metrics.jsonl']  # a written run stays


def test_a_workdir_that_is_a_file_or_has_no_parent_is_one_line(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('x')
  config = helpers.tiny_mlp_config()
  for call in (lambda w: rundir.WorkdirLock(w).acquire(),
               lambda w: resume.decide(w, config, False)):
    with pytest.raises(rundir.RunDirError, match='is a file, not a directory'):
      call(str(afile))
    with pytest.raises(rundir.RunDirError, match='does not exist'):
      call(str(tmp_path / 'no' / 'such' / 'run'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write into read-only directories')
def test_a_read_only_workdir_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  workdir.chmod(0o500)
  try:
    with pytest.raises(rundir.RunDirError, match='not writable'):
      resume.decide(str(workdir), helpers.tiny_mlp_config(), False)
  finally:
    workdir.chmod(0o700)


# ---------------------------------------------------------------- unreadable files


def test_read_metrics_skips_garbage_and_non_utf8_lines_with_one_warning(
    tmp_path, warnings_logged):
  rows = [{'step': s, 'train_loss': 1.0 / s} for s in (1, 2, 3, 4)]
  lines = [json.dumps(r).encode() for r in rows]
  lines.insert(1, b'\xff\xfe not utf-8 \x80')         # line 2
  lines.insert(3, b'{"step": 2, "train_lo')           # line 4: cut by a kill
  lines.insert(5, b'["not", "a", "row"]')             # line 6
  (tmp_path / rundir.METRICS_FILE).write_bytes(b'\n'.join(lines) + b'\n{"step": 5, "tr')
  assert rundir.read_metrics(str(tmp_path)) == rows
  assert len(warnings_logged) == 1
  warning = warnings_logged[0]
  assert str(tmp_path / rundir.METRICS_FILE) in warning and 'line 2, 4, 6' in warning
  # Resume's truncation reads the same way: the good rows up to the step are kept.
  rundir.RunFiles(str(tmp_path)).truncate_metrics(after_step=3)
  assert rundir.read_metrics(str(tmp_path)) == rows[:3]


@pytest.mark.parametrize('name,reader,fix', [
    (rundir.CONFIG_FILE, rundir.read_config, '--overwrite'),
    (rundir.STATUS_FILE, rundir.read_status, 'delete it'),
    (rundir.DESCRIPTION_FILE, rundir.read_description, 'delete it'),
])
@pytest.mark.parametrize('content', [b'{"status": "runn', b'\xff\xfe', b'[1, 2]'])
def test_a_corrupt_run_file_names_itself_and_the_fix(tmp_path, name, reader, fix,
                                                     content):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(rundir.RunDirError) as error:
    reader(str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and str(tmp_path / name) in message and fix in message


def test_check_workdir_names_a_corrupt_config_and_moves_it_with_overwrite(tmp_path):
  config = helpers.tiny_mlp_config()
  (tmp_path / rundir.CONFIG_FILE).write_text('{"seed": ')
  with pytest.raises(rundir.RunDirError, match='config.json is not valid JSON'):
    resume.decide(str(tmp_path), config, overwrite=False)
  assert resume.decide(str(tmp_path), config, overwrite=True) == 'new'
  rundir.RunFiles(str(tmp_path)).write_config(config)
  (tmp_path / rundir.STATUS_FILE).write_text('{"status": "do')
  with pytest.raises(rundir.RunDirError, match='status.json is not valid JSON.*rebuilds'):
    resume.decide(str(tmp_path), config, overwrite=False)


# ---------------------------------------------------------------- checkpoints


def _state(value: float) -> dict:
  return {'params': {'w': np.full((4, 3), value, np.float32)},
          'step': np.asarray(int(value), np.int32)}


def _damage(checkpoint_dir) -> None:
  """Overwrites the array data of a checkpoint, as a disk error or a kill might."""
  for root, _, files in os.walk(checkpoint_dir):
    for name in files:
      if os.path.basename(root) == 'd':  # tensorstore's data files
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'\x00garbage')


def test_restore_latest_good_skips_a_damaged_latest_checkpoint(tmp_path, warnings_logged):
  ckpt = rundir.Checkpointer(str(tmp_path))
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  ckpt.close()
  assert rundir.checkpoint_steps(str(tmp_path)) == [2, 3]  # max_to_keep=2
  _damage(tmp_path / rundir.CHECKPOINT_DIR / '3')

  ckpt = rundir.Checkpointer(str(tmp_path))
  state, step = ckpt.restore_latest_good(_state(0))
  assert step == 2
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  assert int(state['step']) == 2
  assert len(warnings_logged) == 1
  assert str(tmp_path / rundir.CHECKPOINT_DIR / '3') in warnings_logged[0]
  # The damaged one is kept aside, and the resumed run can save its step again.
  assert os.listdir(tmp_path / rundir.DAMAGED_CHECKPOINT_DIR)[0].startswith('3-')
  ckpt.save(3, _state(30))
  ckpt.wait()
  assert ckpt.latest_complete_step() == 3
  state, step = ckpt.restore_latest_good(_state(0))
  assert step == 3 and float(state['params']['w'][0, 0]) == 30
  ckpt.close()


def test_restore_latest_good_with_every_checkpoint_damaged_starts_over(tmp_path):
  ckpt = rundir.Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1))
  ckpt.close()
  _damage(tmp_path / rundir.CHECKPOINT_DIR / '1')
  ckpt = rundir.Checkpointer(str(tmp_path))
  assert ckpt.restore_latest_good(_state(0)) == (None, None)
  assert ckpt.latest_step() is None and ckpt.latest_complete_step() is None
  ckpt.close()


# ---------------------------------------------------------------- status rebuilt


@pytest.mark.usefixtures('fast_compiles')
@pytest.mark.parametrize('learning_rate,expected', [(0.1, 'done'), (1e38, 'diverged')])
def test_a_deleted_status_of_a_finished_run_is_rebuilt_by_resuming(
    tmp_path, learning_rate, expected, warnings_logged):
  from bn_research import train
  config = helpers.tiny_mlp_config(**{'optimizer.learning_rate': learning_rate})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  written = rundir.read_status(workdir)
  metrics = rundir.read_metrics(workdir)
  assert written['status'] == expected
  os.remove(os.path.join(workdir, rundir.STATUS_FILE))
  assert resume.decide(workdir, config, overwrite=False) == resume.RESUME
  assert any('no status.json' in w for w in warnings_logged)
  train.train_and_evaluate(config, workdir)
  rebuilt = rundir.read_status(workdir)
  written.pop('time'), rebuilt.pop('time')
  assert rebuilt == written
  drop = ('steps_per_second',)
  assert ([{k: v for k, v in r.items() if k not in drop} for r in metrics]
          == [{k: v for k, v in r.items() if k not in drop}
              for r in rundir.read_metrics(workdir)])
  if expected == 'done':
    assert rebuilt['eval_accuracy'] == metrics[-1]['eval_accuracy']
  assert resume.decide(workdir, config, overwrite=False) == resume.DONE
