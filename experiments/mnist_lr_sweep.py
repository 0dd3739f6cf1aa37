r"""Learning-rate tolerance: the MNIST MLP with and without BN over a log grid of rates.

    python -m experiments.mnist_lr_sweep --workdir=runs/lr_sweep \
        [--steps=5000] [--source=auto|tfds|idx|offline|synthetic] \
        [--lrs=0.01,0.03,0.1,...] [--eval_every=500] [--how=processes --parallel=2]

The paper's claim (Section 3.3): BN allows much higher learning rates without
divergence. Both networks of `configs/mnist_mlp.py` (`bn` and `baseline`: 3 x 100
sigmoid, batch 60, momentum 0.9) are trained at every learning rate of the grid
(default 0.01 ... 100, half-decade steps), each network as ONE vmapped program over the
rates (`bn_research.train.train_members`, what `scripts.sweep --vmap` runs);
`--how=processes` runs the same grid as separate engine processes instead. The runs are
ordinary sweeps:

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

from bn_research import checks
from bn_research import experiment
from bn_research import launch
from bn_research import plan as plan_lib
from bn_research.analysis import curves

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
NETWORKS = ('bn', 'baseline')
LABELS = {'bn': 'With BN', 'baseline': 'Without BN'}
LR_KEY = 'optimizer.learning_rate'
NUM_CLASSES = 10
AT_CHANCE = 2.0 / NUM_CLASSES  # final accuracy below this counts as a failed run

NAME = 'lr_sweep'
WORKDIR = 'runs/lr_sweep'
HOW, PARALLEL = 'vmap', 1
FLAGS = {
    'steps': experiment.Flag(int, 5000, 'Training steps per run.', checks.Int(1)),
    'source': experiment.Flag(str, None, "Data source (default: the config's auto: MNIST "
                              'via TFDS if prepared, else the offline 5k sample).',
                              checks.Choice(('auto', 'tfds', 'idx', 'download', 'offline',
                                             'synthetic'))),
    'lrs': experiment.Flag('floats', DEFAULT_LRS, 'Comma-separated learning rates.',
                           checks.Float(0.0, low_open=True)),
    'eval_every': experiment.Flag(int, None, "Steps between evaluations (default: the "
                                  "config's 500, or --steps if fewer).", checks.Int(1)),
}


def plan(args) -> list[plan_lib.Run]:
  """One sweep over the rates per network, in `DIR/<network>/`."""
  every = args.eval_every or min(500, args.steps)
  common = {'eval_every_steps': every, 'log_every_steps': every,
            'steps_per_dispatch': every,
            'checkpoint_every_steps': args.steps,  # step 0 and the end only
            'probe.enabled': False, **args.overrides}
  runs = []
  for net in NETWORKS:
    spec = os.path.join(launch.REPO, 'configs', 'mnist_mlp.py') + f':{net},steps={args.steps}'
    spec += f',source={args.source}' if args.source else ''
    runs += plan_lib.grid(spec, os.path.join(args.workdir, net), {LR_KEY: list(args.lrs)},
                          common)
  return runs


def summarize_run(record) -> dict:
  """Final and best accuracy, and the outcome: diverged, at chance or trains."""
  steps = [s for s, _ in record.curve('eval_accuracy')]
  acc = [a for _, a in record.curve('eval_accuracy')]
  status = record.status.get('status', 'unknown')
  diverged = status == 'diverged'
  best, _ = curves.best(steps, acc)
  final = acc[-1] if acc and not diverged and math.isfinite(acc[-1]) else None
  if diverged:
    outcome = 'diverged'
  elif final is None:
    outcome = status
  else:
    outcome = 'at chance' if final < AT_CHANCE else 'trains'
  return {'final_test_accuracy': final, 'max_test_accuracy': best,
          'diverged_step': record.status.get('diverged_step') if diverged else None,
          'status': status, 'outcome': outcome, 'last_step': record.status.get('step')}


def summarize(records, args) -> dict:
  by = {(os.path.basename(os.path.dirname(r.run.workdir)), dict(r.run.params)[LR_KEY]): r
        for r in records}
  rows = [{'lr': lr, **{net: summarize_run(by[net, lr]) for net in NETWORKS}}
          for lr in args.lrs]
  data = records[0].data
  out = {'rows': rows, 'chance_accuracy': 1.0 / NUM_CLASSES, 'at_chance_below': AT_CHANCE,
         'data': {k: data.get(k) for k in ('dataset', 'source', 'num_train', 'num_test',
                                           'is_full_mnist', 'warning')},
         'steps': args.steps, 'lrs': list(args.lrs), 'vmap': args.how == 'vmap'}
  for net in NETWORKS:
    ok = [r['lr'] for r in rows if r[net]['outcome'] == 'trains']
    out[f'{net}_trains_up_to_lr'] = max(ok) if ok else None
  return out


def _fmt(x, digits=4):
  return '-' if x is None else f'{x:.{digits}f}'


def table(summary: dict) -> str:
  d = summary['data']
  lines = [f'{summary["steps"]} steps per run, batch 60, momentum 0.9; data: '
           f'{d.get("dataset")} ({d.get("num_train")} train / {d.get("num_test")} test). '
           'Outcome: diverged (non-finite, or a log-interval training loss above '
           f'divergence.max_loss), at chance (final accuracy < {summary["at_chance_below"]:g}), '
           'or trains.', '']
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
  def up_to(net):
    lr = summary[f'{net}_trains_up_to_lr']
    return 'none of the rates' if lr is None else f'{lr:g}'
  lines += ['', f'Largest learning rate that trains: BN {up_to("bn")}, '
            f'baseline {up_to("baseline")}.']
  return '\n'.join(lines)


def plot(summary: dict):
  """Final test accuracy vs learning rate; failed runs ringed, diverged ones marked x."""
  fig, ax = experiment.figure(width=7.0, height=4.5)
  for net in NETWORKS:
    color = experiment.COLORS[net]
    lrs = [r['lr'] for r in summary['rows']]
    final = [r[net]['final_test_accuracy'] for r in summary['rows']]
    ax.plot([lr for lr, f in zip(lrs, final) if f is not None],
            [f for f in final if f is not None], 'o-', color=color, label=LABELS[net])
    chance = [(r['lr'], r[net]['final_test_accuracy']) for r in summary['rows']
              if r[net]['outcome'] == 'at chance']
    if chance:
      ax.scatter([lr for lr, _ in chance], [a for _, a in chance], s=110,
                 facecolors='none', edgecolors=color, linewidths=1.5, zorder=3,
                 label=f'{LABELS[net]}: failed (at chance)')
    bad = [(r['lr'], r[net]['diverged_step']) for r in summary['rows']
           if r[net]['outcome'] == 'diverged']
    if bad:
      y = -0.03 if net == 'bn' else -0.07
      ax.scatter([lr for lr, _ in bad], [y] * len(bad), marker='x', s=60,
                 color=color, label=f'{LABELS[net]}: diverged (step)', zorder=3)
      for lr, step in bad:
        ax.annotate(str(step), (lr, y), textcoords='offset points', xytext=(6, -3),
                    fontsize=7, color=color)
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
  # Outside the axes: the curves fill the plot's whole width.
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
