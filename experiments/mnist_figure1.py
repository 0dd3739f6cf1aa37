r"""Figure 1 of the paper: MNIST, BN vs baseline, test accuracy and activations over time.

    python -m experiments.mnist_figure1 --workdir=runs/figure1

Trains both networks of `configs/mnist_mlp.py` (50,000 steps of batch 60 each), side by
side on the machine's cores, each into its own run directory (`DIR/bn`, `DIR/baseline`,
in the engine's format; output in `DIR/bn.log`, progress on the console), then writes

    DIR/figure1.png   (a) test accuracy vs step, (b) baseline and (c) BN: the 15th, 50th
                      and 85th percentiles of the input to one sigmoid of the last
                      hidden layer vs step, on one y-scale
    DIR/figure1.json  per network: status, test_accuracy [[step, acc]],
                      final_test_accuracy, percentiles [[step, p15, p50, p85]]; claims
    DIR/figure1.md    the table, the command, the date and the machine

Re-running resumes or skips finished networks. `--parallel=1`: one after the other.
"""

from __future__ import annotations

import os

from bn_research import checks
from bn_research import experiment
from bn_research import launch
from bn_research import plan as plan_lib
from bn_research.analysis import figure1 as figure1_lib

NAME = 'figure1'
WORKDIR = 'runs/figure1'
HOW, PARALLEL = 'processes', 2
FLAGS = {
    'steps': experiment.Flag(int, None, "Training steps per network (default: the "
                             "config's 50,000).", checks.Int(1)),
    'source': experiment.Flag(str, None, 'Data source: auto (default: MNIST via TFDS if '
                              'prepared, else the offline 5k sample), tfds, offline, '
                              'synthetic.', checks.Choice(('auto', 'tfds', 'offline',
                                                           'synthetic'))),
    'eval_every': experiment.Flag(int, None, 'Steps between evals and probes.',
                                  checks.Int(1)),
}

NETWORKS = ('bn', 'baseline')
LABELS = {'bn': 'With BN', 'baseline': 'Without BN'}
CONFIG = os.path.join(launch.REPO, 'configs', 'mnist_mlp.py')


def plan(args) -> list[plan_lib.Run]:
  """The two networks, with the job's flags and every --set applied."""
  overrides = {}
  if args.steps is not None:
    overrides['num_train_steps'] = args.steps
    if args.steps < 10_000:  # keep checkpoints inside short runs too
      overrides['checkpoint_every_steps'] = args.steps
  if args.eval_every is not None:
    for key in ('eval_every_steps', 'log_every_steps', 'steps_per_dispatch'):
      overrides[key] = args.eval_every
  overrides.update(args.overrides)
  source = f',source={args.source}' if args.source else ''
  return [plan_lib.make_run(net, os.path.join(args.workdir, net), f'{CONFIG}:{net}{source}',
                            overrides) for net in NETWORKS]


def _percentile_keys(config: dict) -> list[str]:
  return [f'act_p{q:g}' for q in config.get('probe', {}).get('percentiles', ())]


def summarize(records, args) -> dict:
  """Curves and numbers per network, and the paper's claims where they can be judged.

  A diverged network, a network with fewer than two probe rows or a probe of other than
  three percentiles is reported as such: the numbers it lacks are None.
  """
  del args
  out = {}
  for r in records:
    keys = _percentile_keys(r.config)
    pct = [[m['step']] + [m[k] for k in keys]
           for m in r.metrics if keys and all(k in m for k in keys)]
    out[r.name] = {'test_accuracy': r.curve('eval_accuracy'), 'percentiles': pct,
                   'status': r.status.get('status', 'unknown')}
  base_acc = out['baseline']['test_accuracy']
  target = max((a for _, a in base_acc), default=None)
  notes = []
  for net in NETWORKS:
    s = out[net]
    if s['test_accuracy'] and target is not None and len(s['percentiles']) >= 2 and len(
        s['percentiles'][0]) == 4:
      s.update(figure1_lib.network_numbers(s['test_accuracy'], s['percentiles'], target))
    else:
      notes.append(f'{net} ({s["status"]}): too few evaluations or not three probe '
                   'percentiles; its numbers are not measured')
  if all('final_test_accuracy' in out[net] for net in NETWORKS):
    out['claims'] = figure1_lib.claims(out['bn'], out['baseline'])
  else:
    out['claims'] = []
  out['warnings'] = notes
  data = records[0].data
  out['data'] = {k: data.get(k) for k in ('dataset', 'display_name', 'source', 'num_train',
                                           'num_test', 'image_shape', 'is_mnist_sample',
                                           'warning', 'binarized')}
  if data.get('warning'):
    notes.append(data['warning'])
  probe = records[0].config.get('probe', {})
  out['probe'] = {'layer': 'last hidden', 'unit': probe.get('unit'),
                  'num_examples': probe.get('num_examples'), 'mode': probe.get('mode'),
                  'percentiles': probe.get('percentiles')}
  out['eval'] = records[0].config.get('eval', {})
  return out


