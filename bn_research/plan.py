"""A run plan: the runs to train, as data, and the one function that executes them.

Every way of starting training (a sweep, a figure, an ablation) reduces to a list of
`Run(name, workdir, config)` built from a config file and typed values, and one call:

    runs = plan.grid('configs/mnist_mlp.py:bn', 'runs/lr',
                     {'optimizer.learning_rate': [0.1, 0.5]})
    outcomes = plan.run_plan(runs, how='processes', parallel=2)

How it executes is a backend chosen once (`HOWS`):
  inline     one run after another in this process (`train.train_and_evaluate`);
  vmap       the runs of each group (`vmap_groups`) as the members of one compiled
             program (`train.train_members`); with `parallel` > 1 each group in its
             own `python -m scripts.sweep --vmap` process, `parallel` at once;
  processes  one `python -m bn_research.main` per run, `parallel` at once, each pinned
             to its share of the CPU cores (`launch.run_jobs`);
  print      the shell commands of the unfinished runs, one a line, for a queue.
Values stay Python values until a process or print backend writes them as
`--config.KEY=VALUE` overrides, in one place (`command`). Finished runs (status done or
diverged) are skipped by every backend, so re-running a plan resumes it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shlex
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import ml_collections

from bn_research import launch
from bn_research import rundir
# The console's view of a plan, re-exported: plan.progress_line etc. keep working.
from bn_research.plan_report import label, print_progress, progress_line, results_table  # pylint: disable=unused-import

# One SweepError for the plan and the engine (defined in the engine's package, without JAX).
from bn_research.engine import SweepError

HOWS = ('inline', 'vmap', 'processes', 'print')


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a plan.

  Attributes:
    name: names the run in logs and tables (and its log file, `<parent>/<name>.log`).
    workdir: its run directory.
    config: the resolved, validated config it trains with.
    spec: the config file it was loaded from, `configs/x.py[:arg]` (what a process
      backend passes to `--config`).
    overrides: typed (key, value) pairs set on top of `spec`, in order.
    params: the keys of `overrides` that vary across the plan (a sweep's grid point).
  """

  name: str
  workdir: str
  config: ml_collections.ConfigDict
  spec: str = ''
  overrides: tuple[tuple[str, Any], ...] = ()
  params: tuple[tuple[str, Any], ...] = ()


# ---------------------------------------------------------------- building


