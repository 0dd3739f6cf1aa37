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

Writes DIR/why_bn.png (accuracy; ICS per layer, l2 and cosine; loss and gradient-change
bands over training; beta-smoothness) and DIR/why_bn.json (the series and their means
per network), run directories DIR/<network>.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments import cli

FLAGS = flags.FLAGS

# network -> model.normalizer
NETWORKS = {'bn': 'batch_norm', 'noisy_bn': 'noisy_batch_norm', 'baseline': 'none'}
MODELS = ('mlp', 'inception')
LANDSCAPE_KEYS = ('landscape_loss_min', 'landscape_loss_max', 'landscape_loss_range',
                  'landscape_grad_pred_min', 'landscape_grad_pred', 'landscape_beta')


def _define_flags() -> None:
  """Defined when run as a program, so that tests can import several experiments."""
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_enum('model', 'mlp', MODELS, 'The Figure 1 MLP or the small BN-Inception.')
  flags.DEFINE_list('networks', list(NETWORKS), 'Which of bn, noisy_bn, baseline to train.')
  flags.DEFINE_integer('steps', 5000, 'Training steps per network.')
  flags.DEFINE_integer('measure_every', 250, 'Steps between measurements (and evals).')
  flags.DEFINE_list('etas', ['0.01', '0.02', '0.05', '0.1', '0.2', '0.4'],
                    'Step sizes along the gradient for the landscape.')
  flags.DEFINE_string('data', None, 'MLP: a data.source (default auto: MNIST if prepared, '
                      'else the offline sample; synthetic for tests). Inception: '
                      'fashion_mnist (default), digits or synthetic.')
  flags.DEFINE_multi_string('set', [], 'Config override for every network, e.g. '
                            '--set=optimizer.learning_rate=0.5 (repeatable).')
  flags.DEFINE_bool('overwrite', False, 'Passed on to every run.')


def _override(c, assignment: str) -> None:
  """Applies 'a.b=value' to config c, typed as the field is (`plan.set_value`)."""
  from bn_research import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from bn_research import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  key, eq, text = assignment.partition('=')
  if not eq:
    raise ValueError(f'--set={assignment!r}: expected key=value.')
  try:
    plan_lib.set_value(c, key, sweep_lib.parse_value(text))
  except ValueError as e:
    raise ValueError(f'--set={assignment!r}: {e}') from None


def network_config(network: str, *, model: str = 'mlp', steps: int = 5000,
                   measure_every: int = 250, etas: Sequence[float] = (0.05, 0.1, 0.2),
                   data: Optional[str] = None, overrides: Sequence[str] = ()):
  """The config of one network; validated (ValueError names the bad value)."""
  from bn_research import config as config_lib  # pylint: disable=g-import-not-at-top
  if model == 'mlp':
    from configs import mnist_mlp  # pylint: disable=g-import-not-at-top
    c = mnist_mlp.get_config('bn' + (f',source={data}' if data else ''))
    c.steps_per_dispatch = measure_every
  else:
    from configs import inception_small  # pylint: disable=g-import-not-at-top
    c = inception_small.get_config(f'model=bn_baseline,data={data or "fashion_mnist"}')
    c.update_from_flattened_dict(inception_small.STUDY_RECIPE)
  c.model.normalizer = NETWORKS[network]
  c.num_train_steps = steps
  c.eval_every_steps = c.log_every_steps = measure_every
  c.checkpoint_every_steps = steps
  c.measure.every_steps = measure_every
  c.measure.etas = tuple(float(e) for e in etas)
  for assignment in overrides:
    _override(c, assignment)
  config_lib.validate_config(c)
  return c


