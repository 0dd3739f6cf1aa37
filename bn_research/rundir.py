"""The run directory, both sides: what a run writes into its workdir, and how it is read.

    config.json     the resolved config
    data.json       the dataset and model actually used (sizes, warnings, parameters)
    metrics.jsonl   one JSON object per logged step
    status.json     {"status": "running" | "done" | "diverged" | "failed" | "interrupted",
                     "step": N, ...}
    events.out.tfevents.*   TensorBoard scalars (tensorboardX: no TensorFlow needed)
    checkpoints/    orbax checkpoints, one directory per step
    run.lock        while a process runs in the workdir: its pid and host

This module is the only one that knows these names. The engine writes through
`RunFiles` and `Checkpointer` under a `WorkdirLock`; analysis, sweeps and experiments
read through `read_config`, `read_status`, `read_description` and `read_metrics`.
Every error about a file is a one-line `RunDirError` (a ValueError) naming the file and
what to do about it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import sys
import time
from typing import Any, Mapping, Optional

from absl import logging
import ml_collections

CONFIG_FILE = 'config.json'
DESCRIPTION_FILE = 'data.json'
METRICS_FILE = 'metrics.jsonl'
STATUS_FILE = 'status.json'
LOCK_FILE = 'run.lock'
CHECKPOINT_DIR = 'checkpoints'
# Checkpoints that failed to restore are moved here (never deleted), out of orbax's sight.
DAMAGED_CHECKPOINT_DIR = 'checkpoints.damaged'
# A sweep directory (`bn_research.sweep`) holds its record beside its run directories.
SWEEP_FILE = 'sweep.json'
SWEEP_OWN_FILES = (SWEEP_FILE, SWEEP_FILE + '.tmp')

STATUSES = ('running', 'done', 'diverged', 'failed', 'interrupted')
# Statuses after which a run does not change any more when relaunched.
FINISHED_STATUSES = ('done', 'diverged')


class RunDirError(ValueError):
  """A run file or workdir that cannot be used; the message names it and the fix."""


# ---------------------------------------------------------------- configs


def _jsonable(value: Any) -> Any:
  """Floats that JSON cannot hold (nan, inf) become strings rather than invalid JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A config as the plain nested dict config.json holds."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """A nested config dict as dotted keys ("optimizer.learning_rate"); empty dicts and
  non-dict values (lists included) are leaves."""
  flat = {}
  for key, value in config.items():
    full = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, full + '.'))
    else:
      flat[full] = value
  return flat


def config_differences(a: Mapping, b: Mapping) -> list[str]:
  """The dotted keys whose values differ between two config dicts, sorted."""
  fa, fb = flatten(a), flatten(b)
  return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


# ---------------------------------------------------------------- readers


def _read_json(path: str, fix: str) -> Optional[Any]:
  """A JSON file's content; None if absent; RunDirError naming the file and `fix`."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except FileNotFoundError:
    return None
  except IsADirectoryError:
    raise RunDirError(f'{path} is a directory, not a file; {fix}') from None
  except OSError as e:
    raise RunDirError(f'{path} cannot be read ({e.strerror}); {fix}') from None
  try:
    return json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    reason = str(e).splitlines()[0]
    raise RunDirError(f'{path} is not valid JSON ({reason}); {fix}') from None


def _read_json_dict(workdir: str, name: str, fix: str) -> Optional[dict]:
  path = os.path.join(workdir, name)
  value = _read_json(path, fix)
  if value is not None and not isinstance(value, dict):
    raise RunDirError(f'{path} holds a JSON {type(value).__name__}, not an object; {fix}')
  return value


_FIX_CONFIG = ('restore it, or pass --overwrite to move this run aside (renamed, '
               'never deleted) and start afresh.')
_FIX_STATUS = ('delete it: the next run of the same command rebuilds it from '
               f'{METRICS_FILE} and the checkpoints.')
_FIX_DESCRIPTION = ('delete it: the next run of the same command writes it again.')


def read_config(workdir: str) -> Optional[dict]:
  """config.json of a run as a nested dict; None if it is not written (yet).

  Raises:
    RunDirError: the file exists but is not a JSON object.
  """
  return _read_json_dict(workdir, CONFIG_FILE, _FIX_CONFIG)


def read_status(workdir: str) -> Optional[dict]:
  """status.json of a run; None if it is not written (yet).

  Raises:
    RunDirError: the file exists but is not a JSON object.
  """
  return _read_json_dict(workdir, STATUS_FILE, _FIX_STATUS)


