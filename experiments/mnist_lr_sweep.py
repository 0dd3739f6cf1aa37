r"""Learning-rate tolerance: the MNIST MLP with and without BN over a log grid of rates.

    python -m experiments.mnist_lr_sweep --workdir=runs/lr_sweep \
        [--steps=5000] [--source=auto|tfds|idx|offline|synthetic] \
        [--lrs=0.01,0.03,0.1,...] [--eval_every=500] [--novmap]

The paper's claim (Section 3.3): BN allows much higher learning rates without
divergence. Both networks of `configs/mnist_mlp.py` (`bn` and `baseline`: 3 x 100
sigmoid, batch 60, momentum 0.9) are trained at every learning rate of the grid
(default 0.01 ... 100, half-decade steps), each network as ONE vmapped program over the
rates (`bn_research.train.train_members`, what `scripts.sweep --vmap` runs); `--novmap` runs the
same grid as separate engine processes instead. The runs are ordinary sweeps:

    DIR/bn/sweep.json, DIR/bn/optimizer.learning_rate=V/     (engine run directories)
    DIR/baseline/...                                          (`scripts.compare DIR/bn`)

then the summary:

    DIR/lr_sweep.png   final test accuracy vs learning rate (log x), both networks;
                       runs at chance ringed, diverged runs marked with x below 0,
                       labelled with the step they diverged at
    DIR/lr_sweep.json  {"rows": [{"lr", "bn": {...}, "baseline": {...}}], ...} where each
                       network's entry has final_test_accuracy, max_test_accuracy,
                       diverged_step, status and outcome
    DIR/lr_sweep.md    the same as a table

A sigmoid network can fail without any NaN: it saturates and stays at chance. So the
outcome of a run is `diverged` (non-finite loss, the engine stops it), `at chance`
(final test accuracy below 2x chance, 0.2 for 10 classes) or `trains`.

The default 5,000 steps per run (a tenth of the paper's 50,000) keeps the whole job to
a few minutes on two CPU cores (two compiled programs of 9 members each); the
ranking of the learning rates is settled well before that. Evaluation every 500 steps
on the held-out split, Figure-1 probe off. Re-running skips finished runs.
"""

from __future__ import annotations

import math
import os
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

DEFAULT_LRS = '0.01,0.03,0.1,0.3,1,3,10,30,100'
NETWORKS = ('bn', 'baseline')
LABELS = {'bn': 'With BN', 'baseline': 'Without BN'}
LR_KEY = 'optimizer.learning_rate'
NUM_CLASSES = 10
AT_CHANCE = 2.0 / NUM_CLASSES  # final accuracy below this counts as a failed run



def _define_flags() -> None:
  """Flags exist only when this file is the program, so that importing it (tests, other
  experiments) never clashes with another module's --workdir."""
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_integer('steps', 5000, 'Training steps per run.')
  flags.DEFINE_string('source', None, "Data source (default: the config's auto: MNIST "
                      'via TFDS if prepared, else the offline 5k sample).')
  flags.DEFINE_string('lrs', DEFAULT_LRS, 'Comma-separated learning rates.')
  flags.DEFINE_integer('eval_every', None, "Steps between evaluations (default: the "
                       "config's 500, or --steps if fewer).")
  flags.DEFINE_bool('vmap', True, 'One vmapped program per network; --novmap: one '
                    'engine process per run.')


def config_spec(network: str, steps: int, source: str | None) -> str:
  from bn_research import launch
  arg = f'{network},steps={steps}' + (f',source={source}' if source else '')
  return os.path.join(launch.REPO, 'configs', 'mnist_mlp.py') + ':' + arg


def common_overrides(steps: int, eval_every: int | None) -> list[str]:
  every = eval_every or min(500, steps)
  return [f'--config.eval_every_steps={every}', f'--config.log_every_steps={every}',
          f'--config.steps_per_dispatch={every}',
          f'--config.checkpoint_every_steps={steps}',  # step 0 and the end only
          '--config.probe.enabled=false']


