"""One process per run directory: the workdir lock, and moving a run aside.

`WorkdirLock` holds `<workdir>/run.lock` for a run's life; `move_aside` (--overwrite)
renames a run out of the way, never while another live process holds its lock; and
`lock_state` tells a reader whether a run that says `running` still has a live process.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from typing import Mapping, Optional

from absl import logging

from bn_research.rundir.files import (LOCK_FILE, RunDirError, check_usable_dir,
                                      check_workdir_parent)


def check_not_locked(workdir: str) -> None:
  """RunDirError if another live process holds the workdir's lock (see WorkdirLock).

  The engine calls this before moving a run aside, so that --overwrite never pulls
  the directory from under a run that is still writing into it.
  """
  holder = _read_lock(os.path.join(workdir, LOCK_FILE))
  if holder is not None and not _is_own(holder) and _holder_alive(holder):
    raise RunDirError(_held_message(workdir, holder))


def move_aside(workdir: str) -> Optional[str]:
  """--overwrite keeps the old run: it is renamed, never deleted.

  Everything but this process's own lock file moves into `<workdir>.replaced-<time>`,
  so the lock stays held across the move.

  Returns:
    The backup path, or None if there was nothing to move.

  Raises:
    RunDirError: another live process holds the workdir's lock.
  """
  if not os.path.isdir(workdir):
    return None
  check_not_locked(workdir)
  entries = [e for e in os.listdir(workdir) if e != LOCK_FILE]
  if not entries:
    return None
  backup = f'{workdir.rstrip(os.sep)}.replaced-{time.strftime("%Y%m%d-%H%M%S")}'
  n = 1
  while os.path.exists(backup):  # two moves within one second
    n += 1
    backup = f'{workdir.rstrip(os.sep)}.replaced-{time.strftime("%Y%m%d-%H%M%S")}-{n}'
  os.makedirs(backup)
  for entry in entries:
    shutil.move(os.path.join(workdir, entry), os.path.join(backup, entry))
  return backup


# ---------------------------------------------------------------- the lock


def _read_lock(path: str) -> Optional[dict]:
  """The holder recorded in a lock file; None if there is none. A lock file that is not
  what `WorkdirLock` writes (it writes the whole file at once) reads as a dead holder."""
  try:
    with open(path, 'rb') as f:
      holder = json.loads(f.read().decode('utf-8'))
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return {'pid': None, 'host': None, 'token': None}
  return holder if isinstance(holder, dict) else {'pid': None, 'host': None, 'token': None}


def _is_own(holder: Mapping) -> bool:
  return holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname() \
      and holder.get('token') in WorkdirLock._held_tokens


def _holder_alive(holder: Mapping) -> bool:
  """Whether the lock's holder may still run. Another host's process cannot be checked,
  so it counts as alive; on this host, a pid that no longer exists is dead."""
  pid = holder.get('pid')
  if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
    return False
  if holder.get('host') != socket.gethostname():
    return True
  if pid == os.getpid():  # this process: alive if the lock is one it holds
    return holder.get('token') in WorkdirLock._held_tokens
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _held_message(workdir: str, holder: Mapping) -> str:
  lock = os.path.join(workdir, LOCK_FILE)
  return (f'--workdir={workdir!r} is in use by process {holder.get("pid")} on host '
          f'{holder.get("host")!r} (lock file {lock}); wait for it to end or stop it, or '
          'choose another workdir. If that process is gone, delete the lock file.')


class WorkdirLock:
  """Holds `<workdir>/run.lock` for a run's life: one process per workdir.

      with rundir.WorkdirLock(workdir):
        ...   # check_workdir, move_aside, training, status

  The lock file holds the holder's pid and host and is written whole (linked into
  place), so it never reads half-written. It is removed on any exit from the `with`
  block, exceptions included; a process killed with SIGKILL leaves it behind, and the
  next run on the same host finds that pid dead and takes the lock over with a warning.
  A holder on another host cannot be checked and is respected. If the lock created the
  workdir and the workdir is still empty on release, it is removed again, so that a
  run refused before writing anything leaves no trace.

  Raises (on entering):
    RunDirError: another live process holds the lock (naming its pid, host and the lock
      file), or the workdir cannot be created or written.
  """

  _held_tokens: set[str] = set()  # tokens of the locks this process holds

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._token: Optional[str] = None
    self._created_dir = False

  def acquire(self) -> 'WorkdirLock':
    check_workdir_parent(self.workdir)
    check_usable_dir(self.workdir)
    if not os.path.isdir(self.workdir):
      try:
        os.makedirs(self.workdir)
        self._created_dir = True
      except FileExistsError:
        pass
      except OSError as e:
        raise RunDirError(f'--workdir={self.workdir!r} cannot be created ({e.strerror}); '
                          'choose another workdir.') from None
    token = secrets.token_hex(8)
    record = {'pid': os.getpid(), 'host': socket.gethostname(), 'token': token,
              'time': time.time()}
    tmp = f'{self.path}.{os.getpid()}.{token}.tmp'
    try:
      with open(tmp, 'w') as f:
        json.dump(record, f)
      for _ in range(3):  # a stale lock taken over by another process meanwhile: retry
        try:
          os.link(tmp, self.path)  # atomic, and fails if any lock file exists
          break
        except FileExistsError:
          holder = _read_lock(self.path)
          if holder is None:
            continue  # released meanwhile
          if _holder_alive(holder):
            raise RunDirError(_held_message(self.workdir, holder)) from None
          self._take_over_stale(holder)
      else:
        raise RunDirError(f'--workdir={self.workdir!r}: could not take its lock file '
                          f'{self.path} (other processes keep taking it); try again.')
    except OSError as e:
      raise RunDirError(f'--workdir={self.workdir!r}: cannot write its lock file '
                        f'{self.path} ({e.strerror}); fix the permissions or choose '
                        'another workdir.') from None
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    self._token = token
    WorkdirLock._held_tokens.add(token)
    return self

  def _take_over_stale(self, holder: Mapping) -> None:
    """Removes a dead holder's lock file, unless another process replaced it first."""
    aside = f'{self.path}.stale.{os.getpid()}.{secrets.token_hex(4)}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # another process removed it first
    if _read_lock(aside) != holder:  # a live process's fresh lock: put it back
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    else:
      logging.warning('Taking over the lock %s of process %s on %s, which no longer runs '
                      '(killed?).', self.path, holder.get('pid'), holder.get('host'))
    os.remove(aside)

  def release(self) -> None:
    """Removes the lock file if it is still this lock's; safe to call twice."""
    if self._token is None:
      return
    holder = _read_lock(self.path)
    if holder is not None and holder.get('token') == self._token:
      os.remove(self.path)
    WorkdirLock._held_tokens.discard(self._token)
    self._token = None
    if self._created_dir:
      try:
        os.rmdir(self.workdir)  # only if the run wrote nothing
      except OSError:
        pass

  @property
  def held(self) -> bool:
    return self._token is not None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()




def lock_state(workdir: str) -> str:
  """Whether a run's process still holds its workdir, as a reader can tell.

  Returns:
    'held' (a live process on this host, or any process on another host, which cannot
    be checked), 'stale' (the lock names a process of this host that no longer runs:
    killed without clean-up), or 'absent' (no lock file).
  """
  holder = _read_lock(os.path.join(workdir, LOCK_FILE))
  if holder is None:
    return 'absent'
  return 'held' if _holder_alive(holder) else 'stale'