def run(workdir: str, *, networks: Sequence[str] = tuple(NETWORKS), overwrite: bool = False,
        **kwargs) -> dict:
  """Trains the networks, then writes why_bn.json and why_bn.png; returns the summary."""
  t0 = time.time()
  configs = {net: network_config(net, **kwargs) for net in networks}
  from bn_research import train  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  os.makedirs(workdir, exist_ok=True)
  for net, c in configs.items():
    logging.info('training %s (%s): %d steps, measuring every %d', net,
                 c.model.normalizer, c.num_train_steps, c.measure.every_steps)
    train.train_and_evaluate(c, os.path.join(workdir, net), overwrite=overwrite)
  summary = summarize(workdir, list(configs))
  summary.update(model=kwargs.get('model', 'mlp'),
                 etas=list(next(iter(configs.values())).measure.etas),
                 wall_seconds=round(time.time() - t0, 1))
  with open(os.path.join(workdir, 'why_bn.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  plot(summary, os.path.join(workdir, 'why_bn.png'))
  return summary


def summarize_network(run) -> dict:
  """The measurement series of one run and their means over training."""
  from bn_research.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  keys = {k for row in run.metrics for k in row}
  # Layers in the order the model lists them (first row that has them).
  layers = next(([k.split('/', 1)[1] for k in row if k.startswith('ics_l2/')]
                 for row in run.metrics if any(k.startswith('ics_l2/') for k in row)), [])
  out = {'status': (run.status or {}).get('status'), 'layers': layers}
  series = lambda metric: [list(p) for p in zip(*runs_lib.metric_series(run, metric))]
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


def summarize(workdir: str, networks: Sequence[str]) -> dict:
  from bn_research.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  out = {net: summarize_network(runs_lib.load_run(os.path.join(workdir, net)))
         for net in networks}
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
  return out


def _lower(a: dict, b: dict, key: str) -> Optional[bool]:
  if key not in a or key not in b:
    return None
  return bool(a[key] < b[key])


def plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  networks = [n for n in NETWORKS if n in summary]
  from bn_research.experiment import COLORS as colors  # pylint: disable=g-import-not-at-top
  labels = {'bn': 'BN', 'noisy_bn': 'noisy BN', 'baseline': 'no BN'}
  fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
  ax = axes[0, 0]
  for net in networks:
    acc = np.asarray(summary[net]['eval_accuracy'])
    if len(acc):
      ax.plot(acc[:, 0], acc[:, 1], color=colors[net], label=labels[net])
  ax.set_title('(a) test accuracy')
  ax.legend()
  for ax, kind, title in ((axes[0, 1], 'l2', '(b) ICS ||G - G\'||, mean over training'),
                          (axes[0, 2], 'cos', "(c) ICS cos(G, G'), mean over training")):
    layers = summary[networks[0]]['layers'] if networks else []
    width = 0.8 / max(len(networks), 1)
    for i, net in enumerate(networks):
      means = summary[net][f'mean_ics_{kind}']
      ax.bar(np.arange(len(layers)) + i * width, [means.get(l, np.nan) for l in layers],
             width, color=colors[net], label=labels[net])
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
                        label=labels[net])
    ax.set_title(title)
    ax.set_yscale('log')
    ax.legend()
  ax = axes[1, 2]
  for net in networks:
    if 'landscape_beta' in summary[net]:
      b = np.asarray(summary[net]['landscape_beta'])
      ax.plot(b[:, 0], b[:, 1], color=colors[net], label=labels[net])
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
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_flags() -> dict:
  cli.check_workdir(FLAGS.workdir)
  unknown = [n for n in FLAGS.networks if n not in NETWORKS]
  if unknown or not FLAGS.networks:
    raise ValueError(f'--networks={",".join(FLAGS.networks)!r}; allowed: '
                     f'{", ".join(NETWORKS)}.')
  try:
    etas = [float(e) for e in FLAGS.etas]
  except ValueError:
    raise ValueError(f'--etas={",".join(FLAGS.etas)!r}: expected numbers.') from None
  kwargs = dict(model=FLAGS.model, steps=FLAGS.steps, measure_every=FLAGS.measure_every,
                etas=etas, data=FLAGS.data, overrides=FLAGS.set)
  for net in FLAGS.networks:
    network_config(net, **kwargs)  # each config's own checks, before any work
  return dict(networks=FLAGS.networks, **kwargs)


def main(argv: Sequence[str]) -> None:
  kwargs = cli.parse_or_exit('why_bn', argv, parse_flags)
  logging.set_verbosity(logging.INFO)
  with cli.one_line_errors('why_bn'):
    summary = run(FLAGS.workdir, overwrite=FLAGS.overwrite, **kwargs)
  for net in kwargs['networks']:
    s = summary[net]
    print(f'{net:<9} final test acc {s["final_eval_accuracy"]}  mean ICS l2 '
          + ', '.join(f'{l} {v:.3g}' for l, v in s['mean_ics_l2'].items())
          + f'  loss range {s.get("mean_landscape_loss_range", float("nan")):.3g}'
          f'  grad pred {s.get("mean_landscape_grad_pred", float("nan")):.3g}'
          f'  beta {s.get("mean_landscape_beta", float("nan")):.3g}')
  print(f'wrote {FLAGS.workdir}/why_bn.png and why_bn.json in {summary["wall_seconds"]} s')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