def format_value(value: Any) -> str:
  """A typed value as the text after `--config.KEY=` (the one formatter).

  Bools in absl's lower case; ints and floats by `repr` (shortest round trip); strings
  as they are; tuples and lists of those as Python literals.

  Raises:
    SweepError: a value no override could express (objects, functions).
  """
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if value is None or isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)) and all(
      v is None or isinstance(v, (bool, int, float, str)) for v in value):
    return repr(type(value)(value))
  raise SweepError(f'value {value!r} of type {type(value).__name__} cannot be written as '
                   'a --config override; use numbers, bools, strings, None, or '
                   'tuples/lists of them')


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted key, typed as the field is; ValueError naming `key=value` otherwise."""
  *path, last = key.split('.')
  node = config
  try:
    for part in path:
      node = node[part]
    current = node[last]
  except (KeyError, AttributeError, TypeError):
    raise SweepError(f'{key}={value!r}: no such config key; check its spelling') from None
  if isinstance(current, str) and not isinstance(value, str):
    value = format_value(value)  # e.g. compiler_options given as a number-like text
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(value, bool) and not isinstance(current, bool):
    raise SweepError(f'{key}={value!r} is invalid: a bool where the default is {current!r}.')
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    try:
      value = float(value)
    except OverflowError:
      raise SweepError(f'{key}={value!r} is invalid: too large for a float.') from None
  if current is not None and not isinstance(value, type(current)):
    raise SweepError(f'{key}={value!r} is invalid: must be of type '
                     f'{type(current).__name__}, like the default {current!r}.')
  try:
    node[last] = value
  except (TypeError, ValueError) as e:
    raise SweepError(f'{key}={value!r} is invalid: {e}') from None


def load(spec: str, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()
         ) -> ml_collections.ConfigDict:
  """The config of `spec` with typed `overrides` set, validated (checks.py specs).

  Raises:
    ValueError: one line naming the spec, key or value at fault.
  """
  from bn_research import config as config_lib  # pylint: disable=g-import-not-at-top
  from bn_research import config_files  # pylint: disable=g-import-not-at-top
  config = config_files.load_config(spec)
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for key, value in items:
    set_value(config, key, value)
  config_lib.validate_config(config)
  return config


def make_run(name: str, workdir: str, spec: str,
             overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
             params: Sequence[str] = ()) -> Run:
  """A validated run: `spec` with typed `overrides`; `params` names the varied keys."""
  pairs = tuple(overrides.items() if isinstance(overrides, Mapping) else overrides)
  for _, value in pairs:
    format_value(value)  # refused now, not when a process backend needs the text
  values = dict(pairs)
  return Run(name, str(workdir), load(spec, pairs), spec, pairs,
             tuple((k, values[k]) for k in params))


def expand_grid(sweep: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """The grid points of a sweep, the first key varying slowest ({} has one point)."""
  keys = list(sweep)
  return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


# Keys a config may ignore: (key, why it changes nothing here, or None). A swept key
# that changes nothing would train identical runs without a word.
_NO_EFFECT: dict[str, Callable[[ml_collections.ConfigDict], Optional[str]]] = {
    'optimizer.momentum': lambda c: (
        None if c.optimizer.name == 'momentum'
        else f"optimizer.name={c.optimizer.name!r} has no momentum (use 'momentum')"),
    'optimizer.nesterov': lambda c: (
        None if c.optimizer.name == 'momentum'
        else f"optimizer.name={c.optimizer.name!r} has no momentum (use 'momentum')"),
    'optimizer.decay_steps': lambda c: (
        None if c.optimizer.decay_rate != 1
        else 'optimizer.decay_rate=1 keeps the learning rate constant'),
    'optimizer.staircase': lambda c: (
        None if c.optimizer.decay_rate != 1
        else 'optimizer.decay_rate=1 keeps the learning rate constant'),
    'optimizer.decay_rate': lambda c: (
        None if not (c.optimizer.staircase
                     and c.optimizer.decay_steps >= c.num_train_steps)
        else f'with staircase decay every {c.optimizer.decay_steps} steps, the '
             f'{c.num_train_steps} training steps never decay'),
    'optimizer.regularize_batch_norm': lambda c: (
        None if c.optimizer.weight_decay != 0 else 'optimizer.weight_decay=0'),
    'model.bn_momentum': lambda c: (
        None if c.model.normalizer != 'none' else "model.normalizer='none'"),
    'model.init_stddev': lambda c: (
        None if c.model.name == 'mlp'
        else f'it is read only by the MLP, not by model.name={c.model.name!r}'),
}


def check_effective(runs: Sequence[Run]) -> None:
  """SweepError naming a varied key that no run's config reads (see `_NO_EFFECT`)."""
  varied = {k for run in runs for k, _ in run.params}
  for key in varied:
    rule = _NO_EFFECT.get(key)
    reasons = [rule(run.config) for run in runs] if rule else [None]
    if all(reasons):
      raise SweepError(f'sweeping {key} changes nothing in this configuration: '
                       f'{reasons[0]}.')


def grid(spec: str, sweep_dir: str, sweep: Mapping[str, Sequence[Any]],
         overrides: Mapping[str, Any] = (), *,
         name: Callable[[Mapping[str, Any]], str] | None = None) -> list[Run]:
  """One run per grid point of `sweep` over `spec` plus common typed `overrides`.

  Every value of every point is set and validated with its key's spec before any run
  is returned, so nothing is written or launched for a sweep with one bad value.

  Args:
    spec: `configs/x.py[:arg]`.
    sweep_dir: runs go into `sweep_dir/<name>`.
    sweep: key -> values (typed), first key slowest.
    overrides: key -> value common to every run; may not set a swept key.
    name: a point's run name; default `sweep.run_name` (`key=value,...`).

  Raises:
    SweepError / ValueError: one line naming the key and value at fault.
  """
  from bn_research import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  common = dict(overrides)
  both = [k for k in sweep if k in common]
  if both:
    raise SweepError(f'{both[0]} is both swept and set for every run; give it once')
  name = name or sweep_lib.run_name
  runs, names = [], set()
  for point in expand_grid(sweep):
    run_name = name(point)
    if run_name in names:
      raise SweepError(f'two grid points share the run name {run_name!r}')
    names.add(run_name)
    runs.append(make_run(run_name, os.path.join(sweep_dir, run_name), spec,
                         {**common, **point}, params=list(point)))
  check_effective(runs)
  return runs


