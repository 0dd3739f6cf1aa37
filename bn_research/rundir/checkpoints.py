"""A run's checkpoints: orbax saves, each sealed by an integrity record, checked on restore.

    checkpoints/<step>/                 one orbax checkpoint
    checkpoints/<step>/integrity.json   its files' sizes and sha256, written once the
                                        asynchronous save is finalised
    checkpoints.damaged/<step>-<time>/  a checkpoint that failed its check, kept aside

orbax writes a checkpoint into a temporary directory and renames it into place when
its save is finalised, but a rename says nothing about the bytes read back later: a
disk error, a copy cut short or a stray write leaves a checkpoint that orbax restores
without a word. So a checkpoint is trusted only if its integrity record is there and
every file it lists has its size and its checksum. One without a record was never
sealed (its process died between the save and the seal): it is incomplete, and is
treated like a damaged one, except in a run none of whose checkpoints has a record
(written before checkpoints were sealed): those are used as orbax finalised them, with
a warning, and sealed when restored, so that upgrading never costs a resume point. A checkpoint that fails is moved aside, never deleted, and
named in one line; a resume goes on with the newest checkpoint that passes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from typing import Any, Optional

from absl import logging

from bn_research.data.download import sha256_of
from bn_research.rundir.files import (CHECKPOINT_DIR, DAMAGED_CHECKPOINT_DIR, RunDirError,
                                      read_json, write_json)

INTEGRITY_FILE = 'integrity.json'


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints orbax finalised on disk, ascending (sealed or not).

  orbax writes a checkpoint into a temporary directory and renames it to `<step>`
  when it is complete, so only plain integer names count.
  """
  root = os.path.join(workdir, CHECKPOINT_DIR)
  try:
    names = os.listdir(root)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(int(n) for n in names
                if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR, str(step))


def _checkpoint_files(directory: str) -> list[str]:
  """Every file of a checkpoint directory (relative paths), its own record excluded."""
  out = []
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names):
      rel = os.path.relpath(os.path.join(root, name), directory)
      if not rel.startswith(INTEGRITY_FILE):  # the record and its temporary files
        out.append(rel)
  return out


def seal(directory: str) -> None:
  """Writes a finalised checkpoint's integrity record: each file's size and sha256."""
  files = {rel: {'size': os.path.getsize(os.path.join(directory, rel)),
                 'sha256': sha256_of(os.path.join(directory, rel))}
           for rel in _checkpoint_files(directory)}
  write_json(os.path.join(directory, INTEGRITY_FILE), {'files': files})


def is_sealed(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, INTEGRITY_FILE))


def verify(directory: str) -> Optional[str]:
  """Why a checkpoint directory cannot be trusted, or None if it passes its check."""
  try:
    record = read_json(os.path.join(directory, INTEGRITY_FILE), '')
  except RunDirError:
    return f'its {INTEGRITY_FILE} is unreadable'
  if record is None:
    return f'no {INTEGRITY_FILE}: its save never completed'
  files = record.get('files') if isinstance(record, dict) else None
  if not isinstance(files, dict) or not files:
    return f'its {INTEGRITY_FILE} lists no files'
  for rel, expected in sorted(files.items()):
    path = os.path.join(directory, rel)
    if not isinstance(expected, dict):
      return f'{rel} is missing'
    try:
      size = os.path.getsize(path)
      if size != expected.get('size'):
        return f'{rel} has {size} bytes, not {expected.get("size")} (truncated or replaced)'
      if sha256_of(path) != expected.get('sha256'):
        return f'{rel} does not match its sha256 (damaged)'
    except OSError:
      # Missing, or gone while being read: in a multi-process run, process 0 moves a
      # damaged checkpoint aside while the other processes may still be checking it.
      return f'{rel} is missing'
  return None


def predates_sealing(workdir: str) -> bool:
  """Whether a run's checkpoints were written before checkpoints were sealed: it has
  checkpoints and none of them has an integrity record. (A run of this version seals
  each checkpoint at its next save, so at most its first one can lack a record.)"""
  steps = checkpoint_steps(workdir)
  return bool(steps) and not any(is_sealed(step_dir(workdir, s)) for s in steps)


def _legacy_warning(directory: str) -> None:
  logging.warning('Checkpoint %s has no %s: written before checkpoints were sealed, so '
                  'its bytes cannot be checked; used as orbax finalised it.', directory,
                  INTEGRITY_FILE)


