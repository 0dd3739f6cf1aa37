"""Collections of training runs for analysis: runs, sweeps, metric curves.

The files themselves are read through `bn_research.rundir`, their one owner. Any of
them may be missing or half written while a run is starting or still going, so a
`Run` tolerates that: a cut-off or unreadable metrics line is skipped (rundir warns,
naming the file and line), a corrupt config or status file reads as unknown with a
warning that names the file and the fix. Only a path that cannot be a run at all is
an error, and that error names the path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any, Callable, Iterable, Optional

from bn_research import rundir


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
    lock: `rundir.lock_state` of the directory: 'held' while a live process runs in
      it, 'stale' if that process was killed, 'absent' if there is no lock file.
  """

  path: pathlib.Path
  config: dict[str, Any]
  metrics: list[dict[str, Any]]
  status: dict[str, Any] | None
  lock: str = 'absent'

  @property
  def name(self) -> str:
    """The directory name, used as a fallback label."""
    return self.path.name


def _tolerant(reader: Callable[[str], Optional[dict]], run_dir: pathlib.Path
              ) -> Optional[dict]:
  """A rundir reader's result, or None with a warning if the file is corrupt."""
  try:
    return reader(str(run_dir))
  except rundir.RunDirError as e:
    logging.warning('%s', e)
    return None


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
  if not rundir.is_run_dir(str(path)):
    raise NotARunDirError(
        f'{str(run_dir)!r} is not a run directory: expected a directory with any of '
        f'{rundir.CONFIG_FILE}, {rundir.METRICS_FILE}, {rundir.STATUS_FILE}, '
        f'{rundir.DESCRIPTION_FILE} or {rundir.CHECKPOINT_DIR}/'
        + ('' if path.is_dir() else ' (it does not exist or is not a directory)'))
  return Run(path=path, config=_tolerant(rundir.read_config, path) or {},
             metrics=rundir.read_metrics(str(path)),
             status=_tolerant(rundir.read_status, path),
             lock=rundir.lock_state(str(path)))


def sweep_run_dirs(sweep_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Lists the run directories of a sweep that have been started.

  Args:
    sweep_dir: A directory containing `sweep.json`.

  Returns:
    The started runs' directories in grid order; runs of the grid that have
    not started yet (no run files) are left out.

  Raises:
    RunDirError: If `sweep.json` is corrupt (naming it and the fix).
  """
  sweep_dir = pathlib.Path(sweep_dir)
  sweep = rundir.read_sweep(str(sweep_dir)) or {'runs': []}
  dirs = []
  for entry in sweep['runs']:
    name = entry.get('name') if isinstance(entry, dict) else None
    if not isinstance(name, str):
      raise rundir.RunDirError(
          f'{sweep_dir / rundir.SWEEP_FILE}: run entry {entry!r} has no name; delete the '
          'file and re-run the sweep command, which writes it again.')
    run_dir = sweep_dir / name
    if rundir.is_run_dir(str(run_dir)):
      dirs.append(run_dir)
    else:
      logging.info('Sweep run %s has not started yet; leaving it out.', run_dir)
  return dirs


def is_sweep_own_file(path: str | pathlib.Path) -> bool:
  """Whether `path` is one of a sweep's own files (sweep.json), not a run."""
  path = pathlib.Path(path)
  own = path.name in rundir.SWEEP_OWN_FILES or (
      path.name.startswith(rundir.SWEEP_FILE + '.') and path.name.endswith('.tmp'))
  return own and not path.is_dir() and rundir.is_sweep_dir(str(path.parent))


def expand_run_dirs(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
  """Turns run and sweep directories into a flat list of run directories.

  A shell glob over a sweep (`DIR/*`) works: the sweep's own files are skipped.

  Args:
    paths: Run directories and/or sweep directories (holding `sweep.json`).

  Returns:
    Run directories in the order given, each sweep expanded in grid order.

  Raises:
    NotARunDirError: Naming every path that is neither kind, or a sweep none
      of whose runs has started.
    RunDirError: A sweep's sweep.json is corrupt.
  """
  out, bad = [], []
  for p in paths:
    if rundir.is_sweep_dir(str(p)):
      runs = sweep_run_dirs(p)
      if not runs:
        raise NotARunDirError(f'sweep directory {str(p)!r} has no started runs')
      out.extend(runs)
    elif rundir.is_run_dir(str(p)):
      out.append(pathlib.Path(p))
    elif is_sweep_own_file(p):
      logging.info('Skipping %s: a file of the sweep, not a run.', p)
    else:
      bad.append(p)
  if len(bad) == 1:
    load_run(bad[0])  # Raises the error naming it.
  if bad:
    raise NotARunDirError(
        f'not run or sweep directories: {", ".join(repr(str(p)) for p in bad)}')
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
    "done", "running", "interrupted", "failed", "diverged at step N", "killed"
    (the status says running but no live process holds the run's lock: it was
    killed without clean-up, and the same command resumes it), or "unknown" when
    no readable status.json exists.
  """
  if run.status is None:
    return 'unknown'
  state = str(run.status.get('status', 'unknown'))
  if state == 'running' and run.lock != 'held':
    return 'killed'

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
