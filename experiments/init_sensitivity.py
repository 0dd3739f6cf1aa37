r"""Claim: BN makes training "less careful about initialisation" (abstract; seed notes).

    python -m experiments.init_sensitivity --workdir=runs/claims/init

The Figure 1 MLP (3 x 100 sigmoid, batch 60, momentum 0.9 at 0.05), with and without
BN, with every dense kernel drawn from N(0, stddev^2) for each stddev of `--stddevs`
(default 1e-3, 1e-2, 0.1, 0.5, 1, 2). Each network's stddevs and seeds are the vmapped
members of one program. Per network and stddev: the final held-out accuracy (mean over
seeds) and the first evaluation step at which the seed-mean accuracy reaches TARGET.

The claim holds if BN's working range (the stddevs whose final accuracy is within
WITHIN of the best final accuracy of either network) covers every stddev the
baseline's covers and at least two more.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bn_research import checks
from bn_research import experiment
from experiments import claims

NETWORKS = ('bn', 'baseline')
STDDEVS = (1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0)
STEPS, EVAL_EVERY, SEEDS = 4000, 250, 1
TARGET = 0.85     # held-out accuracy that counts as trained (MNIST sample)
WITHIN = 0.03     # "within a few points"

NAME = 'init_sensitivity'
WORKDIR = 'runs/claims/init'
HOW, PARALLEL = 'vmap', 1
FLAGS = {
    **claims.common_flags(STEPS, EVAL_EVERY, SEEDS, 'mnist', tuple(claims.MLP_DATA)),
    'stddevs': experiment.Flag('floats', STDDEVS, 'Init stddevs of the dense kernels.',
                               checks.Float(0.0, low_open=True)),
}


def _name(network: str, stddev: float, seed: int) -> str:
  return f'{network}_std{stddev:g}_seed{seed}'


def plan(args) -> list:
  return [claims.mlp_run(_name(network, stddev, seed), args, network, data=args.data,
                         overrides={'model.init_stddev': float(stddev), 'seed': seed,
                                    'measure.every_steps': 0},
                         params=('model.init_stddev', 'seed'))
          for network in NETWORKS for stddev in args.stddevs for seed in range(args.seeds)]


def summarize(records, args) -> dict:
  from bn_research.analysis import curves  # pylint: disable=g-import-not-at-top
  runs = claims.by_name(records)
  stddevs = list(args.stddevs)
  seeds = range(args.seeds)
  out: dict = {'stddevs': stddevs, 'seeds': len(seeds), 'target': TARGET, 'within': WITHIN,
               'networks': {}}
  for network in NETWORKS:
    rows = []
    for stddev in stddevs:
      per_seed = [runs[_name(network, stddev, s)] for s in seeds]
      curve = curves.mean_curve([tuple(zip(*r.curve('eval_accuracy'))) for r in per_seed])
      steps, acc = curve
      rows.append({'stddev': stddev, 'final_accuracy': acc[-1] if acc else None,
                   'steps_to_target': curves.steps_to_target(steps, acc, TARGET),
                   'status': [claims.status(r) for r in per_seed],
                   'curve': [list(p) for p in zip(steps, acc)]})
    out['networks'][network] = rows
  best = max(r['final_accuracy'] or 0.0 for rows in out['networks'].values() for r in rows)
  out['best_final_accuracy'] = best
  working = {n: [r['stddev'] for r in rows if (r['final_accuracy'] or 0.0) >= best - WITHIN]
             for n, rows in out['networks'].items()}
  out['working_range'] = working
  out['claims'] = [judge(working, stddevs)]
  return out


def judge(working: Mapping[str, list], stddevs: list) -> dict:
  """The claim's rule on the working ranges (see the module docstring)."""
  bn, base = set(working['bn']), set(working['baseline'])
  holds = base <= bn and len(bn) >= len(base) + 2
  return claims.verdict_row(
      'BN trains well over a much wider range of init stddevs than the baseline',
      'less careful about initialisation',
      f'within {WITHIN:g} of the best: BN at {sorted(bn) or "none"}, baseline at '
      f'{sorted(base) or "none"} (of {stddevs})', holds)


def table(summary: dict) -> str:
  lines = [f'{summary["seeds"]} seed(s); target {summary["target"]:g}; best final '
           f'accuracy {summary["best_final_accuracy"]:.3f}.', '',
           '| init stddev | BN final | BN steps to target | baseline final | '
           'baseline steps to target |', '|---:|---:|---:|---:|---:|']
  bn, base = summary['networks']['bn'], summary['networks']['baseline']
  for a, b in zip(bn, base):
    lines.append(f'| {a["stddev"]:g} | {claims.fmt(a["final_accuracy"])} | '
                 f'{claims.fmt(a["steps_to_target"])} | {claims.fmt(b["final_accuracy"])} | '
                 f'{claims.fmt(b["steps_to_target"])} |')
  return claims.with_verdicts(lines, summary)


def plot(summary: dict):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  for network in NETWORKS:
    color = experiment.COLORS[network]
    rows = summary['networks'][network]
    ax0.plot([r['stddev'] for r in rows], [r['final_accuracy'] for r in rows], 'o-',
             color=color, label=network)
    for r, alpha in zip(rows, np.linspace(0.3, 1.0, len(rows))):
      if r['curve']:
        s, a = zip(*r['curve'])
        ax1.plot(s, a, color=color, alpha=alpha,
                 label=f'{network} {r["stddev"]:g}' if network == 'bn' or r is rows[-1] else None)
  ax0.set(xscale='log', xlabel='init stddev', ylabel='final held-out accuracy',
          title='final accuracy vs init stddev')
  ax0.axhline(summary['best_final_accuracy'] - summary['within'], color='gray', ls=':')
  ax0.legend()
  ax1.set(xlabel='step', ylabel='held-out accuracy',
          title='accuracy over training (darker: larger stddev)')
  ax1.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