def read_description(workdir: str) -> Optional[dict]:
  """data.json of a run (dataset, sizes, warnings, parameters); None if not written.

  Raises:
    RunDirError: the file exists but is not a JSON object.
  """
  return _read_json_dict(workdir, DESCRIPTION_FILE, _FIX_DESCRIPTION)


def _metrics_lines(path: str) -> tuple[list[tuple[dict, bytes]], list[int]]:
  """(row, raw line) for every good line of a metrics file, and the bad line numbers.

  A line is bad if it is not UTF-8, not JSON, or not an object with an integer step.
  A final line without its newline that does not parse is a write cut off (by a kill,
  or still in progress): dropped without counting as bad.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    return [], []
  except OSError as e:
    raise RunDirError(f'{path} cannot be read ({e.strerror}); fix its permissions.') from None
  lines = data.split(b'\n')
  good, bad = [], []
  for i, raw in enumerate(lines):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError):
      row = None
    if (isinstance(row, dict) and isinstance(row.get('step'), int)
        and not isinstance(row['step'], bool)):
      good.append((row, raw))
    elif i < len(lines) - 1:  # the last chunk has no newline yet: a cut-off write
      bad.append(i + 1)
  return good, bad


def _warn_bad_lines(path: str, bad: list[int]) -> None:
  if bad:
    shown = ', '.join(map(str, bad[:10])) + (' ...' if len(bad) > 10 else '')
    logging.warning('%s: skipped %d line(s) that are not JSON rows with a step '
                    '(line %s).', path, len(bad), shown)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of metrics.jsonl in file order; [] if it is not written (yet).

  Never aborts on content: lines that are not UTF-8, not JSON or have no integer
  step are skipped with one warning naming the file and their line numbers. A resumed
  run may have logged a step twice; both rows are returned (the later one is the run
  that continued). Non-finite values are the strings "nan", "inf", "-inf".
  """
  path = os.path.join(workdir, METRICS_FILE)
  good, bad = _metrics_lines(path)
  _warn_bad_lines(path, bad)
  return [row for row, _ in good]


def is_run_dir(path: str) -> bool:
  """Whether `path` is a directory holding any of a run's files."""
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, f)) for f in (CONFIG_FILE, METRICS_FILE, STATUS_FILE))


def is_sweep_dir(path: str) -> bool:
  """Whether `path` is a directory written by a sweep (it holds sweep.json)."""
  return os.path.isfile(os.path.join(path, SWEEP_FILE))


def read_sweep(sweep_dir: str) -> Optional[dict]:
  """sweep.json of a sweep directory; None if absent.

  Raises:
    RunDirError: it exists but is not a JSON object with a list of runs.
  """
  path = os.path.join(sweep_dir, SWEEP_FILE)
  fix = ('restore it, or delete it and re-run the sweep command, which writes it again '
         '(finished runs are skipped).')
  record = _read_json(path, fix)
  if record is not None and not (isinstance(record, dict)
                                 and isinstance(record.get('runs'), list)):
    raise RunDirError(f'{path} is not a sweep record (an object with a "runs" list); {fix}')
  return record


# ---------------------------------------------------------------- the workdir


def check_workdir_parent(workdir: str) -> None:
  """RunDirError unless the workdir's parent is an existing, writable directory."""
  parent = os.path.dirname(os.path.abspath(workdir))
  if not os.path.isdir(parent):
    raise RunDirError(f'--workdir={workdir!r}: its parent directory {parent!r} does not '
                      'exist; create it or choose another workdir.')


