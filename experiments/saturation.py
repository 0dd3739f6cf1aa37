r"""Claim: BN keeps the sigmoids out of their saturated regime (Section 3; seed 001).

    python -m experiments.saturation --workdir=runs/claims/saturation

The Figure 1 MLP with and without BN, on the offline MNIST sample and on Fashion-MNIST
(Debian's IDX files; `--data` picks one). Every `--eval_every` steps the engine
measures, on that step's mini-batch in training mode, each hidden layer's sigmoid
inputs: the fraction with |x| > 2 and |x| > 4 (where the sigmoid's derivative is below
0.105 and 0.018, against 0.25 at 0) and their histogram (`measure.saturation`).

The claim holds on a dataset if the baseline's fraction beyond |x| > 2, averaged over
the hidden layers at the last measurement, is above BN's.
"""

from __future__ import annotations

import numpy as np

from bn_research import experiment
from experiments import claims

NETWORKS = ('bn', 'baseline')
DATASETS = ('mnist', 'fashion_mnist')
STEPS, EVAL_EVERY = 4000, 250
THRESHOLDS = ('2', '4')

NAME = 'saturation'
WORKDIR = 'runs/claims/saturation'
HOW, PARALLEL = 'vmap', 1
FLAGS = claims.common_flags(STEPS, EVAL_EVERY, 1, None, tuple(claims.MLP_DATA))


def _datasets(args) -> tuple[str, ...]:
  return (args.data,) if args.data else DATASETS


def plan(args) -> list:
  return [claims.mlp_run(f'{data}_{network}', args, network, data=data,
                         overrides={'measure.saturation': True})
          for data in _datasets(args) for network in NETWORKS]


def _histograms(run, layer: str) -> dict:
  """{step: [fractions per bin]} of one layer's histogram rows, and the bin edges."""
  from bn_research import measure  # pylint: disable=g-import-not-at-top
  edges = list(measure.HIST_EDGES)
  keys = [f'input_hist/{layer}/{lo:g}' for lo in edges[:-1]]
  rows = {r['step']: [r[k] for k in keys] for r in run.metrics if keys[0] in r}
  return {'edges': edges, 'steps': sorted(rows), 'fractions': [rows[s] for s in sorted(rows)]}


def summarize(records, args) -> dict:
  runs = claims.by_name(records)
  out: dict = {'datasets': {}}
  rows = []
  for data in _datasets(args):
    per = {}
    for network in NETWORKS:
      run = runs[f'{data}_{network}']
      layers = sorted({k.split('/', 1)[1] for row in run.metrics for k in row
                       if k.startswith('saturation_2/')})
      s = {'status': claims.status(run), 'layers': layers,
           'eval_accuracy': run.curve('eval_accuracy')}
      for t in THRESHOLDS:
        s[f'saturation_{t}'] = {layer: run.curve(f'saturation_{t}/{layer}')
                                for layer in layers}
        finals = [v[-1][1] for v in s[f'saturation_{t}'].values() if v]
        s[f'final_saturation_{t}'] = float(np.mean(finals)) if finals else None
      hist = _histograms(run, layers[-1]) if layers else None
      if hist and hist['steps']:
        # Three moments: the first measurement, the middle one and the last.
        pick = sorted({0, len(hist['steps']) // 2, len(hist['steps']) - 1})
        hist = {'layer': layers[-1], 'edges': hist['edges'],
                'steps': [hist['steps'][i] for i in pick],
                'fractions': [hist['fractions'][i] for i in pick]}
      s['histogram'] = hist
      s['final_eval_accuracy'] = s['eval_accuracy'][-1][1] if s['eval_accuracy'] else None
      per[network] = s
    out['datasets'][data] = per
    bn, base = per['bn']['final_saturation_2'], per['baseline']['final_saturation_2']
    rows.append(claims.verdict_row(
        f'{data}: fewer saturated sigmoid inputs with BN',
        'BN keeps the nonlinearities out of the saturated regime',
        f'abs(x) > 2 at the end (mean over layers): BN {claims.fmt(bn)}, baseline '
        f'{claims.fmt(base)}', None if bn is None or base is None else base > bn))
  out['claims'] = rows
  return out


def table(summary: dict) -> str:
  lines = ['Fractions of sigmoid inputs at the last measurement, mean over the hidden '
           'layers.', '', '| data | network | abs(x) > 2 | abs(x) > 4 | final accuracy |',
           '|---|---|---:|---:|---:|']
  for data, per in summary['datasets'].items():
    for network, s in per.items():
      lines.append(f'| {data} | {network} | {claims.fmt(s["final_saturation_2"])} | '
                   f'{claims.fmt(s["final_saturation_4"])} | '
                   f'{claims.fmt(s["final_eval_accuracy"])} |')
  return claims.with_verdicts(lines, summary)


def plot(summary: dict):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  datasets = list(summary['datasets'])
  fig, axes = plt.subplots(len(datasets), 4, figsize=(17, 3.6 * len(datasets)), squeeze=False)
  for row, data in zip(axes, datasets):
    per = summary['datasets'][data]
    for network, s in per.items():
      color = experiment.COLORS[network]
      for layer, style in zip(s['layers'], ('-', '--', ':')):
        if s['saturation_2'][layer]:
          x, y = zip(*s['saturation_2'][layer])
          row[0].plot(x, y, style, color=color, label=f'{network} {layer}')
      hist = s['histogram']
      if not hist:
        continue
      centers = np.asarray(hist['edges'][:-1]) + 0.5
      for ax, step, frac in zip(row[1:], hist['steps'], hist['fractions']):
        ax.step(centers, frac, where='mid', color=color, label=network)
        ax.set(title=f'{data}: {hist["layer"]} inputs at step {step}', xlabel='sigmoid input')
    row[0].set(title=f'{data}: fraction with |x| > 2', xlabel='step')
    row[0].legend(fontsize=7)
    for ax in row[1:]:
      ax.axvspan(-2, 2, color='gray', alpha=0.1)
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
