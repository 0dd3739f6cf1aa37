r"""Training only BN's gamma and beta (Frankle et al. 2021) vs the full network.

    python -m experiments.bn_only --workdir=runs/bn_only [--steps=N] [--models=mlp,inception]

For each network (the BN MLP of Figure 1 at batch 64 on the offline MNIST sample, and
the width-1/8 BN-Inception of configs/inception_small.py on Fashion-MNIST; the same
recipes as `experiments.bn_batch_size`) two runs from the same random initialisation:

    full      every parameter trains (optimizer.trainable=all)
    bn_only   only BN's scale and bias train; every kernel, the classifier and its bias
              stay bitwise at their random init (optimizer.trainable=batch_norm)

The frozen random network, the chance floor, is that same initialisation untrained:
the runs' step-0 evaluation. Writes DIR/<model>/{full,bn_only} in the engine's format
(re-running skips finished runs), then

    DIR/bn_only.png    test accuracy vs step for both runs of each network, with the
                       frozen random network and chance marked
    DIR/bn_only.json   {"rows": [{model, variant, trainable_params, total_params,
                       final_test_accuracy, status}], ...}
    DIR/bn_only.md     the same as a table
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from experiments import normalizer_runs as nr

VARIANTS = {'full': 'all', 'bn_only': 'batch_norm'}
LABELS = {'full': 'all parameters trained', 'bn_only': 'only BN gamma, beta trained',
          'random': 'frozen random network (step 0)'}
DEFAULT_STEPS = 1000
CONTROLLED = ('num_train_steps', 'model.normalizer', 'optimizer.trainable')
NUM_CLASSES = 10


def plan(model: str, steps: int, data: str, extra: Sequence[str] = ()) -> list[nr.RunSpec]:
  spec, base = nr.model_spec(model, steps, data)
  return [nr.RunSpec(v, spec, base + list(extra) + ['model.normalizer=batch_norm',
                                                    f'optimizer.trainable={t}'])
          for v, t in VARIANTS.items()]


def summarize(root: str, planned: dict) -> dict:
  rows, curves = [], {}
  for model, runs in planned.items():
    for run in runs:
      result = nr.read_result(os.path.join(root, model, run.name), count_params=True)
      total = result['num_params']
      rows.append({'model': model, 'variant': run.name,
                   'trainable_params': total if run.name == 'full' else result['normalizer_params'],
                   'total_params': total,
                   'final_test_accuracy': result['final_test_accuracy'],
                   'status': result['status']})
      curves[f'{model}/{run.name}'] = [[s, a] for s, a in zip(result['steps'], result['test_accuracy'])]
      if run.name == 'bn_only':
        rows.append({'model': model, 'variant': 'random', 'trainable_params': 0,
                     'total_params': total,
                     'final_test_accuracy': result['initial_test_accuracy'],
                     'status': 'untrained'})
  return {'rows': rows, 'curves': curves, 'chance_accuracy': 1.0 / NUM_CLASSES}


def markdown(summary: dict) -> str:
  lines = [f'{summary["steps"]} steps per run; test accuracy at the last step.', '',
           '| network | what trains | trainable / total parameters | final test accuracy |',
           '|---|---|---:|---:|']
  for r in summary['rows']:
    acc = r['final_test_accuracy']
    lines.append(f'| {r["model"]} | {LABELS[r["variant"]]} | {r["trainable_params"]:,} / '
                 f'{r["total_params"] or 0:,} | '
                 + (f'{acc:.3f}' if acc is not None else r['status']) + ' |')
  lines += ['', f'Chance: {summary["chance_accuracy"]:.2f}.', '']
  return '\n'.join(lines)


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  models = sorted({r['model'] for r in summary['rows']}, key=nr.MODELS.index)
  fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
  for ax, model in zip(axes[0], models):
    for variant, color in (('full', 'tab:blue'), ('bn_only', 'tab:orange')):
      pts = summary['curves'].get(f'{model}/{variant}', [])
      ax.plot([s for s, _ in pts], [a for _, a in pts], 'o-', ms=3, color=color,
              label=LABELS[variant])
    random = [r for r in summary['rows'] if r['model'] == model and r['variant'] == 'random']
    if random and random[0]['final_test_accuracy'] is not None:
      ax.axhline(random[0]['final_test_accuracy'], color='tab:red', ls='--',
                 label=LABELS['random'])
    ax.axhline(summary['chance_accuracy'], color='gray', ls=':', label='chance')
    ax.set_ylim(0, 1)
    ax.set_xlabel('training step')
    ax.set_ylabel('test accuracy')
    ax.set_title(f'{model}: training only BN vs everything', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(root: str, *, steps: int = DEFAULT_STEPS, models: Sequence[str] = nr.MODELS,
        data: str = 'real', extra: Sequence[str] = ()) -> dict:
  """Trains both variants of every network (skipping finished runs), writes the summary."""
  t0 = time.time()
  planned = {m: plan(m, steps, data, extra) for m in models}
  nr.train_all(root, planned)
  summary = summarize(root, planned)
  summary.update(steps=steps, data=data, wall_seconds=round(time.time() - t0, 1))
  nr.write_summary(root, 'bn_only', summary, markdown, plot)
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  parser = nr.ArgumentParser(prog='python -m experiments.bn_only',
                             description=__doc__.split('\n\n')[0])
  nr.add_common_flags(parser, DEFAULT_STEPS)
  args = parser.parse_args(argv)
  models = nr.check_common_flags(parser, args, CONTROLLED)
  nr.run_job(parser, lambda: run(args.workdir, steps=args.steps, models=models,
                                  data=args.data, extra=args.set),
             'bn_only', markdown, args.workdir)


if __name__ == '__main__':
  main()
