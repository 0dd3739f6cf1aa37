"""A run directory's files: their names, their readers, and the writer of a run's records.

    config.json     the resolved config
    data.json       the dataset and model actually used (sizes, warnings, parameters)
    metrics.jsonl   one JSON object per logged step
    status.json     {"status": "running" | "done" | "diverged" | "failed" | "interrupted",
                     "step": N, ...}
    events.out.tfevents.*   TensorBoard scalars (tensorboardX: no TensorFlow needed)
    checkpoints/    orbax checkpoints, one directory per step, each with its integrity
                    record (`bn_research.rundir.checkpoints`)
    checkpoints.damaged/    checkpoints that failed their integrity check, kept aside
    run.lock        while a process runs in the workdir: its pid and host
                    (`bn_research.rundir.lock`)

Every error about a file is a one-line `RunDirError` (a ValueError) naming the file and
what to do about it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
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
EVENTS_PREFIX = 'events.out.tfevents.'
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


def read_json(path: str, fix: str) -> Optional[Any]:
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
  value = read_json(path, fix)
  if value is not None and not isinstance(value, dict):
    raise RunDirError(f'{path} holds a JSON {type(value).__name__}, not an object; {fix}')
  return value


_FIX_CONFIG = ('restore it, or pass --overwrite to move this run aside (renamed, '
               'never deleted) and start afresh.')
_FIX_STATUS = ('delete it: the next run of the same command rebuilds it by resuming '
               'from the newest checkpoint.')
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


def run_files_present(path: str) -> list[str]:
  """The run files `path` holds, by name (a directory name ends with "/").

  Any one of them makes `path` a run directory: a run whose config.json is gone still
  has its metrics and checkpoints, and must never be taken for an empty directory.
  An empty checkpoints/ directory does not count (orbax creates it before any save).
  """
  if not os.path.isdir(path):
    return []
  found = [f for f in (CONFIG_FILE, STATUS_FILE, METRICS_FILE, DESCRIPTION_FILE)
           if os.path.isfile(os.path.join(path, f))]
  for d in (CHECKPOINT_DIR, DAMAGED_CHECKPOINT_DIR):
    full = os.path.join(path, d)
    if os.path.isdir(full) and os.listdir(full):
      found.append(d + '/')
  try:
    found.extend(sorted(n for n in os.listdir(path) if n.startswith(EVENTS_PREFIX)))
  except OSError:
    pass
  return found


def is_run_dir(path: str) -> bool:
  """Whether `path` is a directory holding any of a run's files."""
  return bool(run_files_present(path))


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
  record = read_json(path, fix)
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


def check_usable_dir(workdir: str) -> None:
  """RunDirError for a workdir that is a file, or that this process cannot write into."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunDirError(f'--workdir={workdir!r} is a file, not a directory; choose a '
                      'directory path.')
  target = workdir if os.path.isdir(workdir) else os.path.dirname(os.path.abspath(workdir))
  if os.path.isdir(target) and not os.access(target, os.W_OK | os.X_OK):
    raise RunDirError(f'--workdir={workdir!r}: {target!r} is not writable; fix its '
                      'permissions or choose another workdir.')



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


