r"""The paper's remaining claims, each a job with committed results.

    python -m experiments.claims --claim=init --workdir=runs/claims
    python -m experiments.claims --claim=dropout --workdir=runs/claims --steps=1500 --seeds=3

Claims (`--claim`), each a module of three functions, `plan(args) -> [Run]`,
`summarize(runs, args) -> dict`, `plot(summary) -> Figure` (and `table(summary)`, the
markdown rows):

* `dropout` (experiments/dropout_need.py): Section 3.4, "reduces the need for dropout";
* `init` (experiments/init_sensitivity.py): "less careful about initialisation";
* `stats_gradient` (experiments/stats_gradient.py): Section 2, normalising outside the
  gradient step;
* `jacobians` (experiments/jacobians.py): Section 3.3, the layer Jacobians' singular
  values;
* `saturation` (experiments/saturation.py): the sigmoids' saturated regime.

This driver owns the flags, the execution and the files: runs whose configs differ
only in keys a vmapped program can take per member (`train.SWEEPABLE`: seed, init
stddev, dropout rate, ...) train as the members of one program; the others one after
another. Every run has its own directory DIR/<claim>/<run>; the job's summary goes to
DIR/<claim>/<claim>.json, .md (with the command, date and machine) and .png. Every
config is validated before anything is written; bad flags are one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import shlex
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import app
from absl import flags
import ml_collections

from experiments import cli

CLAIMS = {
    'dropout': 'experiments.dropout_need',
    'init': 'experiments.init_sensitivity',
    'stats_gradient': 'experiments.stats_gradient',
    'jacobians': 'experiments.jacobians',
    'saturation': 'experiments.saturation',
}
# --data for the MLP jobs: the offline 5,000-image MNIST sample (the same everywhere),
# Debian's Fashion-MNIST IDX files, or stand-in data for tests.
MLP_DATA = ('mnist', 'fashion_mnist', 'synthetic')
MACHINE = f'{os.cpu_count()}-core CPU'


@dataclasses.dataclass(frozen=True)
class Args:
  """A job's arguments; None: the job's own default."""
  claim: str
  workdir: str
  steps: Optional[int] = None
  seeds: Optional[int] = None
  stddevs: Optional[tuple[float, ...]] = None
  dropout_rates: Optional[tuple[float, ...]] = None
  data: Optional[str] = None
  eval_every: Optional[int] = None
  overrides: tuple[str, ...] = ()
  overwrite: bool = False
  machine: str = MACHINE


@dataclasses.dataclass
class Run:
  """One planned training run: its directory name under the job's and its config."""
  name: str
  config: ml_collections.ConfigDict


def job_module(claim: str):
  if claim not in CLAIMS:
    raise ValueError(f'--claim={claim!r}; allowed: {", ".join(CLAIMS)}.')
  return importlib.import_module(CLAIMS[claim])


# ---- what jobs share ----------------------------------------------------------------

def mlp_config(network: str, *, steps: int, eval_every: int, data: str = 'mnist',
               seed: int = 0) -> ml_collections.ConfigDict:
  """The Figure 1 MLP (`configs/mnist_mlp.py`), 'bn' or 'baseline', for `steps` steps
  with an evaluation (and measurement, where a job turns one on) every `eval_every`."""
  from configs import mnist_mlp  # pylint: disable=g-import-not-at-top
  if data not in MLP_DATA:
    raise ValueError(f'--data={data!r}; allowed: {", ".join(MLP_DATA)}.')
  source = {'mnist': 'offline', 'fashion_mnist': 'idx', 'synthetic': 'synthetic'}[data]
  c = mnist_mlp.get_config(f'{network},source={source},seed={seed}')
  if data == 'fashion_mnist':
    c.data.name = 'fashion_mnist'
  c.num_train_steps = steps
  c.eval_every_steps = c.log_every_steps = c.steps_per_dispatch = eval_every
  c.checkpoint_every_steps = steps
  c.measure.every_steps = eval_every
  c.measure.ics = c.measure.landscape = False
  return c


def finish_plan(runs: Sequence[Run], args: Args) -> list[Run]:
  """Applies --set to every run and validates it (ValueError names the bad value)."""
  from bn_research import config as config_lib  # pylint: disable=g-import-not-at-top
  for r in runs:
    for assignment in args.overrides:
      cli.apply_override(r.config, assignment)
    config_lib.validate_config(r.config)
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'two runs share a name in {names}.')
  return list(runs)


