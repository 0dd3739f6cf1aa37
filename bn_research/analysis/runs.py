"""Reading training run directories written by `bn_research.main`.

A run directory holds `config.json`, `metrics.jsonl` and `status.json`. Any of
them may be missing or half written while the run is starting or still going,
so every reader here tolerates that: a truncated last metrics line is dropped,
an unreadable status file reads as unknown. Only a path that cannot be a run
at all is an error, and that error names the path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any, Iterable

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
STATUS_FILE = 'status.json'
SWEEP_FILE = 'sweep.json'

# Statuses after which a run will not change any more when relaunched.
FINISHED_STATUSES = ('done', 'diverged')


class NotARunDirError(ValueError):
  """Raised when a path given as a run (or sweep) directory is neither."""


@dataclasses.dataclass
class Run:
  """Everything read from one run directory.

  Attributes:
    path: The run directory.
    config: The resolved config as a nested dict ({} if not written yet).
    metrics: Logged records in file order, one dict per metrics line.
    status: The parsed status.json, or None if absent or unreadable.
  """

  path: pathlib.Path
  config: dict[str, Any]
  metrics: list[dict[str, Any]]
  status: dict[str, Any] | None

  @property
  def name(self) -> str:
    """The directory name, used as a fallback label."""
    return self.path.name


def is_run_dir(path: str | pathlib.Path) -> bool:
  """Returns whether `path` is a directory holding any run file."""
  path = pathlib.Path(path)
  return path.is_dir() and any(
      (path / f).is_file() for f in (CONFIG_FILE, METRICS_FILE, STATUS_FILE))


def is_sweep_dir(path: str | pathlib.Path) -> bool:
  """Returns whether `path` is a directory written by `scripts.sweep`."""
  return (pathlib.Path(path) / SWEEP_FILE).is_file()


def _read_json_file(path: pathlib.Path) -> Any | None:
  """Returns the parsed JSON file, or None if missing or not valid (yet)."""
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    # The engine may be rewriting the file at this very moment.
    logging.warning('Could not parse %s (%s); ignoring it.', path, e)
    return None


def read_status(run_dir: str | pathlib.Path) -> dict[str, Any] | None:
  """Reads `status.json` of a run.

  Args:
    run_dir: The run directory.

  Returns:
    The status dict, or None if the file is missing or unreadable.
  """
  status = _read_json_file(pathlib.Path(run_dir) / STATUS_FILE)
  return status if isinstance(status, dict) else None


def read_config(run_dir: str | pathlib.Path) -> dict[str, Any]:
  """Reads `config.json` of a run, {} if it is missing or unreadable."""
  config = _read_json_file(pathlib.Path(run_dir) / CONFIG_FILE)
  return config if isinstance(config, dict) else {}


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Reads `metrics.jsonl` of a run, skipping lines that do not parse.

  The last line of a run in progress may be cut off mid-write; it is dropped
  quietly. A bad line elsewhere is dropped with a warning rather than failing
  the whole comparison, since the other lines are still good data.

  Args:
    run_dir: The run directory.

  Returns:
    One dict per parsed line that has an integer `step`, in file order.
  """
  path = pathlib.Path(run_dir) / METRICS_FILE
  try:
    text = path.read_text()
  except FileNotFoundError:
    return []
  lines = text.split('\n')
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      # The final chunk (no newline after it yet) is an unfinished write.
      if i != len(lines) - 1:
        logging.warning('Skipping unparsable line %d of %s.', i + 1, path)
      continue
    if not isinstance(record, dict) or not _is_int(record.get('step')):
      logging.warning('Skipping line %d of %s: no integer step.', i + 1, path)
      continue
    records.append(record)
  return records


# The engine writes non-finite floats as these strings to keep the file
# strict JSON; Python's json also reads the bare NaN/Infinity tokens.
_NON_FINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf,
               'infinity': math.inf, '-infinity': -math.inf}


