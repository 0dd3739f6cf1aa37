r"""Training only BN's gamma and beta (Frankle et al. 2021) vs the full network.

    python -m experiments.bn_only --workdir=runs/bn_only [--steps=N] [--models=mlp,inception] \
        [--data=real|synthetic] [--set=KEY=VALUE ...]

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

from bn_research import experiment
from experiments import normalizer_runs as nr

VARIANTS = {'full': 'all', 'bn_only': 'batch_norm'}
LABELS = {'full': 'all parameters trained', 'bn_only': 'only BN gamma, beta trained',
          'random': 'frozen random network (step 0)'}
DEFAULT_STEPS = 1000
CONTROLLED = ('num_train_steps', 'model.normalizer', 'optimizer.trainable')
NUM_CLASSES = 10

NAME = 'bn_only'
WORKDIR = 'runs/bn_only'
HOW, PARALLEL = 'inline', 1
FLAGS = nr.common_flags(DEFAULT_STEPS)


def plan(args) -> list:
  """Both variants of every network, from the same initialisation."""
  nr.check_overrides(args.overrides, CONTROLLED)
  return [nr.make_run(args, model, variant, args.steps,
                      {'model.normalizer': 'batch_norm', 'optimizer.trainable': trainable})
          for model in args.models for variant, trainable in VARIANTS.items()]


def summarize(records, args) -> dict:
  rows, curves = [], {}
  for record in records:
    model, variant = nr.model_of(record), record.name
    result = nr.result(record, count_params=True)
    total = result['num_params']
    rows.append({'model': model, 'variant': variant,
                 'trainable_params': total if variant == 'full' else result['normalizer_params'],
                 'total_params': total,
                 'final_test_accuracy': result['final_test_accuracy'],
                 'status': result['status']})
    curves[f'{model}/{variant}'] = [[s, a] for s, a in zip(result['steps'],
                                                           result['test_accuracy'])]
    if variant == 'bn_only':
      rows.append({'model': model, 'variant': 'random', 'trainable_params': 0,
                   'total_params': total,
                   'final_test_accuracy': result['initial_test_accuracy'],
                   'status': 'untrained'})
  return {'rows': rows, 'curves': curves, 'chance_accuracy': 1.0 / NUM_CLASSES,
          'steps': args.steps, 'data': args.data}


def table(summary: dict) -> str:
  lines = [f'{summary["steps"]} steps per run; test accuracy at the last step.', '',
           '| network | what trains | trainable / total parameters | final test accuracy |',
           '|---|---|---:|---:|']
  for r in summary['rows']:
    acc = r['final_test_accuracy']
    lines.append(f'| {r["model"]} | {LABELS[r["variant"]]} | {r["trainable_params"]:,} / '
                 f'{r["total_params"] or 0:,} | '
                 + (f'{acc:.3f}' if acc is not None else r['status']) + ' |')
  lines += ['', f'Chance: {summary["chance_accuracy"]:.2f}.']
  return '\n'.join(lines)


def plot(summary: dict):
  """Test accuracy vs step of both variants, per network; the step-0 network and chance."""
  models = sorted({r['model'] for r in summary['rows']}, key=nr.MODELS.index)
  fig, axes = experiment.figure(len(models), width=5.5)
  for ax, model in zip(axes if len(models) > 1 else [axes], models):
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
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