def vmap_groups(runs: Sequence[Run]) -> list[tuple[list[Run], list[str]]]:
  """Runs that differ only in vmappable keys, grouped (in plan order), with those keys."""
  from bn_research import rundir  # pylint: disable=g-import-not-at-top
  from bn_research import train  # pylint: disable=g-import-not-at-top
  flat = [rundir.flatten(rundir.config_to_dict(r.config)) for r in runs]
  groups: list[tuple[list[Run], list[dict]]] = []
  for r, f in zip(runs, flat):
    rest = {k: v for k, v in f.items() if k not in train.SWEEPABLE}
    for members, flats in groups:
      if {k: v for k, v in flats[0].items() if k not in train.SWEEPABLE} == rest:
        members.append(r)
        flats.append(f)
        break
    else:
      groups.append(([r], [f]))
  out = []
  for members, flats in groups:
    keys = sorted(k for k in train.SWEEPABLE if len({repr(f.get(k)) for f in flats}) > 1)
    out.append((members, keys))
  return out


def execute(runs: Sequence[Run], root: str, *, overwrite: bool = False) -> None:
  """Trains every run (finished ones are skipped, unfinished ones resume)."""
  from bn_research import train  # pylint: disable=g-import-not-at-top
  from bn_research.engine import state as state_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(root, exist_ok=True)
  for members, keys in vmap_groups(runs):
    workdirs = [os.path.join(root, r.name) for r in members]
    if len(members) == 1:
      train.train_and_evaluate(members[0].config, workdirs[0], overwrite=overwrite)
      continue
    points = [(w, {k: state_lib.member_value(r.config, k) for k in keys})
              for w, r in zip(workdirs, members)]
    train.train_members(members[0].config, points, overwrite=overwrite)


def _is_finished(run_dir: str) -> bool:
  """Whether a run directory holds a run that ended (done or diverged): re-running the
  job skips it, so the wall time does not include its training."""
  try:
    with open(os.path.join(run_dir, 'status.json')) as f:
      return json.load(f).get('status') in ('done', 'diverged')
  except (OSError, ValueError):
    return False


def load(runs: Sequence[Run], root: str) -> dict:
  """{run name: analysis.runs.Run} of the job's run directories."""
  from bn_research.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  return {r.name: runs_lib.load_run(os.path.join(root, r.name)) for r in runs}


def series(run, metric: str) -> list[list[float]]:
  """[[step, value], ...] of one metric of a loaded run."""
  from bn_research.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  return [list(p) for p in zip(*runs_lib.metric_series(run, metric))]


def status(run) -> str:
  from bn_research.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  return runs_lib.status_label(run)


def verdict_row(claim: str, paper: str, here: str, holds: Optional[bool]) -> dict:
  """One row of a job's claims table; holds None: could not be judged (say why)."""
  return {'claim': claim, 'paper': paper, 'here': here,
          'verdict': {True: 'holds', False: 'does not hold', None: 'not judged'}[holds]}


def fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return 'never'
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value)


def markdown(title: str, summary: Mapping[str, Any], rows: Sequence[str], *, command: str,
             machine: str) -> str:
  """The job's .md: what ran where, its table, the claims table."""
  lines = [f'# {title}', '',
           f'Command: `{command}`  ', f'Date: {summary["date"]}  ', f'Machine: {machine}  ',
           f'Wall time: {summary.get("wall_seconds", "?")} s (runs trained by this command: '
           f'{summary.get("runs_trained", "?")} of {summary.get("runs_total", "?")})', '',
           *rows, '',
           '| the paper\'s claim | paper | here | verdict |', '|---|---|---|---|']
  for c in summary['claims']:
    lines.append(f'| {c["claim"]} | {c["paper"]} | {c["here"]} | {c["verdict"]} |')
  return '\n'.join(lines) + '\n'


# ---- the driver ---------------------------------------------------------------------