def _check_usable_dir(workdir: str) -> None:
  """RunDirError for a workdir that is a file, or that this process cannot write into."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunDirError(f'--workdir={workdir!r} is a file, not a directory; choose a '
                      'directory path.')
  target = workdir if os.path.isdir(workdir) else os.path.dirname(os.path.abspath(workdir))
  if os.path.isdir(target) and not os.access(target, os.W_OK | os.X_OK):
    raise RunDirError(f'--workdir={workdir!r}: {target!r} is not writable; fix its '
                      'permissions or choose another workdir.')


def check_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> str:
  """Decides what to do with an existing workdir. Writes nothing, except that a
  finished run whose status.json is missing gets it rebuilt (`rebuild_status`).

  Returns:
    'new' (empty or absent, or a different config with overwrite), 'resume' (same
    config), or 'done' (same config, finished: done or diverged).

  Raises:
    RunDirError: the workdir (or its parent) is not a writable directory, one of its
      files is corrupt, or it holds a run of a different config and overwrite is False.
  """
  check_workdir_parent(workdir)
  _check_usable_dir(workdir)
  try:
    old = read_config(workdir)
  except RunDirError:
    if overwrite:
      return 'new'
    raise
  if old is None:
    return 'new'
  diff = config_differences(old, config_to_dict(config))
  if diff and not overwrite:
    shown = ', '.join(diff[:6]) + (' ...' if len(diff) > 6 else '')
    raise RunDirError(
        f'--workdir={workdir!r} holds a run of a different config (differs in: {shown}); '
        'choose another workdir, or pass --overwrite to move that run aside.')
  if diff:
    return 'new'
  status = read_status(workdir)
  if status is None:
    status = rebuild_status(workdir)
  return 'done' if (status or {}).get('status') in FINISHED_STATUSES else 'resume'


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
    _check_usable_dir(self.workdir)
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


# ---------------------------------------------------------------- the writer


class RunFiles:
  """Writes a run's config, status, metrics and TensorBoard scalars."""

  def __init__(self, workdir: str, *, is_writer: bool = True):
    self.workdir = workdir
    self.is_writer = is_writer  # only process 0 writes in multi-host runs
    self._tb = None
    if is_writer:
      os.makedirs(workdir, exist_ok=True)

  def _write_json(self, name: str, obj: Any) -> None:
    if self.is_writer:
      write_json(os.path.join(self.workdir, name), obj)

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    self._write_json(CONFIG_FILE, config_to_dict(config))

  def write_description(self, description: Mapping[str, Any]) -> None:
    self._write_json(DESCRIPTION_FILE, dict(description))

  def write_status(self, status: str, step: int, **extra: Any) -> None:
    """Writes status.json; `step` must name a complete checkpoint or a logged step."""
    if status not in STATUSES:
      raise ValueError(f'status={status!r}; allowed: {", ".join(STATUSES)}.')
    self._write_json(STATUS_FILE, status_record(status, step, **extra))

  def truncate_metrics(self, after_step: int) -> None:
    """Drops rows past the resumed checkpoint (a killed run may have logged beyond it),
    and lines that cannot be read (warned about, naming the file and lines)."""
    path = os.path.join(self.workdir, METRICS_FILE)
    if not self.is_writer or not os.path.exists(path):
      return
    good, bad = _metrics_lines(path)
    _warn_bad_lines(path, bad)
    with open(path + '.tmp', 'wb') as f:
      f.writelines(raw + b'\n' for row, raw in good if row['step'] <= after_step)
    os.replace(path + '.tmp', path)

  def write_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.is_writer:
      return
    row = {'step': int(step), **{k: _jsonable(float(v)) for k, v in metrics.items()}}
    with open(os.path.join(self.workdir, METRICS_FILE), 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is None:
      self._tb = _summary_writer_class()(self.workdir, flush_secs=30)
    for k, v in metrics.items():
      if math.isfinite(float(v)):
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def write_json(path: str, obj: Any, *, sort_keys: bool = True) -> None:
  """Writes a JSON file atomically (a temporary file renamed into place): a reader never
  sees half a file, and a kill mid-write leaves the previous version."""
  # A temporary name of this writer's own: the processes of a multi-process sweep may
  # each write the same sweep.json at once.
  tmp = f'{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
  with open(tmp, 'w') as f:
    # default=repr: anything JSON cannot hold stays readable.
    json.dump(obj, f, indent=2, sort_keys=sort_keys, default=repr)
    f.write('\n')
  os.replace(tmp, path)


def status_record(status: str, step: int, **extra: Any) -> dict:
  """The dict status.json holds."""
  return {'status': status, 'step': int(step), 'time': time.time(),
          **{k: _jsonable(v) for k, v in extra.items()}}


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch whenever it is installed, only so that it can accept
  torch tensors: about 2 s of every run's start-up on a 2-core CPU, for the plain
  floats written here. Unless torch is already loaded, it is hidden for the import.
  """
  if 'torch' in sys.modules or 'tensorboardX.writer' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


# ---------------------------------------------------------------- checkpoints


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints on disk, ascending.

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


class Checkpointer:
  """Saves and restores train-state pytrees under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.workdir = workdir
    import jax  # pylint: disable=g-import-not-at-top
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
    """The newest step whose checkpoint is completely on disk, without waiting.

    A status written during training names this step, never one still being written.
    """
    steps = checkpoint_steps(self.workdir)
    return steps[-1] if steps else None

  def save(self, step: int, state: Any) -> None:
    # Async: training goes on while the files are written; `wait` before exiting.
    self._manager.save(int(step), args=self._ocp.args.StandardSave(state))

  def restore(self, like: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, shapes, dtypes and shardings of `like`."""
    import jax  # pylint: disable=g-import-not-at-top
    step = self._manager.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

  def restore_latest_good(self, like: Any) -> tuple[Optional[Any], Optional[int]]:
    """Restores the newest checkpoint that can be restored, trying newer ones first.

    A checkpoint that fails to restore is logged in one warning line naming it, and
    moved to `checkpoints.damaged/` (kept, but out of the way of the checkpoint the
    resumed run writes at the same step). A restore either returns a whole state or
    fails: nothing is ever partly restored.

    Args:
      like: a state of the structure, shapes, dtypes and shardings to restore into.

    Returns:
      (state, step), or (None, None) when no checkpoint can be restored.
    """
    self.wait()
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.restore(like, step), int(step)
      except Exception as e:  # orbax, tensorstore and msgpack raise many kinds
        path = os.path.join(self.workdir, CHECKPOINT_DIR, str(step))
        reason = (str(e).strip().splitlines() or [''])[0][:200]
        logging.warning('Checkpoint %s cannot be restored (%s: %s); moved to %s/ and '
                        'trying an earlier one.', path, type(e).__name__, reason,
                        DAMAGED_CHECKPOINT_DIR)
        self._move_damaged(step)
    return None, None

  def _move_damaged(self, step: int) -> None:
    src = os.path.join(self.workdir, CHECKPOINT_DIR, str(step))
    dst_root = os.path.join(self.workdir, DAMAGED_CHECKPOINT_DIR)
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if os.path.exists(src):
      shutil.move(src, dst)
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_latest(workdir: str) -> Optional[Any]:
  """The latest checkpoint of a run as a plain pytree of NumPy arrays (for analysis)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)))
  step = manager.latest_step()
  if step is None:
    return None
  tree = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return jax.tree_util.tree_map(jax.device_get, tree)