def train_network(root: str, network: str, lrs: Sequence[float], steps: int,
                  source: str | None, eval_every: int | None, vmap: bool) -> None:
  """One sweep directory per network: `scripts.sweep`'s sweep, in this process."""
  from bn_research import sweep as sweep_lib
  values = ','.join(sweep_lib.format_value(lr) for lr in lrs)
  code = sweep_lib.sweep(config_spec(network, steps, source), os.path.join(root, network),
                         [f'{LR_KEY}={values}'], None, common_overrides(steps, eval_every),
                         vmap=vmap)
  if code:
    raise SystemExit(f'{network}: some runs failed; see {root}/{network}')


def summarize_run(run_dir: str) -> dict:
  from bn_research.analysis import curves, runs
  run = runs.load_run(run_dir)
  steps, acc = runs.metric_series(run, 'eval_accuracy')
  status = (run.status or {}).get('status', 'unknown')
  diverged = status == 'diverged'
  best, _ = curves.best(steps, acc)
  final = acc[-1] if acc and not diverged and runs.is_finite(acc[-1]) else None
  run_status = run.status or {}
  if diverged:
    outcome = 'diverged'
  elif final is None:
    outcome = status
  else:
    outcome = 'at chance' if final < AT_CHANCE else 'trains'
  return {'final_test_accuracy': final, 'max_test_accuracy': best,
          'diverged_step': run_status.get('diverged_step') if diverged else None,
          'status': status, 'outcome': outcome, 'last_step': run_status.get('step')}


def summarize(root: str, lrs: Sequence[float]) -> dict:
  from bn_research import rundir
  from bn_research import sweep as sweep_lib
  rows = []
  for lr in lrs:
    name = sweep_lib.run_name({LR_KEY: lr})
    rows.append({'lr': lr, **{net: summarize_run(os.path.join(root, net, name))
                              for net in NETWORKS}})
  data = rundir.read_description(
      os.path.join(root, 'bn', sweep_lib.run_name({LR_KEY: lrs[0]}))) or {}
  out = {'rows': rows, 'chance_accuracy': 1.0 / NUM_CLASSES, 'at_chance_below': AT_CHANCE,
         'data': {k: data.get(k) for k in ('dataset', 'source', 'num_train', 'num_test',
                                           'is_full_mnist', 'warning')}}
  for net in NETWORKS:
    ok = [r['lr'] for r in rows if r[net]['outcome'] == 'trains']
    out[f'{net}_trains_up_to_lr'] = max(ok) if ok else None
  return out


def _fmt(x, digits=4):
  return '-' if x is None else f'{x:.{digits}f}'