def run_job(args: Args, *, command: str = '') -> dict:
  """Plans, trains, summarises and writes DIR/<claim>/<claim>.{json,md,png}."""
  import time  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  job = job_module(args.claim)
  runs = job.plan(args)
  root = os.path.join(args.workdir, args.claim)
  cli.quiet_library_logs()
  finished = sum(_is_finished(os.path.join(root, r.name)) for r in runs)
  execute(runs, root, overwrite=args.overwrite)
  summary = job.summarize(load(runs, root), args)
  summary.update(claim=args.claim, command=command, machine=args.machine,
                 date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                 wall_seconds=round(time.time() - t0, 1),
                 runs_trained=len(runs) - (0 if args.overwrite else finished),
                 runs_total=len(runs))
  with open(os.path.join(root, f'{args.claim}.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(root, f'{args.claim}.md'), 'w') as f:
    f.write(markdown(job.TITLE, summary, job.table(summary), command=command,
                     machine=args.machine))
  fig = job.plot(summary)
  fig.savefig(os.path.join(root, f'{args.claim}.png'), dpi=110)
  return summary


def _define_flags() -> None:
  flags.DEFINE_string('claim', None, f'One of {", ".join(CLAIMS)}.')
  flags.DEFINE_string('workdir', None, 'Output directory (the job writes DIR/<claim>/).')
  flags.DEFINE_integer('steps', None, "Training steps per run (default: the job's).")
  flags.DEFINE_integer('seeds', None, "Seeds per configuration (default: the job's).")
  flags.DEFINE_list('stddevs', None, 'init: the init stddevs (> 0).')
  flags.DEFINE_list('dropout_rates', None, 'dropout: the rates, each in [0, 1).')
  flags.DEFINE_string('data', None, f'MLP jobs: {", ".join(MLP_DATA)} (saturation runs '
                      'mnist and fashion_mnist unless given); dropout: fashion_mnist, '
                      'digits or synthetic.')
  flags.DEFINE_integer('eval_every', None, 'Steps between evaluations and measurements.')
  flags.DEFINE_multi_string('set', [], 'Config override for every run, e.g. '
                            '--set=optimizer.learning_rate=0.5 (repeatable).')
  flags.DEFINE_bool('overwrite', False, 'Passed on to every run.')
  flags.DEFINE_string('machine', MACHINE, 'What the .md says the runs ran on.')


def _floats(flag: str, values: Optional[Sequence[str]]) -> Optional[tuple[float, ...]]:
  if values is None:
    return None
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise ValueError(f'--{flag}={",".join(values)!r}: not a list of numbers.') from None


def parse_args(values: Mapping[str, Any]) -> Args:
  """The flags -> Args, checked; ValueError naming the first bad flag. The job's plan
  (every config validated) is built too, so nothing starts on a bad value."""
  from bn_research import launch  # pylint: disable=g-import-not-at-top
  if not values.get('claim'):
    raise ValueError(f'--claim is required; allowed: {", ".join(CLAIMS)}.')
  job = job_module(values['claim'])
  cli.check_workdir(values.get('workdir'))
  for flag in ('steps', 'seeds', 'eval_every'):
    launch.check_positive_flag(flag, values.get(flag))
  stddevs = _floats('stddevs', values.get('stddevs'))
  if stddevs is not None and not (stddevs and all(s > 0 for s in stddevs)):
    raise ValueError(f'--stddevs={",".join(values["stddevs"])!r}: every init stddev must '
                     'be > 0.')
  rates = _floats('dropout_rates', values.get('dropout_rates'))
  if rates is not None and not (rates and all(0 <= r < 1 for r in rates)):
    raise ValueError(f'--dropout_rates={",".join(values["dropout_rates"])!r}: every rate '
                     'must be in [0, 1).')
  args = Args(claim=values['claim'], workdir=values['workdir'], steps=values.get('steps'),
              seeds=values.get('seeds'), stddevs=stddevs, dropout_rates=rates,
              data=values.get('data'), eval_every=values.get('eval_every'),
              overrides=tuple(values.get('set') or ()),
              overwrite=bool(values.get('overwrite')),
              machine=values.get('machine') or MACHINE)
  job.plan(args)
  return args


def main(argv: Sequence[str]) -> None:
  names = ('claim', 'workdir', 'steps', 'seeds', 'stddevs', 'dropout_rates', 'data',
           'eval_every', 'set', 'overwrite', 'machine')
  args = cli.parse_or_exit('claims', argv,
                           lambda: parse_args({n: flags.FLAGS[n].value for n in names}))
  command = 'python -m experiments.claims ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
  summary = run_job(args, command=command)
  for c in summary['claims']:
    print(f'{c["verdict"]:>14}: {c["claim"]} ({c["here"]})')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