def move_damaged(workdir: str, step: int) -> str:
  """Moves a checkpoint out of orbax's sight into checkpoints.damaged/; returns where."""
  root = os.path.join(workdir, DAMAGED_CHECKPOINT_DIR)
  os.makedirs(root, exist_ok=True)
  dst = os.path.join(root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  n = 1
  while os.path.exists(dst):
    n += 1
    dst = os.path.join(root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}-{n}')
  shutil.move(step_dir(workdir, step), dst)
  return dst


def set_aside(workdir: str, step: int, reason: str) -> None:
  """Names an unusable checkpoint in one warning line and moves it aside."""
  directory = step_dir(workdir, step)
  logging.warning('Checkpoint %s cannot be used (%s); moved to %s; trying an earlier one.',
                  directory, reason, move_damaged(workdir, step))


def _first_line(e: BaseException) -> str:
  return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'


class Checkpointer:
  """Saves and restores train-state pytrees under `<workdir>/checkpoints/<step>`.

  Saves are asynchronous. A save is sealed (its integrity record written) at the next
  point where this checkpointer waits for it anyway: the next save (orbax waits for the
  previous one there), `wait` or `close`. Only process 0 seals and moves checkpoints;
  every process checks them.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 2):
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.workdir = workdir
    self._primary = jax.process_index() == 0
    self._unsealed: list[int] = []
    self.unusable: list[tuple[int, str]] = []  # (step, reason): restore_latest_good's skips
    path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    # A manager of this process alone, even in a multi-process run: the engine gives
    # every process the same host copy of the state and lets one process (0) write,
    # checkpoints included. A manager spanning the processes would meet the others at
    # orbax's barriers (several per save, some in its background threads, keyed by
    # names that repeat from save to save); with K members' managers saving at once,
    # those barriers were where a multi-process sweep hung.
    me = jax.process_index()
    prefix = hashlib.sha1(path.encode()).hexdigest()[:12]
    os.makedirs(path, exist_ok=True)  # (orbax creates it only for managers of all processes)
    self._manager = ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=False, enable_async_checkpointing=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=prefix)))

  def latest_step(self) -> Optional[int]:
    """The newest step saved, including one whose asynchronous write is in progress."""
    return self._manager.latest_step()

  def latest_complete_step(self) -> Optional[int]:
    """The newest sealed step, without waiting: a status written during training
    names this step, never one still being written or not yet sealed."""
    sealed = [s for s in checkpoint_steps(self.workdir)
              if is_sealed(step_dir(self.workdir, s))]
    return sealed[-1] if sealed else None

  def _seal_finished(self) -> None:
    """Seals this checkpointer's saves; call only once orbax has finalised them."""
    for step in self._unsealed:
      directory = step_dir(self.workdir, step)
      if self._primary and os.path.isdir(directory):  # (max_to_keep may have removed it)
        seal(directory)
    self._unsealed = []

  def save(self, step: int, state: Any) -> None:
    # Training goes on while the files are written; the previous save is waited for
    # first (orbax would wait for it inside `save` anyway) and sealed.
    self.wait()
    self._manager.save(int(step), args=self._ocp.args.StandardSave(state))
    self._unsealed.append(int(step))

  def restore(self, like: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, shapes, dtypes and shardings of `like` (unchecked;
    `restore_latest_good` checks first)."""
    import jax  # pylint: disable=g-import-not-at-top
    step = self._manager.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

  def restore_latest_good(self, like: Any, *, set_aside_now: bool = True
                          ) -> tuple[Optional[Any], Optional[int]]:
    """Restores the newest checkpoint that passes its integrity check and restores.

    Newer ones that fail (damaged, truncated, unsealed, or rejected by orbax) are
    skipped and listed in `self.unusable` as (step, reason); with `set_aside_now`,
    process 0 names each in one warning line and moves it to `checkpoints.damaged/`
    at once (`set_aside`): kept, but out of the way of the checkpoint the resumed run
    writes at the same step. A multi-process run passes False and sets them aside
    once every process has finished looking (another process's checkpoint manager
    lists the step directories while it starts). A restore either returns a whole
    state or fails: nothing is ever partly restored.

    Args:
      like: a state of the structure, shapes, dtypes and shardings to restore into.
      set_aside_now: move the unusable ones aside here (process 0 only).

    Returns:
      (state, step), or (None, None) when no checkpoint can be restored.
    """
    self.wait()
    self.unusable = []
    legacy = predates_sealing(self.workdir)
    for step in sorted(self._manager.all_steps(), reverse=True):
      directory = step_dir(self.workdir, step)
      unchecked = legacy and not is_sealed(directory)
      reason = None if unchecked else verify(directory)
      if reason is None:
        try:
          state = self.restore(like, step)
        except Exception as e:  # orbax, tensorstore and msgpack raise many kinds
          reason = _first_line(e)
        else:
          if unchecked:
            _legacy_warning(directory)
            if self._primary:  # checked from now on, as every newer checkpoint
              seal(directory)
          return state, int(step)
      # Every process checks the same files; process 0 alone moves them and names them
      # (one line for the run, not one per process).
      self.unusable.append((int(step), reason))
      if set_aside_now and self._primary:
        set_aside(self.workdir, int(step), reason)
        self._manager.reload()
    return None, None

  def wait(self) -> None:
    """Blocks until every asynchronous save is on disk, and seals it."""
    self._manager.wait_until_finished()
    self._seal_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()


def load_latest(workdir: str) -> Optional[Any]:
  """The newest checkpoint of a run that passes its integrity check, as a plain pytree
  of NumPy arrays (for analysis); None if there is none. Changes nothing on disk:
  a failing checkpoint is only named in a warning."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  legacy = predates_sealing(workdir)
  for step in reversed(checkpoint_steps(workdir)):
    directory = step_dir(workdir, step)
    reason = None if legacy else verify(directory)
    if legacy:
      _legacy_warning(directory)
    if reason is not None:
      logging.warning('Checkpoint %s cannot be used (%s); trying an earlier one.',
                      directory, reason)
      continue
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)))
    try:
      tree = manager.restore(step, args=ocp.args.StandardRestore())
    finally:
      manager.close()
    return jax.tree_util.tree_map(jax.device_get, tree)
  return None
