"""A run directory is never silently corrupted (issue 21.1), through the command line.

A damaged checkpoint (bytes flipped at the same size, truncated, or never sealed) is
moved aside, named in one line, and the run resumes from the newest good one with the
same final parameters as an uninterrupted run; a workdir that holds a run without its
config.json is refused, with nothing deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from bn_research import rundir
from tests import helpers

ARGS = ['--config=configs/mnist_mlp.py:bn,source=synthetic',
        '--config.num_train_steps=60', '--config.eval_every_steps=20',
        '--config.log_every_steps=10', '--config.checkpoint_every_steps=20',
        '--config.steps_per_dispatch=10', '--config.data.image_size=8',
        '--config.data.num_train=200', '--config.data.num_test=64',
        '--config.batch_size=30', '--config.probe.num_examples=32']


def _rows(workdir) -> list[dict]:
  return [{k: v for k, v in r.items() if k != 'steps_per_second'}
          for r in rundir.read_metrics(str(workdir))]


@pytest.fixture(scope='module')
def whole(tmp_path_factory):
  """An uninterrupted run of ARGS."""
  workdir = tmp_path_factory.mktemp('whole') / 'run'
  proc = helpers.run_main(ARGS + [f'--workdir={workdir}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def killed(tmp_path_factory):
  """ARGS killed by SIGKILL at step 50, after its sealed checkpoints at steps 20 and 40.
  Tests damage and resume their own copies (`_copy_of`): one killed process for all."""
  workdir = tmp_path_factory.mktemp('killed') / 'run'
  proc = helpers.run_main(ARGS + [f'--workdir={workdir}'],
                          env={'BN_RESEARCH_KILL_AT_STEP': '50'})
  assert proc.returncode != 0, proc.stderr[-3000:]  # SIGKILL
  return workdir


def _copy_of(run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run, workdir)
  return workdir


def _data_files(checkpoint) -> list[str]:
  """The array data files of a checkpoint (tensorstore's chunks), largest first."""
  found = []
  for root, _, names in os.walk(checkpoint):
    for name in names:
      path = os.path.join(root, name)
      if os.path.basename(root) == 'd':
        found.append(path)
  return sorted(found, key=os.path.getsize, reverse=True)


def flip_bytes(checkpoint) -> None:
  """Inverts bytes in the middle of the largest data file: the size stays the same."""
  path = _data_files(checkpoint)[0]
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def _truncate(checkpoint) -> None:
  path = _data_files(checkpoint)[0]
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _unseal(checkpoint) -> None:
  """As if the process died after orbax finalised the save but before it was sealed."""
  os.remove(os.path.join(checkpoint, rundir.INTEGRITY_FILE))


def _tree_digest(path) -> dict[str, str]:
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = hashlib.sha256(open(full, 'rb').read()).hexdigest()
  return out


@pytest.mark.parametrize('damage,reason', [
    (flip_bytes, 'does not match its sha256'),
    (_truncate, 'truncated'),
    (_unseal, 'save never completed'),
])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
    tmp_path, whole, killed, damage, reason):
  workdir = _copy_of(killed, tmp_path)
  assert rundir.checkpoint_steps(str(workdir)) == [20, 40]
  newest = workdir / rundir.CHECKPOINT_DIR / '40'
  assert rundir.verify(str(newest)) is None  # sealed before the kill
  damage(newest)
  assert rundir.verify(str(newest)) is not None
  before = _tree_digest(newest)

  resumed = helpers.run_main(ARGS + [f'--workdir={workdir}'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  named = [line for line in resumed.stderr.splitlines() if str(newest) in line]
  assert len(named) == 1 and reason in named[0] and 'moved to' in named[0], named
  assert 'Resumed from the checkpoint at step 20' in resumed.stderr
  # Kept aside, byte for byte, never deleted.
  aside = os.listdir(workdir / rundir.DAMAGED_CHECKPOINT_DIR)
  assert len(aside) == 1 and aside[0].startswith('40-')
  assert _tree_digest(workdir / rundir.DAMAGED_CHECKPOINT_DIR / aside[0]) == before

  import jax  # pylint: disable=g-import-not-at-top
  a, b = rundir.load_latest(str(whole)), rundir.load_latest(str(workdir))
  assert int(b['step']) == 60
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)  # bitwise on CPU
  assert _rows(whole) == _rows(workdir)
  assert rundir.read_status(str(workdir))['status'] == 'done'


def test_every_saved_checkpoint_is_sealed_with_the_sha256_of_its_files(whole):
  for step in rundir.checkpoint_steps(str(whole)):
    directory = whole / rundir.CHECKPOINT_DIR / str(step)
    record = json.loads((directory / rundir.INTEGRITY_FILE).read_text())['files']
    on_disk = _tree_digest(directory)
    on_disk.pop(rundir.INTEGRITY_FILE)
    assert {k: v['sha256'] for k, v in record.items()} == on_disk
    assert all(v['size'] == os.path.getsize(directory / k) for k, v in record.items())


@pytest.mark.parametrize('keep', ['everything', 'checkpoints', 'metrics'])
def test_a_run_without_its_config_is_refused_in_one_line_and_nothing_is_deleted(
    tmp_path, whole, keep):
  workdir = _copy_of(whole, tmp_path)
  os.remove(workdir / rundir.CONFIG_FILE)
  if keep != 'everything':
    for name in os.listdir(workdir):
      if name != (rundir.CHECKPOINT_DIR if keep == 'checkpoints' else rundir.METRICS_FILE):
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() else os.remove(path)
  before = _tree_digest(workdir)

  refused = helpers.run_main(ARGS + [f'--workdir={workdir}'])
  assert refused.returncode == 2
  errors = [line for line in refused.stderr.splitlines() if 'error' in line]
  assert len(errors) == 1 and 'no config.json' in errors[0] and '--overwrite' in errors[0]
  assert 'Traceback' not in refused.stderr
  assert _tree_digest(workdir) == before

  # --overwrite moves that run aside whole and starts afresh.
  fresh = helpers.run_main(ARGS + [f'--workdir={workdir}', '--overwrite'])
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  backups = [p for p in os.listdir(tmp_path) if p.startswith('run.replaced-')]
  assert len(backups) == 1 and _tree_digest(tmp_path / backups[0]) == before
  assert _rows(workdir) == _rows(whole)


def test_a_run_from_before_checkpoints_were_sealed_resumes_from_its_newest(
    tmp_path, whole, killed):
  """No checkpoint of the run has an integrity record (written by a version that did not
  seal them): upgrading must not cost the resume point. The newest is restored as orbax
  finalised it, named in one warning line, and sealed; nothing is moved aside; the run
  ends equal to an uninterrupted one. Readers load such a run's final state too."""
  workdir = _copy_of(killed, tmp_path)
  assert rundir.checkpoint_steps(str(workdir)) == [20, 40]
  for step in (20, 40):
    _unseal(workdir / rundir.CHECKPOINT_DIR / str(step))
  newest = workdir / rundir.CHECKPOINT_DIR / '40'

  resumed = helpers.run_main(ARGS + [f'--workdir={workdir}'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  named = [line for line in resumed.stderr.splitlines() if str(newest) in line]
  assert len(named) == 1 and 'before checkpoints were sealed' in named[0], named
  assert 'Resumed from the checkpoint at step 40' in resumed.stderr
  assert not (workdir / rundir.DAMAGED_CHECKPOINT_DIR).exists()
  helpers.assert_same_run(workdir, whole, atol=0)
  for step in rundir.checkpoint_steps(str(workdir)):  # the newer ones sealed as they came
    assert rundir.verify(str(workdir / rundir.CHECKPOINT_DIR / str(step))) is None

  legacy = tmp_path / 'legacy'
  shutil.copytree(whole, legacy)
  for step in rundir.checkpoint_steps(str(legacy)):
    _unseal(legacy / rundir.CHECKPOINT_DIR / str(step))
  import jax  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree_util.tree_leaves(rundir.load_latest(str(whole))),
                  jax.tree_util.tree_leaves(rundir.load_latest(str(legacy)))):
    np.testing.assert_array_equal(x, y)
