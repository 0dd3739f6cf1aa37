r"""Claim (Section 2): normalising outside the gradient step makes the model blow up.

    python -m experiments.stats_gradient --workdir=runs/claims/stats_gradient

The Figure 1 MLP with a bias b in front of each normalizer (`model.pre_norm_bias`),
trained twice: with BN (`batch_norm`: the gradient flows through mu_B and var_B, so
b's gradient is zero and b stays where it started) and with `stop_gradient_batch_norm`
(the same forward pass, mu_B and var_B constants for the gradient). The engine logs
every parameter array's norm (`measure.param_norms`) with the loss and accuracy.

The paper's argument: b gets a gradient step that the normalization then undoes, so
b grows without bound while the output, and the loss, stay where they are. Two rules:
the bias grows (its norm at the end is at least GROWTH times its norm half-way) and the
model blows up (the run diverges, or its held-out loss at the end is within FLAT of its
value at step 0).
"""

from __future__ import annotations

from typing import Mapping

from bn_research import experiment
from experiments import claims

NETWORKS = {'bn': 'batch_norm', 'stop_gradient': 'stop_gradient_batch_norm'}
STEPS, EVAL_EVERY = 4000, 250
GROWTH = 1.5   # end vs half-way: still growing
FLAT = 0.1     # relative change of the held-out loss that counts as "stays flat"

NAME = 'stats_gradient'
WORKDIR = 'runs/claims/stats_gradient'
HOW, PARALLEL = 'vmap', 1
FLAGS = claims.common_flags(STEPS, EVAL_EVERY, 1, 'mnist', tuple(claims.MLP_DATA))


def plan(args) -> list:
  return [claims.mlp_run(f'{network}_seed{seed}', args, 'bn', data=args.data, seed=seed,
                         overrides={'model.normalizer': normalizer,
                                    'model.pre_norm_bias': True, 'measure.param_norms': True})
          for network, normalizer in NETWORKS.items() for seed in range(args.seeds)]


def _norm_over_layers(run, kind: str, layers: int) -> list[list[float]]:
  """[[step, sqrt(sum_i ||dense_i/kind||^2)], ...] over the hidden layers."""
  per_layer = [dict(map(tuple, run.curve(f'param_norm/dense_{i}/{kind}')))
               for i in range(layers)]
  steps = sorted(set.intersection(*(set(p) for p in per_layer))) if per_layer else []
  return [[s, sum(p[s] ** 2 for p in per_layer) ** 0.5] for s in steps]


def summarize(records, args) -> dict:
  del args
  runs = claims.by_name(records)
  out: dict = {'networks': {}, 'growth': GROWTH, 'flat': FLAT}
  for network in NETWORKS:
    run = runs[f'{network}_seed0']
    layers = len(run.run.config.model.hidden_sizes)
    bias = _norm_over_layers(run, 'bias', layers)
    kernel = _norm_over_layers(run, 'kernel', layers)
    loss = run.curve('train_loss')
    held_out_loss = run.curve('eval_loss')
    acc = run.curve('eval_accuracy')
    half = bias[len(bias) // 2][1] if bias else None
    out['networks'][network] = {
        'status': claims.status(run), 'bias_norm': bias, 'kernel_norm': kernel,
        'train_loss': loss, 'eval_loss': held_out_loss, 'eval_accuracy': acc,
        'final_bias_norm': bias[-1][1] if bias else None, 'halfway_bias_norm': half,
        'final_kernel_norm': kernel[-1][1] if kernel else None,
        # Held-out loss at step 0 (the untrained network) and at the end.
        'first_loss': held_out_loss[0][1] if held_out_loss else None,
        'final_loss': held_out_loss[-1][1] if held_out_loss else None,
        'final_eval_accuracy': acc[-1][1] if acc else None}
  out['claims'] = judge(out['networks'])
  return out


def judge(networks: Mapping[str, dict]) -> list[dict]:
  sg, bn = networks['stop_gradient'], networks['bn']
  end, half = sg['final_bias_norm'], sg['halfway_bias_norm']
  grows = None if end is None or half is None else end >= GROWTH * max(half, 1e-12)
  diverged = sg['status'].startswith('diverged')
  flat = None
  if diverged:
    flat = True
  elif sg['first_loss'] is not None and sg['final_loss'] is not None:
    flat = abs(sg['final_loss'] - sg['first_loss']) <= FLAT * sg['first_loss']
  return [
      claims.verdict_row(
          'the pre-normalisation bias grows when the statistics are outside the gradient',
          'b grows indefinitely',
          f'stop_gradient: bias norm {claims.fmt(half)} half-way, {claims.fmt(end)} at the '
          f'end; BN: {claims.fmt(bn["final_bias_norm"])}', grows),
      claims.verdict_row(
          'the model blows up (diverges, or its loss stays flat)',
          'loss remains fixed; the model blows up',
          f'stop_gradient: {sg["status"]}, held-out loss {claims.fmt(sg["first_loss"])} -> '
          f'{claims.fmt(sg["final_loss"])}, final accuracy '
          f'{claims.fmt(sg["final_eval_accuracy"])}; BN: loss {claims.fmt(bn["first_loss"])} '
          f'-> {claims.fmt(bn["final_loss"])}, accuracy {claims.fmt(bn["final_eval_accuracy"])}',
          flat)]


def table(summary: dict) -> str:
  lines = ['| network | status | bias norm half-way | bias norm end | kernel norm end | '
           'held-out loss step 0 -> last | final accuracy |', '|---|---|---:|---:|---:|---|---:|']
  for network, s in summary['networks'].items():
    lines.append(f'| {network} | {s["status"]} | {claims.fmt(s["halfway_bias_norm"])} | '
                 f'{claims.fmt(s["final_bias_norm"])} | {claims.fmt(s["final_kernel_norm"])} | '
                 f'{claims.fmt(s["first_loss"])} -> {claims.fmt(s["final_loss"])} | '
                 f'{claims.fmt(s["final_eval_accuracy"])} |')
  return claims.with_verdicts(lines, summary)


def plot(summary: dict):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
  panels = (('bias_norm', 'pre-normalisation bias norm'), ('kernel_norm', 'kernel norm'),
            ('train_loss', 'training loss'), ('eval_accuracy', 'held-out accuracy'))
  for ax, (key, title) in zip(axes, panels):
    for network, s in summary['networks'].items():
      color = experiment.COLORS[network]
      if s[key]:
        x, y = zip(*s[key])
        ax.plot(x, y, color=color, label=network)
    ax.set(title=title, xlabel='step')
    ax.legend()
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
