r"""The small ablation's base learning rate, chosen the way the paper's was.

    python -m experiments.inception_lr_calibration --workdir=runs/inception_small_lr

The paper's base rate (0.0015) is the unnormalised Inception's own tuned rate; BN-x5
and BN-x30 multiply it, and Inception at 5x of it reached "machine infinity". The
small preset (`configs/inception_small.py`) takes its `BASE_LR` from this job, by a
procedure fixed before it was run:

1. Train the preset's `inception` model (no BN; dropout, LRN and L2 as in the paper's
   Inception) at every rate of `GRID`, a 1-2-5 log grid from 0.002 to 0.2, for the
   preset's step budget on the preset's data, seed 0. The runs are an ordinary sweep
   (`scripts.sweep`): separate processes `--parallel` at a time (the fastest layout on
   CPU) or, with `--vmap`, one program of all the rates (on an accelerator).
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
import sys
import time
from typing import Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

GRID = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
SCORE_EVALS = 3
LR_KEY = 'optimizer.learning_rate'
RULE = (f'max over the grid of the mean eval accuracy of the last {SCORE_EVALS} '
        'evaluations; diverged runs excluded')


def _define_flags() -> None:
  flags.DEFINE_string('workdir', 'runs/inception_small_lr', 'Output directory.')
  flags.DEFINE_string('data', None, 'Preset data: fashion_mnist (default), digits or '
                      'synthetic.')
  flags.DEFINE_integer('steps', None, "Training steps per rate (default: the preset's).")
  flags.DEFINE_list('lrs', [str(x) for x in GRID], 'The grid (default: the procedure\'s).')
  flags.DEFINE_integer('parallel', 2, 'Runs at once (separate processes).')
  flags.DEFINE_bool('vmap', False, 'All rates as one vmapped program instead.')
  flags.DEFINE_multi_string('set', [], 'Config override for every run, e.g. '
                            '--set=model.width_multiplier=0.0625 (repeatable).')


def config_spec(data: Optional[str], steps: Optional[int]) -> str:
  from bn_research import launch
  arg = 'model=inception' + (f',data={data}' if data else '') + (
      f',steps={steps}' if steps else '')
  return os.path.join(launch.REPO, 'configs', 'inception_small.py') + ':' + arg


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


def summarize(root: str, lrs: Sequence[float]) -> dict:
  from bn_research import rundir
  from bn_research import sweep as sweep_lib
  from bn_research.analysis import runs as runs_lib
  rows, scores = [], {}
  for lr in lrs:
    run_dir = os.path.join(root, sweep_lib.run_name({LR_KEY: lr}))
    run = runs_lib.load_run(run_dir)
    steps, acc = runs_lib.metric_series(run, 'eval_accuracy')
    status = (run.status or {}).get('status', 'unknown')
    scores[lr] = score(acc[1:], status)  # the step-0 evaluation is not training's end
    rows.append({'lr': lr, 'status': runs_lib.status_label(run), 'score': scores[lr],
                 'max_accuracy': max(acc) if acc else None, 'steps': steps,
                 'eval_accuracy': acc})
  best, edge = choose(scores)
  first = os.path.join(root, sweep_lib.run_name({LR_KEY: lrs[0]}))
  data = rundir.read_description(first) or {}
  return {'procedure': RULE, 'grid': list(lrs), 'rows': rows, 'base_learning_rate': best,
          'at_grid_edge': edge,
          'data': {k: data.get(k) for k in ('dataset', 'display_name', 'num_train',
                                             'num_test')}}


def markdown(summary: dict) -> str:
  lines = ['# Small-preset base learning rate: the `inception` model over a grid', '',
           f'Rule: {summary["procedure"]}. Data: {summary["data"].get("display_name")}; '
           f'{summary["steps"]} steps per rate.', '',
           '| lr | score (mean of last evals) | max accuracy | status |', '|---|---|---|---|']
  for r in summary['rows']:
    mark = ' **chosen**' if r['lr'] == summary['base_learning_rate'] else ''
    s = '-' if r['score'] is None else f'{r["score"]:.4f}'
    m = '-' if r['max_accuracy'] is None else f'{r["max_accuracy"]:.4f}'
    lines.append(f'| {r["lr"]:g}{mark} | {s} | {m} | {r["status"]} |')
  if summary['at_grid_edge']:
    lines += ['', 'The best rate is at the edge of the grid: widen the grid.']
  return '\n'.join(lines) + '\n'


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(root: str, *, lrs: Sequence[float] = GRID, data: Optional[str] = None,
        steps: Optional[int] = None, parallel: int = 2, vmap: bool = False,
        overrides: Sequence[str] = ()) -> dict:
  """Trains the grid (re-running resumes it) and writes the summary files."""
  from bn_research import sweep as sweep_lib
  from experiments import normalizer_runs
  t0 = time.time()
  spec = config_spec(data, steps)
  values = ','.join(sweep_lib.format_value(lr) for lr in lrs)
  code = sweep_lib.sweep(spec, root, [f'{LR_KEY}={values}'], None, list(overrides),
                         vmap=vmap, parallel=1 if vmap else parallel)
  if code:
    raise SystemExit(f'some runs failed; see {root}/*.log')
  summary = summarize(root, lrs)
  summary['steps'] = sweep_lib.load_config(spec, overrides).num_train_steps
  summary['command'] = ' '.join(['python -m experiments.inception_lr_calibration'] +
                                sys.argv[1:])
  summary['wall_seconds'] = round(time.time() - t0, 1)
  normalizer_runs.write_summary(root, 'lr_calibration', summary, markdown, plot)
  return summary


def check_flags() -> list[float]:
  from bn_research import launch
  FLAGS = flags.FLAGS
  launch.check_positive_flag('steps', FLAGS.steps, 'training steps per rate')
  launch.check_parallel(FLAGS.parallel)
  try:
    lrs = [float(x) for x in FLAGS.lrs]
  except ValueError:
    raise ValueError(f'--lrs={",".join(FLAGS.lrs)!r}: expected comma-separated '
                     'numbers.') from None
  if len(lrs) < 2 or any(not 0 < lr < float('inf') for lr in lrs):
    raise ValueError(f'--lrs={",".join(FLAGS.lrs)!r}: at least 2 finite rates > 0.')
  from bn_research import sweep as sweep_lib
  sweep_lib.check_sweep({LR_KEY: lrs}, f'--lrs={",".join(FLAGS.lrs)}')  # no rate twice
  return sorted(lrs)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from bn_research import launch
  from bn_research import log_filter
  lrs = launch.exit_on_bad_flags('inception_lr_calibration', check_flags)
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.INFO)
  log_filter.quiet_library_logs()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  summary = run(FLAGS.workdir, lrs=lrs, data=FLAGS.data, steps=FLAGS.steps,
                parallel=FLAGS.parallel, vmap=FLAGS.vmap,
                overrides=[f'--config.{kv}' for kv in FLAGS.set])
  print(markdown(summary))
  print(f'base learning rate: {summary["base_learning_rate"]}'
        f'{" (AT THE GRID EDGE: widen the grid)" if summary["at_grid_edge"] else ""}; '
        f'wrote {FLAGS.workdir}/lr_calibration.json, .md, .png in '
        f'{summary["wall_seconds"]} s')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