def table(summary: dict) -> str:
  data = summary['data']
  name = data.get('display_name') or data.get('dataset')
  lines = [f'Figure 1 on {name}'
           + ('  [the MNIST sample, NOT full MNIST]' if data.get('is_mnist_sample') else ''),
           '']
  rows = []
  for net in NETWORKS:
    s = summary[net]
    if 'final_test_accuracy' in s:
      rows.append([net, s['status'], s['final_test_accuracy'], s['max_test_accuracy'],
                   s['steps_to_baseline_max'],
                   f'{s["median_drift"]:+.3f} / {s["median_jitter"]:.3f}',
                   f'{s["spread_drift"]:+.3f} / {s["spread_jitter"]:.3f}'])
    else:
      rows.append([net, s['status']] + [None] * 5)
  lines.append(experiment.markdown_table(
      ['network', 'status', 'final test acc', 'max test acc', 'steps to baseline max',
       'median drift / jitter', 'p15..p85 spread drift / jitter'], rows))
  if 'from_step' in summary['bn']:
    lines.append(f'\n(drift and jitter from step {summary["bn"]["from_step"]}, the end of '
                 'the first tenth of training)\n')
  for c in summary['claims']:
    lines.append(f'- {"holds" if c["holds"] else "does not hold"}: {c["claim"]}; '
                 f'{c["numbers"]}')
  return '\n'.join(lines)


def plot(summary: dict):
  """(a) test accuracy; (b) baseline and (c) BN sigmoid input percentiles, one y-scale."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, axes = experiment.figure(3, width=5.0)
  for net in NETWORKS:
    acc = np.asarray(summary[net]['test_accuracy'])
    if len(acc):
      axes[0].plot(acc[:, 0], acc[:, 1], color=experiment.COLORS[net], label=LABELS[net])
  axes[0].set_title('(a) test accuracy')
  axes[0].set_ylabel('test accuracy')
  axes[0].set_ylim(0.0, 1.0)
  axes[0].legend(loc='lower right')
  pct = {net: np.asarray(summary[net]['percentiles']) for net in NETWORKS}
  shown = [p[:, 1:] for p in pct.values() if len(p) and p.shape[1] > 1]
  lo = min((p.min() for p in shown), default=-1.0)
  hi = max((p.max() for p in shown), default=1.0)
  pad = 0.05 * (hi - lo + 1e-6)
  qs = summary['probe'].get('percentiles') or ()
  for ax, net, title in ((axes[1], 'baseline', '(b) without BN'),
                         (axes[2], 'bn', '(c) with BN')):
    p = pct[net]
    if len(p) and p.shape[1] == 4:
      ax.fill_between(p[:, 0], p[:, 1], p[:, 3], color=experiment.COLORS[net], alpha=0.2)
    if len(p):
      for j, q in enumerate(qs, 1):
        middle = j == (len(qs) + 1) // 2
        ax.plot(p[:, 0], p[:, j], '-' if middle else '--', color=experiment.COLORS[net],
                label=f'{q:g}th percentile')
      ax.legend(loc='best', fontsize='small')
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(f'{title}: input to one sigmoid')
    ax.set_ylabel('sigmoid input (last hidden layer)')
  for ax in axes:
    ax.set_xlabel('training step')
    ax.grid(alpha=0.3)
  data = summary['data']
  name = data.get('display_name') or data.get('dataset') or '?'
  title = f'Figure 1 reproduction on {name} (train / test)'
  if data.get('is_mnist_sample'):
    title += ' - the 5,000-image MNIST sample, NOT full MNIST'
  fig.suptitle(title)
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
