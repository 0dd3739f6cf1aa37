r"""The paper's remaining claims, each a job of the experiment driver, and what they share.

    python -m experiments.claims --claim=init --workdir=runs/claims/init
    python -m experiments.init_sensitivity --workdir=runs/claims/init      (the same)

Claims (`--claim`), each a job module (`bn_research.experiment`: plan, summarize,
table, plot):

* `dropout` (experiments/dropout_need.py): Section 3.4, "reduces the need for dropout";
* `init` (experiments/init_sensitivity.py): "less careful about initialisation";
* `stats_gradient` (experiments/stats_gradient.py): Section 2, normalising outside the
  gradient step;
* `jacobians` (experiments/jacobians.py): Section 3.3, the layer Jacobians' singular
  values;
* `saturation` (experiments/saturation.py): the sigmoids' saturated regime.

`--claim=NAME` picks the job; every other flag is the job's (see `--help` of the job
module). Each job judges its claim with a stated rule: `summary['claims']` holds rows
{claim, paper, here, verdict}, verdict 'holds', 'does not hold' or 'not judged'.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Mapping, Optional, Sequence

from bn_research import checks
from bn_research import experiment
from bn_research import plan as plan_lib

CLAIMS = {
    'dropout': 'experiments.dropout_need',
    'init': 'experiments.init_sensitivity',
    'stats_gradient': 'experiments.stats_gradient',
    'jacobians': 'experiments.jacobians',
    'saturation': 'experiments.saturation',
}
# --data of the MLP jobs -> configs/mnist_mlp.py's source (and data.name): the offline
# 5,000-image MNIST sample (the same on every machine), Debian's Fashion-MNIST IDX
# files, or stand-in data for tests.
MLP_DATA = {'mnist': 'offline', 'fashion_mnist': 'idx', 'synthetic': 'synthetic'}
MLP_SPEC = 'configs/mnist_mlp.py'


def common_flags(steps: int, eval_every: int, seeds: int, data: Optional[str],
                 data_choices: Sequence[str]) -> dict:
  """The flags every claims job has: --steps, --eval_every, --seeds, --data."""
  return {
      'steps': experiment.Flag(int, steps, 'Training steps per run.', checks.Int(1)),
      'eval_every': experiment.Flag(int, eval_every, 'Steps between evaluations and '
                                    'measurements.', checks.Int(1)),
      'seeds': experiment.Flag(int, seeds, 'Seeds per configuration.', checks.Int(1)),
      'data': experiment.Flag(str, data, f'Data: {", ".join(data_choices)}.',
                              checks.Choice(tuple(data_choices))),
  }


def mlp_run(name: str, args: Any, network: str, *, data: str = 'mnist', seed: int = 0,
            overrides: Mapping[str, Any] = (), params: Sequence[str] = ()) -> plan_lib.Run:
  """A run of the Figure 1 MLP (`configs/mnist_mlp.py`, 'bn' or 'baseline') for
  args.steps steps, evaluated (and measured, where `overrides` turn a measurement on)
  every args.eval_every steps; then `overrides`, then --set."""
  values = {'seed': seed, 'num_train_steps': args.steps,
            'eval_every_steps': args.eval_every, 'log_every_steps': args.eval_every,
            'steps_per_dispatch': args.eval_every, 'checkpoint_every_steps': args.steps,
            'measure.every_steps': args.eval_every, 'measure.ics': False,
            'measure.landscape': False}
  if data == 'fashion_mnist':
    values['data.name'] = 'fashion_mnist'
  values.update(overrides)
  values.update(args.overrides)
  return plan_lib.make_run(name, f'{args.workdir}/{name}',
                           f'{MLP_SPEC}:{network},source={MLP_DATA[data]}', values, params)


def by_name(records: Sequence[experiment.RunRecord]) -> dict:
  return {r.name: r for r in records}


def status(record: experiment.RunRecord) -> str:
  """'done', 'diverged at step N', ... ('not started' without a status.json)."""
  s = record.status
  if not s:
    return 'not started'
  if s.get('status') == 'diverged':
    return f'diverged at step {s.get("diverged_step", s.get("step"))}'
  return str(s.get('status'))


def verdict_row(claim: str, paper: str, here: str, holds: Optional[bool]) -> dict:
  """One row of a job's claims table; holds None: could not be judged (`here` says why)."""
  return {'claim': claim, 'paper': paper, 'here': here,
          'verdict': {True: 'holds', False: 'does not hold', None: 'not judged'}[holds]}


def fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return 'never'
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value)


def with_verdicts(lines: Sequence[str], summary: Mapping[str, Any]) -> str:
  """A job's table (markdown lines) followed by its claims and their verdicts."""
  out = [*lines, '', "| the paper's claim | paper | here | verdict |", '|---|---|---|---|']
  out += [f'| {c["claim"]} | {c["paper"]} | {c["here"]} | {c["verdict"]} |'
          for c in summary['claims']]
  return '\n'.join(out)


def main(argv: Sequence[str]) -> None:
  """`--claim=NAME [job flags]`: runs that job's driver with the other flags."""
  claim = [a for a in argv[1:] if a.startswith('--claim=')]
  rest = [a for a in argv[1:] if not a.startswith('--claim=')]
  name = claim[-1].split('=', 1)[1] if claim else None
  if name is None and any(a in ('--help', '-h', '--helpshort', '--helpfull') for a in rest):
    print(__doc__)
    print(f'--claim: one of {", ".join(CLAIMS)}. Every other flag (--workdir=DIR, '
          '--steps, --seeds, --set=KEY=VALUE, ...) is the job\'s: '
          'python -m experiments.<job> --help lists them.')
    sys.exit(0)
  if name not in CLAIMS:
    print(f'claims: error: --claim={name!r} is invalid: must be one of '
          f'{", ".join(CLAIMS)}.', file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(CLAIMS[name])
  sys.argv = [sys.argv[0], *rest]
  experiment.main(module.__name__)


if __name__ == '__main__':
  main(sys.argv)
