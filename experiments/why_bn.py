r"""Why BN helps (Santurkar et al. 2018): internal covariate shift and the loss landscape.

    python -m experiments.why_bn --workdir=runs/why_bn
    python -m experiments.why_bn --workdir=runs/why_bn_inception --model=inception

Trains three versions of the Figure 1 MLP (`configs/mnist_mlp.py`; with --model=inception
the small BN-Inception of `configs/inception_small.py`), identical except for the
normalizer: BN (`batch_norm`), noisy BN (`noisy_batch_norm`: BN followed by a random
per-unit affine distortion that changes every step) and none (`baseline`). Every
`--measure_every` steps the engine measures, on that step's mini-batch
(`bn_research/measure.py`, config keys `measure.*`):

* internal covariate shift per layer, their Definition 2.1: ||G - G'||_2 and
  cos(G, G'), G the gradient of the loss w.r.t. the layer's parameters before step t's
  update, G' the same after the layers below it took that update;
* the loss landscape along the gradient at step sizes `--etas`: the loss range, the
  gradient predictiveness (the change in gradient) and the effective beta-smoothness.

Flags: --networks (a subset of bn, noisy_bn, baseline), --steps, --measure_every,
--etas, --data (MLP: a data.source; Inception: fashion_mnist, digits or synthetic),
--set=KEY=VALUE for every network. Writes run directories DIR/<network> (re-running
skips finished ones), then DIR/why_bn.png (accuracy; ICS per layer, l2 and cosine; loss
and gradient-change bands over training; beta-smoothness), DIR/why_bn.json (the series
and their means per network) and DIR/why_bn.md (the means as a table).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from bn_research import checks
from bn_research import experiment
from bn_research import plan as plan_lib

# network -> model.normalizer
NETWORKS = {'bn': 'batch_norm', 'noisy_bn': 'noisy_batch_norm', 'baseline': 'none'}
LABELS = {'bn': 'BN', 'noisy_bn': 'noisy BN', 'baseline': 'no BN'}
MODELS = ('mlp', 'inception')
# What --data may name, per model (the MLP's data.source; the Inception config's data=).
DATA = {'mlp': ('auto', 'tfds', 'idx', 'download', 'offline', 'synthetic'),
        'inception': ('fashion_mnist', 'digits', 'synthetic')}
LANDSCAPE_KEYS = ('landscape_loss_min', 'landscape_loss_max', 'landscape_loss_range',
                  'landscape_grad_pred_min', 'landscape_grad_pred', 'landscape_beta')

NAME = 'why_bn'
WORKDIR = 'runs/why_bn'
HOW, PARALLEL = 'inline', 1
FLAGS = {
    'model': experiment.Flag(str, 'mlp', 'The Figure 1 MLP or the small BN-Inception.',
                             checks.Choice(MODELS)),
    'networks': experiment.Flag('strs', tuple(NETWORKS), 'Which of bn, noisy_bn, baseline '
                                'to train.', checks.Choice(tuple(NETWORKS))),
    'steps': experiment.Flag(int, 5000, 'Training steps per network.', checks.Int(1)),
    'measure_every': experiment.Flag(int, 250, 'Steps between measurements (and evals).',
                                     checks.Int(1)),
    'etas': experiment.Flag('floats', (0.01, 0.02, 0.05, 0.1, 0.2, 0.4), 'Step sizes along '
                            'the gradient for the landscape.',
                            checks.Float(0.0, low_open=True)),
    'data': experiment.Flag(str, None, 'MLP: a data.source (default auto: MNIST if '
                            'prepared, else the offline sample; synthetic for tests). '
                            'Inception: fashion_mnist (default), digits or synthetic.'),
}


def network_run(network: str, args) -> plan_lib.Run:
  """The run of one network in DIR/<network>: the model's config with its normalizer
  and the measurement cadence, then --set; validated (ValueError names the bad value)."""
  from bn_research import launch  # pylint: disable=g-import-not-at-top
  if args.data is not None and args.data not in DATA[args.model]:
    raise ValueError(f'--data={args.data!r} is invalid for --model={args.model}: must be '
                     f'one of {", ".join(DATA[args.model])}.')
  every = args.measure_every
  overrides = {'model.normalizer': NETWORKS[network], 'num_train_steps': args.steps,
               'eval_every_steps': every, 'log_every_steps': every,
               'checkpoint_every_steps': args.steps, 'measure.every_steps': every,
               'measure.etas': tuple(args.etas)}
  if args.model == 'mlp':
    spec = 'mnist_mlp.py:bn' + (f',source={args.data}' if args.data else '')
    overrides['steps_per_dispatch'] = every
  else:
    from configs import inception_small  # pylint: disable=g-import-not-at-top
    spec = f'inception_small.py:model=bn_baseline,data={args.data or "fashion_mnist"}'
    overrides = {**inception_small.STUDY_RECIPE, **overrides}
  return plan_lib.make_run(network, os.path.join(args.workdir, network),
                           os.path.join(launch.REPO, 'configs', spec),
                           {**overrides, **args.overrides})


def plan(args) -> list[plan_lib.Run]:
  """One run per network, identical but for the normalizer."""
  return [network_run(net, args) for net in args.networks]


def summarize_network(run: experiment.RunRecord) -> dict:
  """The measurement series of one run and their means over training."""
  keys = {k for row in run.metrics for k in row}
  # Layers in the order the model lists them (first row that has them).
  layers = next(([k.split('/', 1)[1] for k in row if k.startswith('ics_l2/')]
                 for row in run.metrics if any(k.startswith('ics_l2/') for k in row)), [])
  out = {'status': run.status.get('status'), 'layers': layers}
  series = run.curve
  out['eval_accuracy'] = series('eval_accuracy')
  out['final_eval_accuracy'] = out['eval_accuracy'][-1][1] if out['eval_accuracy'] else None
  for kind in ('l2', 'cos', 'rel'):
    out[f'ics_{kind}'] = {layer: series(f'ics_{kind}/{layer}') for layer in layers}
    out[f'mean_ics_{kind}'] = {layer: float(np.mean([v for _, v in s]))
                               for layer, s in out[f'ics_{kind}'].items() if s}
  for key in LANDSCAPE_KEYS:
    if key in keys:
      out[key] = series(key)
      out[f'mean_{key}'] = float(np.mean([v for _, v in out[key]]))
  return out


def summarize(records: Sequence[experiment.RunRecord], args) -> dict:
  """Per network its series and means; BN against the baseline where both ran."""
  out = {r.name: summarize_network(r) for r in records}
  if 'bn' in out and 'baseline' in out:
    bn, base = out['bn'], out['baseline']
    # Layer 1 has no shift by definition; compare the layers above it.
    shared = [l for l in bn['mean_ics_l2'] if l in base['mean_ics_l2']][1:]
    out['comparison'] = {
        'layers_where_bn_ics_l2_is_lower': [
            l for l in shared if bn['mean_ics_l2'][l] < base['mean_ics_l2'][l]],
        'layers_where_bn_ics_rel_is_lower': [
            l for l in shared if l in bn['mean_ics_rel'] and l in base['mean_ics_rel']
            and bn['mean_ics_rel'][l] < base['mean_ics_rel'][l]],
        'layers_compared': shared,
        'bn_loss_range_lower': _lower(bn, base, 'mean_landscape_loss_range'),
        'bn_grad_pred_lower': _lower(bn, base, 'mean_landscape_grad_pred'),
        'bn_beta_lower': _lower(bn, base, 'mean_landscape_beta'),
    }
  out.update(model=args.model, etas=list(args.etas))
  return out


def _lower(a: dict, b: dict, key: str) -> Optional[bool]:
  if key not in a or key not in b:
    return None
  return bool(a[key] < b[key])


def table(summary: dict) -> str:
  """Per network: final test accuracy, mean ICS (l2) per layer and the landscape means."""
  networks = [n for n in NETWORKS if n in summary]
  layers = summary[networks[0]]['layers'] if networks else []
  rows = []
  for net in networks:
    s = summary[net]
    rows.append([LABELS[net], s['final_eval_accuracy'],
                 *[s['mean_ics_l2'].get(l) for l in layers],
                 *[s.get(f'mean_{k}') for k in ('landscape_loss_range',
                                                'landscape_grad_pred', 'landscape_beta')]])
  text = experiment.markdown_table(
      ['network', 'final test accuracy', *[f'mean ICS l2 {l}' for l in layers],
       'mean loss range', 'mean gradient change', 'mean beta'], rows)
  c = summary.get('comparison')
  if c:
    text += (f'\n\nBN has the lower ICS (l2) in {len(c["layers_where_bn_ics_l2_is_lower"])} '
             f'of the {len(c["layers_compared"])} layers above the first; lower loss '
             f'range: {c["bn_loss_range_lower"]}, lower gradient change: '
             f'{c["bn_grad_pred_lower"]}, lower beta: {c["bn_beta_lower"]}.')
  return text


def plot(summary: dict):
  """Accuracy, ICS per layer, the landscape bands and beta-smoothness per network."""
  networks = [n for n in NETWORKS if n in summary]
  colors = experiment.COLORS
  fig, axes = experiment.figure(3, width=16 / 3, height=8.5 / 2, nrows=2)
  ax = axes[0, 0]
  for net in networks:
    acc = np.asarray(summary[net]['eval_accuracy'])
    if len(acc):
      ax.plot(acc[:, 0], acc[:, 1], color=colors[net], label=LABELS[net])
  ax.set_title('(a) test accuracy')
  ax.legend()
  for ax, kind, title in ((axes[0, 1], 'l2', '(b) ICS ||G - G\'||, mean over training'),
                          (axes[0, 2], 'cos', "(c) ICS cos(G, G'), mean over training")):
    layers = summary[networks[0]]['layers'] if networks else []
    width = 0.8 / max(len(networks), 1)
    for i, net in enumerate(networks):
      means = summary[net][f'mean_ics_{kind}']
      ax.bar(np.arange(len(layers)) + i * width, [means.get(l, np.nan) for l in layers],
             width, color=colors[net], label=LABELS[net])
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=45,
                  ha='right', fontsize=8)
    ax.set_title(title)
    if kind == 'l2':
      ax.set_yscale('log')
  for ax, (lo, hi), title in (
      (axes[1, 0], ('landscape_loss_min', 'landscape_loss_max'),
       '(d) loss along the gradient, over the step sizes'),
      (axes[1, 1], ('landscape_grad_pred_min', 'landscape_grad_pred'),
       "(e) gradient predictiveness ||grad L(w - eta g) - g||")):
    for net in networks:
      s = summary[net]
      if lo in s and hi in s:
        a, b = np.asarray(s[lo]), np.asarray(s[hi])
        ax.fill_between(a[:, 0], a[:, 1], b[:, 1], color=colors[net], alpha=0.3,
                        label=LABELS[net])
    ax.set_title(title)
    ax.set_yscale('log')
    ax.legend()
  ax = axes[1, 2]
  for net in networks:
    if 'landscape_beta' in summary[net]:
      b = np.asarray(summary[net]['landscape_beta'])
      ax.plot(b[:, 0], b[:, 1], color=colors[net], label=LABELS[net])
  ax.set_title('(f) effective beta-smoothness')
  ax.set_yscale('log')
  ax.legend()
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  for ax in (axes[0, 0], *axes[1]):
    ax.set_xlabel('training step')
  fig.suptitle(f'Why BN helps, measured (Santurkar et al. 2018) on the '
               f'{summary.get("model", "mlp")}')
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
