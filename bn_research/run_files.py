"""What a run writes into its workdir, and how a restarted run finds it again.

    config.json     the resolved config
    data.json       the dataset and model actually used (sizes, warnings, parameters)
    metrics.jsonl   one JSON object per logged step
    status.json     {"status": "running" | "done" | "diverged" | "failed", "step": N, ...}
    events.out.tfevents.*   TensorBoard scalars (tensorboardX: no TensorFlow needed)
    checkpoints/    orbax checkpoints
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any, Mapping, Optional

import ml_collections

STATUSES = ('running', 'done', 'diverged', 'failed', 'interrupted')


def _jsonable(value: Any) -> Any:
  """Floats that JSON cannot hold (nan, inf) become strings rather than invalid JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
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
  fa, fb = flatten(a), flatten(b)
  return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def read_status(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, 'status.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> str:
  """Decides what to do with an existing workdir, before anything is written.

  Returns:
    'new' (empty or absent), 'resume' (same config), or 'done' (same config, finished).

  Raises:
    ValueError: the workdir holds a run of a different config and overwrite is False.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return 'new'
  with open(path) as f:
    old = json.load(f)
  diff = config_differences(old, config_to_dict(config))
  if diff and not overwrite:
    shown = ', '.join(diff[:6]) + (' ...' if len(diff) > 6 else '')
    raise ValueError(
        f'--workdir={workdir!r} holds a run of a different config (differs in: {shown}); '
        'choose another workdir, or pass --overwrite to move that run aside.')
  if diff:
    return 'new'
  status = read_status(workdir) or {}
  return 'done' if status.get('status') in ('done', 'diverged') else 'resume'


def move_aside(workdir: str) -> Optional[str]:
  """--overwrite keeps the old run: it is renamed, never deleted."""
  if not os.path.exists(workdir) or not os.listdir(workdir):
    return None
  backup = f'{workdir.rstrip(os.sep)}.replaced-{time.strftime("%Y%m%d-%H%M%S")}'
  shutil.move(workdir, backup)
  return backup


class RunFiles:
  """Writes a run's config, status, metrics and TensorBoard scalars."""

  def __init__(self, workdir: str, *, is_writer: bool = True):
    self.workdir = workdir
    self.is_writer = is_writer  # only process 0 writes in multi-host runs
    self._tb = None
    if is_writer:
      os.makedirs(workdir, exist_ok=True)

  def _write_json(self, name: str, obj: Any) -> None:
    if not self.is_writer:
      return
    tmp = os.path.join(self.workdir, name + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(self.workdir, name))  # atomic: never half a file

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    self._write_json('config.json', config_to_dict(config))

  def write_description(self, description: Mapping[str, Any]) -> None:
    self._write_json('data.json', dict(description))

  def write_status(self, status: str, step: int, **extra: Any) -> None:
    assert status in STATUSES, status
    self._write_json('status.json', {'status': status, 'step': int(step),
                                     'time': time.time(),
                                     **{k: _jsonable(v) for k, v in extra.items()}})

  def truncate_metrics(self, after_step: int) -> None:
    """Drops lines past the resumed checkpoint (a killed run may have logged beyond it)."""
    path = os.path.join(self.workdir, 'metrics.jsonl')
    if not self.is_writer or not os.path.exists(path):
      return
    kept = []
    with open(path) as f:
      for line in f:
        try:
          if json.loads(line)['step'] <= after_step:
            kept.append(line if line.endswith('\n') else line + '\n')
        except (json.JSONDecodeError, KeyError):
          pass  # a line cut off by the kill
    with open(path + '.tmp', 'w') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)

  def write_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.is_writer:
      return
    row = {'step': int(step), **{k: _jsonable(float(v)) for k, v in metrics.items()}}
    with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
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