def check_names(runs: Sequence[Run]) -> None:
  """SweepError if two runs share a workdir or a log file (one would overwrite the
  other); names need only differ between runs of one directory."""
  for what, key in (('workdir', lambda r: os.path.abspath(r.workdir)),
                    ('name and directory', log_path)):
    seen = set()
    for run in runs:
      if key(run) in seen:
        raise SweepError(f'two runs share the {what} {key(run)!r}')
      seen.add(key(run))


def vmap_groups(runs: Sequence[Run]) -> list[list[Run]]:
  """The runs that train as one program each (how='vmap'): same config file and the
  same values but for the keys they vary; in plan order. SweepError for keys that
  change the program's structure (`train.SWEEPABLE` says which can be vmapped)."""
  from bn_research import train  # pylint: disable=g-import-not-at-top
  groups: dict[Any, list[Run]] = {}
  for run in runs:
    varied = {k for k, _ in run.params}
    fixed = tuple((k, repr(v)) for k, v in run.overrides if k not in varied)
    groups.setdefault((run.spec, fixed, tuple(sorted(varied))), []).append(run)
  for group in groups.values():
    try:
      train.check_sweepable(group[0].config, sorted({k for r in group for k, _ in r.params}))
    except ValueError as e:
      raise SweepError(str(e)) from None
  return list(groups.values())


# ---------------------------------------------------------------- executing


def command(run: Run, python: str = sys.executable, *, overwrite: bool = False) -> list[str]:
  """The argv training `run` in its own process: the only place values become text."""
  if not run.spec:
    raise SweepError(f'run {run.name!r} has no config file to pass to a process; '
                     "use how='inline' or 'vmap'")
  return ([python, '-m', 'bn_research.main', f'--config={run.spec}',
           f'--workdir={run.workdir}']
          + [f'--config.{k}={format_value(v)}' for k, v in run.overrides]
          + (['--overwrite'] if overwrite else []))


def group_command(group: Sequence[Run], python: str = sys.executable) -> list[str]:
  """The argv training a vmap group (`vmap_groups`) as one program in its own process:
  the sweep of its varied keys, in the directory that holds its runs.

  Raises:
    SweepError: the group is not a whole grid of default-named runs in one directory
      (what `scripts.sweep` would train there).
  """
  from bn_research import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  parent = {os.path.dirname(os.path.abspath(r.workdir)) for r in group}
  grid_ = {k: list(dict.fromkeys(dict(r.params)[k] for r in group)) for k, _ in group[0].params}
  named = all(os.path.basename(r.workdir) == sweep_lib.run_name(dict(r.params)) for r in group)
  if len(parent) != 1 or not named or len(expand_grid(grid_)) != len(group):
    raise SweepError(f'the runs of {group[0].name!r} are not one whole grid in one '
                     'directory; train them with parallel=1')
  varied = set(grid_)
  return ([python, '-m', 'scripts.sweep', f'--config={group[0].spec}',
           f'--workdir={parent.pop()}', '--vmap']
          + [f'--sweep={k}=' + ','.join(format_value(v) for v in values)
             for k, values in grid_.items()]
          + [f'--config.{k}={format_value(v)}' for k, v in group[0].overrides
             if k not in varied])


def status_of(run: Run) -> str:
  """The status in the run's status.json, 'new' without one, 'unreadable' if corrupt."""
  try:
    status = rundir.read_status(run.workdir)
  except rundir.RunDirError:
    return 'unreadable'  # the run itself then names the file and the fix
  return 'new' if status is None else str(status.get('status', 'unknown'))


@dataclasses.dataclass
class Outcome:
  """How one run of a plan ended.

  Attributes:
    name: the run's name.
    status: its status.json status afterwards ('new': never started, e.g. printed).
    skipped: it was already finished, so nothing ran.
    returncode: the process's exit code (process backends), else 0.
  """

  name: str
  status: str
  skipped: bool = False
  returncode: int = 0


def log_path(run: Run) -> str:
  """Where a process backend sends a run's output: beside its workdir, `<name>.log`."""
  return os.path.join(os.path.dirname(os.path.abspath(run.workdir)), f'{run.name}.log')