# ---------------------------------------------------------------- status rebuild


def rebuild_status(workdir: str) -> Optional[dict]:
  """Rebuilds a finished run's missing status.json from its other files, and writes it.

  The engine ends a run as `diverged` after logging a non-finite `train_loss` row at
  the divergence step, and as `done` after the last step's checkpoint and eval row;
  the status holds the step, the divergence (if any) and the latest eval metrics. That
  is what this reconstructs. A run that did not finish is left alone (the engine
  resumes it and writes its status).

  Returns:
    The status written, or None if the run did not finish (or has no config).
  """
  config = read_config(workdir)
  if config is None:
    return None
  num_steps = config.get('num_train_steps')
  max_loss = (config.get('divergence') or {}).get('max_loss') or 0
  rows = read_metrics(workdir)
  last: dict[str, Any] = {}
  status, step, extra = None, None, {}
  for row in rows:
    # The engine's divergence markers (`engine.loop`): a NaN train_loss row for a
    # non-finite loss or parameters, or a train row above divergence.max_loss.
    loss = row.get('train_loss')
    reason = None
    if loss == 'nan':
      reason = ('non-finite parameters' if row.get('nonfinite_parameters')
                else 'non-finite loss')
    elif max_loss and isinstance(loss, (int, float)) and loss > max_loss:
      reason = f'loss above {max_loss:g}'
    if reason:
      status, step = 'diverged', row['step']
      extra = {'diverged_step': step, 'reason': reason, 'message': f'{reason} at step {step}'}
      break
    if row['step'] > 0:  # as the engine's status: the step-0 evaluation is not in it
      last.update(row)
  if status is None:
    if not isinstance(num_steps, int) or num_steps not in checkpoint_steps(workdir):
      return None
    if not any(r['step'] == num_steps for r in rows):
      return None
    status, step = 'done', num_steps
  record = status_record(status, step, **extra,
                         **{k: v for k, v in last.items() if k.startswith('eval_')})
  write_json(os.path.join(workdir, STATUS_FILE), record)
  logging.warning('%s was missing; rebuilt it from %s and the checkpoints: %s at step %d.',
                  os.path.join(workdir, STATUS_FILE), METRICS_FILE, status, step)
  return record