def markdown(summary: dict) -> str:
  d = summary['data']
  lines = [f'# MNIST MLP: test accuracy vs learning rate, BN vs baseline',
           '',
           f'{summary["steps"]} steps per run, batch 60, momentum 0.9; data: '
           f'{d.get("dataset")} ({d.get("num_train")} train / {d.get("num_test")} test). '
           f'Outcome: diverged (non-finite, or a log-interval training loss above divergence.max_loss), at chance (final accuracy < '
           f'{summary["at_chance_below"]:g}), or trains.',
           '']
  if d.get('warning'):
    lines += [f'**{d["warning"]}**', '']
  lines += ['| lr | BN final | BN max | BN diverged at | BN outcome | baseline final | '
            'baseline max | baseline diverged at | baseline outcome |',
            '|---:|---:|---:|---:|---|---:|---:|---:|---|']
  for r in summary['rows']:
    cells = [f'{r["lr"]:g}']
    for net in NETWORKS:
      s = r[net]
      cells += [_fmt(s['final_test_accuracy']), _fmt(s['max_test_accuracy']),
                '-' if s['diverged_step'] is None else str(s['diverged_step']), s['outcome']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', f'Largest learning rate that trains: BN {summary["bn_trains_up_to_lr"]}, '
            f'baseline {summary["baseline_trains_up_to_lr"]}.', '']
  return '\n'.join(lines)


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {'bn': 'tab:blue', 'baseline': 'tab:orange'}
  for net in NETWORKS:
    lrs = [r['lr'] for r in summary['rows']]
    final = [r[net]['final_test_accuracy'] for r in summary['rows']]
    ax.plot([lr for lr, f in zip(lrs, final) if f is not None],
            [f for f in final if f is not None], 'o-', color=colors[net], label=LABELS[net])
    chance = [(r['lr'], r[net]['final_test_accuracy']) for r in summary['rows']
              if r[net]['outcome'] == 'at chance']
    if chance:
      ax.scatter([lr for lr, _ in chance], [a for _, a in chance], s=110,
                 facecolors='none', edgecolors=colors[net], linewidths=1.5, zorder=3,
                 label=f'{LABELS[net]}: failed (at chance)')
    bad = [(r['lr'], r[net]['diverged_step']) for r in summary['rows']
           if r[net]['outcome'] == 'diverged']
    if bad:
      y = -0.03 if net == 'bn' else -0.07
      ax.scatter([lr for lr, _ in bad], [y] * len(bad), marker='x', s=60,
                 color=colors[net], label=f'{LABELS[net]}: diverged (step)', zorder=3)
      for lr, step in bad:
        ax.annotate(str(step), (lr, y), textcoords='offset points', xytext=(6, -3),
                    fontsize=7, color=colors[net])
  ax.axhline(summary['chance_accuracy'], color='gray', ls=':', lw=1, label='chance')
  ax.set_xscale('log')
  ax.set_ylim(-0.1, 1.0)
  ax.set_xlabel('learning rate (momentum 0.9)')
  ax.set_ylabel(f'final test accuracy (step {summary["steps"]})')
  d = summary['data']
  title = f'MNIST MLP, BN vs baseline: learning-rate sweep on {d.get("dataset")}'
  if d.get('is_full_mnist') is False:
    title += '\n(NOT full MNIST)'
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8, loc='center left')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(root: str, *, steps: int = 5000, source: str | None = None,
        lrs: Sequence[float] = tuple(float(x) for x in DEFAULT_LRS.split(',')),
        eval_every: int | None = None, vmap: bool = True) -> dict:
  """Trains both networks over the grid and writes the summary files; returns the summary."""
  os.makedirs(root, exist_ok=True)
  t0 = time.time()
  for net in NETWORKS:
    logging.info('Training the %s network at learning rates %s.', net, list(lrs))
    train_network(root, net, lrs, steps, source, eval_every, vmap)
  summary = summarize(root, lrs)
  summary.update(steps=steps, lrs=list(lrs), vmap=vmap,
                 wall_seconds=round(time.time() - t0, 1))
  from experiments import normalizer_runs
  normalizer_runs.write_summary(root, 'lr_sweep', summary, markdown, plot)
  return summary


def check_flags() -> list[float]:
  """The learning rates; ValueError naming the first bad flag, before anything runs."""
  from bn_research import launch
  from bn_research import sweep as sweep_lib
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise ValueError('--workdir is required.')
  launch.check_positive_flag('steps', FLAGS.steps, 'training steps per run')
  launch.check_positive_flag('eval_every', FLAGS.eval_every, 'steps between evaluations')
  try:
    lrs = [float(x) for x in FLAGS.lrs.split(',') if x.strip()]
  except ValueError:
    raise ValueError(f'--lrs={FLAGS.lrs!r}: expected comma-separated numbers.') from None
  if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
    raise ValueError(f'--lrs={FLAGS.lrs!r}: learning rates must be finite and > 0.')
  sweep_lib.check_sweep({LR_KEY: lrs}, f'--lrs={FLAGS.lrs}')  # no rate listed twice
  return lrs


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from bn_research import launch
  lrs = launch.exit_on_bad_flags('mnist_lr_sweep', check_flags)
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  logging.set_verbosity(logging.INFO)
  from bn_research import log_filter
  log_filter.quiet_library_logs()
  summary = run(FLAGS.workdir, steps=FLAGS.steps, source=FLAGS.source, lrs=lrs,
                eval_every=FLAGS.eval_every, vmap=FLAGS.vmap)
  print(markdown(summary))
  print(f'wrote {FLAGS.workdir}/lr_sweep.png, lr_sweep.md, lr_sweep.json in '
        f'{summary["wall_seconds"]} s')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