def run_plan(runs: Sequence[Run], how: str = 'inline', *, parallel: int = 1,
             pin_cores: bool = True, python: str = sys.executable, overwrite: bool = False,
             progress: Optional[Callable[[Sequence[Run]], None]] = None,
             out: Callable[[str], None] = print) -> list[Outcome]:
  """Trains the unfinished runs of a plan with one backend (see the module docstring).

  Args:
    runs: the plan.
    how: one of HOWS.
    parallel: processes at once (how='processes').
    pin_cores: pin each process to its share of the cores (how='processes').
    python: interpreter of the process and print backends.
    overwrite: passed to every run (a workdir of another config is moved aside).
    progress: called every few seconds with the runs being trained (process backend).
    out: where the print backend writes its commands.

  Returns:
    One outcome per run, in order.

  Raises:
    SweepError: a bad backend or plan, before anything runs.
    launch.Interrupted: SIGTERM/SIGINT; every started run saved its state first.
  """
  if how not in HOWS:
    raise SweepError(f'how={how!r} is invalid: must be one of {", ".join(HOWS)}.')
  try:
    launch.check_parallel(parallel)
  except ValueError as e:
    raise SweepError(str(e)) from None
  check_names(runs)
  states = [status_of(run) for run in runs]
  codes: dict[str, int] = {}
  todo = [run for run, s in zip(runs, states) if s not in rundir.FINISHED_STATUSES]
  if how == 'print':
    for run in todo:
      out(shlex.join(command(run, python, overwrite=overwrite)))
  else:
    # The plan owns its layout: a sweep's or a job's directory above each run.
    for run in todo:
      os.makedirs(os.path.dirname(os.path.abspath(run.workdir)), exist_ok=True)
  if how == 'processes':
    codes = _run_processes(todo, parallel, pin_cores, python, overwrite, progress)
  elif how == 'vmap' and parallel > 1 and todo:
    codes = _run_group_processes(todo, parallel, pin_cores, python, overwrite, progress)
  elif how in ('inline', 'vmap') and todo:
    _run_in_process(todo, vmapped=how == 'vmap', overwrite=overwrite)
  return [Outcome(run.name, status_of(run), skipped=s in rundir.FINISHED_STATUSES,
                  returncode=codes.get(run.workdir, 0))
          for run, s in zip(runs, states)]


def _run_processes(todo: Sequence[Run], parallel: int, pin_cores: bool, python: str,
                   overwrite: bool, progress) -> dict[str, int]:
  """{workdir: exit code} of the runs, each in its own `bn_research.main` process."""
  by_label = {label(run, todo): run for run in todo}
  jobs = [launch.Job(name, command(run, python, overwrite=overwrite), log=log_path(run))
          for name, run in by_label.items()]

  def on_poll(names: Sequence[str]) -> None:
    if progress is not None:
      progress([by_label[n] for n in names])

  results = launch.run_jobs(jobs, parallel=parallel, pin_cores=pin_cores and parallel > 1,
                            single_thread=parallel > 1, on_poll=on_poll)
  return {by_label[r.name].workdir: r.returncode for r in results}


def _run_group_processes(todo: Sequence[Run], parallel: int, pin_cores: bool, python: str,
                         overwrite: bool, progress) -> dict[str, int]:
  """{workdir: exit code} of the runs, each vmap group in its own sweep process."""
  if overwrite:
    raise SweepError('overwrite moves run directories aside one run at a time; with '
                     'vmap groups in processes it is not available: use parallel=1')
  groups = {os.path.basename(os.path.dirname(os.path.abspath(g[0].workdir))): g
            for g in vmap_groups(todo)}
  if len(groups) != len(vmap_groups(todo)):
    raise SweepError('two vmap groups share a directory name; train them with parallel=1')
  jobs = [launch.Job(name, group_command(group, python),
                     log=os.path.join(os.path.dirname(os.path.abspath(group[0].workdir))
                                      + '.log'))
          for name, group in groups.items()]

  def on_poll(names: Sequence[str]) -> None:
    if progress is not None:
      progress([run for n in names for run in groups[n]])

  results = launch.run_jobs(jobs, parallel=parallel, pin_cores=pin_cores,
                            single_thread=True, on_poll=on_poll)
  return {run.workdir: r.returncode for r in results for run in groups[r.name]}


def _run_in_process(todo: Sequence[Run], *, vmapped: bool, overwrite: bool) -> None:
  from bn_research import train  # pylint: disable=g-import-not-at-top
  try:
    if vmapped:
      for group in vmap_groups(todo):
        train.train_members(group[0].config,
                            [(run.workdir, dict(run.params)) for run in group],
                            overwrite=overwrite)
    else:
      for run in todo:
        train.train_and_evaluate(run.config, run.workdir, overwrite=overwrite)
  except train.Interrupted as e:
    raise launch.Interrupted(e.signum, f'{e}; the same command resumes') from None
