r"""The small ablation's base learning rate, chosen the way the paper's was.

    python -m experiments.inception_lr_calibration --workdir=runs/inception_small_lr

The paper's base rate (0.0015) is the unnormalised Inception's own tuned rate; BN-x5
and BN-x30 multiply it, and Inception at 5x of it reached "machine infinity". The
small preset (`configs/inception_small.py`) takes its `BASE_LR` from this job, by a
procedure fixed before it was run:

1. Train the preset's `inception` model (no BN; dropout, LRN and L2 as in the paper's
   Inception) at every rate of `GRID`, a 1-2-5 log grid from 0.002 to 0.2, for the
   preset's step budget on the preset's data, seed 0. The runs are an ordinary sweep
   (`bn_research.plan`): separate processes `--parallel` at a time (the fastest layout
   on CPU) or, with `--how=vmap`, one program of all the rates (on an accelerator).
2. Score each rate by its end-of-training accuracy: the mean eval accuracy of its last
   `SCORE_EVALS` evaluations. A diverged run has no score.
3. The base rate is the best-scoring rate. If that is the grid's smallest or largest
   rate, the best may lie outside the grid: the job says so (`"at_grid_edge": true`)
   and the grid should be widened, not the result used.

Writes DIR/lr_calibration.json (grid, each rate's score, status and curve, the chosen
rate, the rule), lr_calibration.md and lr_calibration.png. The committed copy is
`experiments/results/inception_small_lr_calibration.json`; `tests/test_ablation_configs`
checks that the preset's BASE_LR is the rate it chose.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

from bn_research import checks
from bn_research import experiment
from bn_research import launch
from bn_research import plan as plan_lib
from bn_research.analysis import runs as runs_lib

GRID = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
SCORE_EVALS = 3
LR_KEY = 'optimizer.learning_rate'
RULE = (f'max over the grid of the mean eval accuracy of the last {SCORE_EVALS} '
        'evaluations; diverged runs excluded')

NAME = 'lr_calibration'
WORKDIR = 'runs/inception_small_lr'
HOW, PARALLEL = 'processes', 2
FLAGS = {
    'data': experiment.Flag(str, None, 'Preset data: fashion_mnist (default), digits or '
                            'synthetic.', checks.Choice(('fashion_mnist', 'digits',
                                                         'synthetic'))),
    'steps': experiment.Flag(int, None, "Training steps per rate (default: the preset's).",
                             checks.Int(1)),
    'lrs': experiment.Flag('floats', GRID, "The grid (default: the procedure's).",
                           checks.Float(0.0, low_open=True)),
}


def config_spec(data: Optional[str], steps: Optional[int]) -> str:
  arg = 'model=inception' + (f',data={data}' if data else '') + (
      f',steps={steps}' if steps else '')
  return os.path.join(launch.REPO, 'configs', 'inception_small.py') + ':' + arg


def plan(args) -> list[plan_lib.Run]:
  """The preset's `inception` model at every rate of the grid, one sweep."""
  if len(args.lrs) < 2:
    raise ValueError(f'--lrs={",".join(map(str, args.lrs))!r} is invalid: must be at '
                     'least 2 rates.')
  return plan_lib.grid(config_spec(args.data, args.steps), args.workdir,
                       {LR_KEY: sorted(args.lrs)}, args.overrides)


def score(accuracies: Sequence[float], status: str) -> Optional[float]:
  """A run's end-of-training accuracy (mean of its last SCORE_EVALS evals), or None."""
  if status != 'done' or len(accuracies) < SCORE_EVALS:
    return None
  return float(sum(accuracies[-SCORE_EVALS:]) / SCORE_EVALS)


def choose(scores: Mapping[float, Optional[float]]) -> tuple[Optional[float], bool]:
  """(best rate, whether it is at the grid's edge); (None, False) if no run scored."""
  scored = {lr: s for lr, s in scores.items() if s is not None}
  if not scored:
    return None, False
  best = max(sorted(scored), key=lambda lr: scored[lr])  # ties: the smaller rate
  return best, best in (min(scores), max(scores))


def summarize(records, args) -> dict:
  del args
  rows, scores = [], {}
  for record in records:
    lr = dict(record.run.params)[LR_KEY]
    run = runs_lib.load_run(record.run.workdir)
    steps, acc = runs_lib.metric_series(run, 'eval_accuracy')
    status = (run.status or {}).get('status', 'unknown')
    scores[lr] = score(acc[1:], status)  # the step-0 evaluation is not training's end
    rows.append({'lr': lr, 'status': runs_lib.status_label(run), 'score': scores[lr],
                 'max_accuracy': max(acc) if acc else None, 'steps': steps,
                 'eval_accuracy': acc})
  best, edge = choose(scores)
  data = records[0].data
  out = {'procedure': RULE, 'grid': [r['lr'] for r in rows], 'rows': rows,
         'base_learning_rate': best, 'at_grid_edge': edge,
         'data': {k: data.get(k) for k in ('dataset', 'display_name', 'num_train',
                                            'num_test')},
         'steps': records[0].run.config.num_train_steps, 'warnings': []}
  if best is None:
    out['warnings'].append('no rate scored (every run diverged or was too short): no '
                           'base learning rate is chosen')
  elif edge:
    out['warnings'].append(f'the best rate {best:g} is at the edge of the grid: widen the '
                           'grid before using it')
  return out


def table(summary: dict) -> str:
  lines = [f'Rule: {summary["procedure"]}. Data: {summary["data"].get("display_name")}; '
           f'{summary["steps"]} steps per rate.', '',
           '| lr | score (mean of last evals) | max accuracy | status |', '|---|---|---|---|']
  for r in summary['rows']:
    mark = ' **chosen**' if r['lr'] == summary['base_learning_rate'] else ''
    s = '-' if r['score'] is None else f'{r["score"]:.4f}'
    m = '-' if r['max_accuracy'] is None else f'{r["max_accuracy"]:.4f}'
    lines.append(f'| {r["lr"]:g}{mark} | {s} | {m} | {r["status"]} |')
  if summary['at_grid_edge']:
    lines += ['', 'The best rate is at the edge of the grid: widen the grid.']
  return '\n'.join(lines)


def plot(summary: dict):
  """Each rate's accuracy curve, and the score per rate (x: no score)."""
  fig, (left, right) = experiment.figure(2, width=5.5, height=4.0)
  for r in summary['rows']:
    left.plot(r['steps'], r['eval_accuracy'], label=f'lr {r["lr"]:g} ({r["status"]})')
  left.set_xlabel('training step')
  left.set_ylabel('eval accuracy')
  left.legend(fontsize=7)
  ok = [r for r in summary['rows'] if r['score'] is not None]
  right.semilogx([r['lr'] for r in ok], [r['score'] for r in ok], 'o-')
  for r in summary['rows']:
    if r['score'] is None:
      right.plot(r['lr'], 0.0, 'x', color='red', markersize=9)
  if summary['base_learning_rate'] is not None:
    right.axvline(summary['base_learning_rate'], color='gray', ls=':')
  right.set_xlabel('learning rate (x: diverged)')
  right.set_ylabel(f'mean of last {SCORE_EVALS} eval accuracies')
  fig.suptitle('Inception (no BN), small preset: choosing the base learning rate')
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