def as_number(value: Any) -> float | None:
  """Reads a metric value as a float, None if it is not a number.

  Args:
    value: A value from a metrics record.

  Returns:
    The float; "nan"/"inf"/"-inf" strings become the non-finite floats.
  """
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str):
    return _NON_FINITE.get(value.strip().lower())
  return None


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def load_run(run_dir: str | pathlib.Path) -> Run:
  """Loads one run directory.

  Args:
    run_dir: The run directory.

  Returns:
    The loaded run.

  Raises:
    NotARunDirError: If `run_dir` has none of the run files.
  """
  path = pathlib.Path(run_dir)
  if not is_run_dir(path):
    raise NotARunDirError(
        f'{str(run_dir)!r} is not a run directory: expected a directory with '
        f'{CONFIG_FILE}, {METRICS_FILE} or {STATUS_FILE}'
        + ('' if path.is_dir() else ' (it does not exist or is not a directory)'))
  return Run(path=path, config=read_config(path), metrics=read_metrics(path),
             status=read_status(path))


def sweep_run_dirs(sweep_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Lists the run directories of a sweep that have been started.

  Args:
    sweep_dir: A directory containing `sweep.json`.

  Returns:
    The started runs' directories in grid order; runs of the grid that have
    not started yet (no run files) are left out.

  Raises:
    NotARunDirError: If `sweep.json` is unreadable.
  """
  sweep_dir = pathlib.Path(sweep_dir)
  sweep = _read_json_file(sweep_dir / SWEEP_FILE)
  if not isinstance(sweep, dict) or not isinstance(sweep.get('runs'), list):
    raise NotARunDirError(f'{str(sweep_dir)!r} has an unreadable {SWEEP_FILE}')
  dirs = []
  for entry in sweep['runs']:
    run_dir = sweep_dir / entry['name']
    if is_run_dir(run_dir):
      dirs.append(run_dir)
    else:
      logging.info('Sweep run %s has not started yet; leaving it out.', run_dir)
  return dirs


def expand_run_dirs(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
  """Turns run and sweep directories into a flat list of run directories.

  Args:
    paths: Run directories and/or sweep directories (holding `sweep.json`).

  Returns:
    Run directories in the order given, each sweep expanded in grid order.

  Raises:
    NotARunDirError: Naming the first path that is neither kind, or a sweep
      none of whose runs has started.
  """
  out = []
  for p in paths:
    if is_sweep_dir(p):
      runs = sweep_run_dirs(p)
      if not runs:
        raise NotARunDirError(f'sweep directory {str(p)!r} has no started runs')
      out.extend(runs)
    elif is_run_dir(p):
      out.append(pathlib.Path(p))
    else:
      load_run(p)  # Raises the error naming `p`.
  return out


def metric_series(run: Run, metric: str) -> tuple[list[int], list[float]]:
  """Extracts one metric's curve from a run.

  A resumed run re-logs the steps between its last checkpoint and the
  interruption, so a step can appear more than once; the latest line wins
  because it belongs to the run that continued.

  Args:
    run: The loaded run.
    metric: Key in the metrics records, e.g. "eval_accuracy".

  Returns:
    (steps, values) sorted by step, with only records carrying a number.
  """
  by_step: dict[int, float] = {}
  for record in run.metrics:
    value = as_number(record.get(metric))
    if value is not None:
      by_step[record['step']] = value
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def status_label(run: Run) -> str:
  """Human-readable state of a run for tables and legends.

  Args:
    run: The loaded run.

  Returns:
    "done", "running", "failed", "diverged at step N", or "unknown" when no
    readable status.json exists.
  """
  if run.status is None:
    return 'unknown'
  state = str(run.status.get('status', 'unknown'))
  if state == 'diverged':
    step = run.status.get('diverged_step', run.status.get('step'))
    return f'diverged at step {step}' if step is not None else 'diverged'
  return state


def available_metrics(run: Run) -> list[str]:
  """Lists the numeric metric keys a run has logged, for error messages."""
  keys = set()
  for record in run.metrics:
    for k, v in record.items():
      if k != 'step' and as_number(v) is not None:
        keys.add(k)
  return sorted(keys)


def is_finite(value: float) -> bool:
  """Returns whether a metric value is a usable number (not NaN/inf)."""
  return not (math.isnan(value) or math.isinf(value))
