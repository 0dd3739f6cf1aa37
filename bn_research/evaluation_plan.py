"""What `bn_research.evaluate` evaluates: finished runs, checked, and the plan of an
evaluation (runs, crop schemes, BN statistics, ensemble), all before anything is
compiled. Bad input is a ValueError of one line naming the flag or run."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from bn_research.crops import View, parse_scheme

# Data keys that change training only (its order, augmentation, speed, where the files
# are), not the held-out set an ensemble's members must share.
TRAINING_ONLY_DATA_KEYS = ('shuffle', 'distortions', 'num_workers', 'prefetch', 'data_dir',
                           'download_url', 'download_timeout')


def _tuples(value: Any) -> Any:
  """JSON's lists back to the tuples config files hold."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def config_from_json(config: dict):
  """A run's config.json as a ConfigDict the engine's builders read."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(_tuples(config))


@dataclasses.dataclass
class RunToEvaluate:
  """A finished run: its directory, config and status."""
  workdir: str
  config: Any
  status: dict


def check_run(workdir: str) -> RunToEvaluate:
  """The run at `workdir`, or a one-line ValueError saying why it cannot be evaluated."""
  from bn_research import rundir  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir!r} is not a directory; allowed: a run directory.')
  config = rundir.read_config(workdir)
  if config is None:
    raise ValueError(f'--workdir={workdir!r} has no {rundir.CONFIG_FILE}: not a run '
                     'directory (a sweep directory holds one per run).')
  if not rundir.checkpoint_steps(workdir):
    raise ValueError(f'--workdir={workdir!r} has no checkpoint in '
                     f'{rundir.CHECKPOINT_DIR}/; allowed: a run that trained and saved one.')
  status = rundir.read_status(workdir) or {}
  if status.get('status') not in rundir.FINISHED_STATUSES:
    raise ValueError(f'--workdir={workdir!r} is not finished (status '
                     f'{status.get("status", "missing")!r}); allowed: '
                     f'{" or ".join(rundir.FINISHED_STATUSES)} (re-run its command to finish it).')
  return RunToEvaluate(workdir, config_from_json(config), status)


def _eval_set(config) -> dict:
  data = {k: v for k, v in config.data.to_dict().items() if k not in TRAINING_ONLY_DATA_KEYS}
  return {'data': data, 'num_eval_examples': config.num_eval_examples}


def check_ensemble(runs: Sequence[RunToEvaluate]) -> None:
  """An ensemble's members must be the same network on the same held-out set.

  Their hyperparameters may differ (the paper's ensemble members differ in initial
  weights, dropout and BN variant), not the model, the data or its classes.

  Raises:
    ValueError: one line naming the two runs and the first key that differs.
  """
  if len(runs) < 2:
    raise ValueError(f'--ensemble needs 2 or more --workdir, got {len(runs)}.')
  first = runs[0]
  for run in runs[1:]:
    if run.config.model.name != first.config.model.name:
      raise ValueError(f'--ensemble: {run.workdir!r} is model.name={run.config.model.name!r}, '
                       f'{first.workdir!r} is {first.config.model.name!r}; allowed: the same '
                       'network in every member.')
    a, b = _eval_set(first.config), _eval_set(run.config)
    from bn_research import rundir  # pylint: disable=g-import-not-at-top
    a, b = rundir.flatten(a), rundir.flatten(b)
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        raise ValueError(f'--ensemble: {run.workdir!r} has {key}={b.get(key)!r}, '
                         f'{first.workdir!r} has {a.get(key)!r}; allowed: members evaluated '
                         'on the same data, classes and held-out set.')


@dataclasses.dataclass
class Plan:
  """What to evaluate, checked: runs, crop schemes and their views, statistics."""
  runs: list[RunToEvaluate]
  schemes: dict[str, list[View]]
  batch_stats: str
  population_batches: Optional[int]
  num_eval_examples: Optional[int]
  ensemble: bool


def make_plan(workdirs: Sequence[str], *, crops: Sequence[str], batch_stats: str = 'run',
              population_batches: Optional[int] = None,
              num_eval_examples: Optional[int] = None, ensemble: bool = False) -> Plan:
  """Checks everything that can be checked without compiling; ValueError on bad input."""
  if not workdirs:
    raise ValueError('--workdir is required: give one or more finished run directories.')
  if len(set(map(os.path.abspath, workdirs))) < len(workdirs):
    raise ValueError(f'--workdir: a run is given twice in {list(workdirs)}.')
  if population_batches is not None and population_batches < 1:
    raise ValueError(f'--population_batches={population_batches}; allowed: an integer >= 1.')
  if num_eval_examples is not None and num_eval_examples < 0:
    raise ValueError(f'--num_eval_examples={num_eval_examples}; allowed: 0 (all) or more.')
  if not crops:
    raise ValueError('--crops is empty; allowed: center, flip, multi:N.')
  runs = [check_run(w) for w in workdirs]
  if ensemble:
    check_ensemble(runs)
  schemes = {text: parse_scheme(text) for text in crops}
  return Plan(runs, schemes, batch_stats, population_batches, num_eval_examples, ensemble)
