r"""Claim (Section 3.3): BN may keep the layer Jacobians' singular values close to 1.

    python -m experiments.jacobians --workdir=runs/claims/jacobians

The Figure 1 MLP with and without BN. Every `--eval_every` steps the engine takes, for
the first `measure.jacobian_examples` examples of that step's mini-batch, the Jacobian
of each hidden layer (its input -> the next layer's input, sigmoid included; BN's
statistics those of the mini-batch, held fixed) and its singular values
(`bn_research.measure`, `measure.jacobian`). Summarised per layer by their mean and by
their spread around 1, mean |log s| (0: all singular values 1).

Two rules: BN's spread, averaged over the hidden layers and over the measurements
after step 0, is below the baseline's (closer to 1); and it is below log 2 (a typical
singular value within a factor 2 of 1: close to 1). The sigmoid is part of each
layer's Jacobian and its derivative is at most 1/4, which pulls every singular value
down; that is the Jacobian the paper's layer is, input to input.
"""

from __future__ import annotations

import numpy as np

from bn_research import experiment
from experiments import claims

NETWORKS = ('bn', 'baseline')
STEPS, EVAL_EVERY = 4000, 250
STATS = ('mean', 'min', 'max', 'log_spread')

NAME = 'jacobians'
WORKDIR = 'runs/claims/jacobians'
HOW, PARALLEL = 'vmap', 1
FLAGS = claims.common_flags(STEPS, EVAL_EVERY, 1, 'mnist', tuple(claims.MLP_DATA))


def plan(args) -> list:
  return [claims.mlp_run(f'{network}_seed{seed}', args, network, data=args.data, seed=seed,
                         overrides={'measure.jacobian': True})
          for network in NETWORKS for seed in range(args.seeds)]


def layers_of(run) -> list[str]:
  return sorted({k.split('/', 1)[1] for row in run.metrics for k in row
                 if k.startswith('jacobian_sv_mean/')})


def summarize(records, args) -> dict:
  del args
  runs = claims.by_name(records)
  out: dict = {'networks': {}, 'stats': list(STATS)}
  for network in NETWORKS:
    run = runs[f'{network}_seed0']
    layers = layers_of(run)
    s = {'status': claims.status(run), 'layers': layers,
         'eval_accuracy': run.curve('eval_accuracy')}
    for stat in STATS:
      s[stat] = {layer: run.curve(f'jacobian_sv_{stat}/{layer}') for layer in layers}
    spread = [v for layer in layers for step, v in s['log_spread'][layer] if step > 0]
    s['mean_log_spread'] = float(np.mean(spread)) if spread else None
    s['final_log_spread'] = {layer: v[-1][1] for layer, v in s['log_spread'].items() if v}
    s['final_mean_sv'] = {layer: v[-1][1] for layer, v in s['mean'].items() if v}
    out['networks'][network] = s
  bn, base = out['networks']['bn'], out['networks']['baseline']
  holds = (None if bn['mean_log_spread'] is None or base['mean_log_spread'] is None
           else bn['mean_log_spread'] < base['mean_log_spread'])
  spread = bn['mean_log_spread']
  out['claims'] = [
      claims.verdict_row(
          'BN keeps the layer Jacobians\' singular values closer to 1 than the baseline',
          'BN may lead the layer Jacobians to have singular values close to 1',
          f'mean abs(log s) over layers and training: BN {claims.fmt(spread)}, '
          f'baseline {claims.fmt(base["mean_log_spread"])}', holds),
      claims.verdict_row(
          'with BN the singular values are close to 1 (mean abs(log s) below log 2)',
          'singular values close to 1',
          f'BN: mean abs(log s) {claims.fmt(spread)}, i.e. a typical factor '
          f'{claims.fmt(None if spread is None else float(np.exp(spread)))} away from 1',
          None if spread is None else spread < np.log(2.0))]
  return out


def table(summary: dict) -> str:
  lines = ['Singular values of each hidden layer\'s Jacobian at the last measurement.', '',
           '| network | layer | mean s | mean abs(log s) | over training: mean abs(log s), '
           'all layers |', '|---|---|---:|---:|---:|']
  for network, s in summary['networks'].items():
    for layer in s['layers']:
      lines.append(f'| {network} | {layer} | {claims.fmt(s["final_mean_sv"].get(layer))} | '
                   f'{claims.fmt(s["final_log_spread"].get(layer))} | '
                   f'{claims.fmt(s["mean_log_spread"])} |')
  return claims.with_verdicts(lines, summary)


def plot(summary: dict):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for network, s in summary['networks'].items():
    color = experiment.COLORS[network]
    for layer, style in zip(s['layers'], ('-', '--', ':', '-.')):
      for ax, stat in zip(axes, ('mean', 'log_spread')):
        if s[stat][layer]:
          x, y = zip(*s[stat][layer])
          ax.plot(x, y, style, color=color, label=f'{network} {layer}')
  axes[0].axhline(1.0, color='gray', lw=0.8)
  axes[0].set(yscale='log', title='mean singular value', xlabel='step')
  axes[1].set(title='spread around 1: mean |log s|', xlabel='step')
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
