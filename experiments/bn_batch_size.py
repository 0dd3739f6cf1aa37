r"""BN's dependence on how many examples its statistics see, against batch-free normalizers.

    python -m experiments.bn_batch_size --workdir=runs/bn_batch_size [--steps=N] \
        [--models=mlp,inception] [--ghost_sizes=2,4,8,16,32,64] \
        [--normalizers=batch_norm,batch_renorm,group_norm,layer_norm,none]

Group Normalization's Figure 1 (Wu & He 2018) at small scale: every network is trained
with the same global batch, learning rate and steps; only the number of examples per
normalization batch changes. For `batch_norm` and `batch_renorm` that is the ghost
batch (`model.virtual_batch_size`, statistics over each g consecutive examples), for
every g of --ghost_sizes that divides the batch (the whole batch is plain BN). The
batch-free normalizers (`group_norm` with 4 groups, `layer_norm`) and `none` do not
depend on it: each is one run, drawn as a horizontal line.

Networks: the Figure 1 MLP (3 x 100 sigmoid, momentum 0.9, lr 0.05) at batch 64 on the
offline MNIST sample, and the width-1/8 BN-Inception of configs/inception_small.py at
batch 32 on Fashion-MNIST (BN-Baseline recipe, lr 0.01, without dropout and LRN).
Batch renorm relaxes r_max to 3 and d_max to 5 linearly from 5% to 50% of the run
(Ioffe 2017: from 5k to 25k-40k steps).

Writes run directories DIR/<model>/<normalizer>[_g<size>] in the engine's format
(re-running skips finished runs and resumes the rest), then

    DIR/bn_batch_size.png   final test error vs examples per normalization batch, one
                            panel per network (Wu & He's Figure 1 layout)
    DIR/bn_batch_size.json  {"rows": [{model, normalizer, examples_per_norm_batch
                            (null: batch-free), final_test_error, status, run}], ...}
    DIR/bn_batch_size.md    the same as one table per network
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from bn_research.experiment import COLORS  # one colour per normalizer in every figure
from experiments import normalizer_runs as nr

GHOST_SIZES = (2, 4, 8, 16, 32, 64)
NORMALIZERS = ('batch_norm', 'batch_renorm', 'group_norm', 'layer_norm', 'none')
BATCH_STATISTICS = ('batch_norm', 'batch_renorm')
BATCH = {'mlp': 64, 'inception': 32}
# Keys each run sets (--set may not): the normalizer and its statistics' batch.
CONTROLLED = ('num_train_steps', 'batch_size', 'model.normalizer', 'model.virtual_batch_size',
              'model.renorm_start_step', 'model.renorm_ramp_steps')
# Per network, so that the default run fits in about 15 minutes on a 2-core CPU (MLP:
# 15 runs in ~2 min; Inception: 13 runs of 30-60 s, mostly compilation). --steps sets
# one number for every network.
DEFAULT_STEPS = {'mlp': 10_000, 'inception': 300}
# Batch renorm's schedule as fractions of the run.
RENORM_START, RENORM_END = 0.05, 0.5
LABELS = {'batch_norm': 'BN', 'batch_renorm': 'Batch Renorm', 'group_norm': 'GN (G=4)',
          'layer_norm': 'LN', 'none': 'no normalization'}


def plan(model: str, steps: int, data: str, ghost_sizes: Sequence[int],
         normalizers: Sequence[str], extra: Sequence[str] = ()) -> list[tuple[nr.RunSpec, int | None]]:
  """(run, examples per normalization batch or None) for every run of one network."""
  spec, base = nr.model_spec(model, steps, data)
  base = base + list(extra)
  batch = BATCH[model]
  out = []
  for norm in normalizers:
    if norm not in BATCH_STATISTICS:
      out.append((nr.RunSpec(norm, spec, base + [f'model.normalizer={norm}']), None))
      continue
    renorm = ([f'model.renorm_start_step={int(RENORM_START * steps)}',
               f'model.renorm_ramp_steps={int((RENORM_END - RENORM_START) * steps)}']
              if norm == 'batch_renorm' else [])
    for g in sorted(set(ghost_sizes), reverse=True):
      if batch % g:
        continue
      if g == batch:
        normalizer = norm
      else:
        normalizer = 'virtual_batch_norm' if norm == 'batch_norm' else norm
      over = base + [f'model.normalizer={normalizer}',
                     f'model.virtual_batch_size={0 if g == batch else g}'] + renorm
      out.append((nr.RunSpec(f'{norm}_g{g}', spec, over), g))
  return out


def summarize(root: str, planned: dict) -> dict:
  rows = []
  for model, runs in planned.items():
    for run, g in runs:
      result = nr.read_result(os.path.join(root, model, run.name))
      acc = result['final_test_accuracy']
      norm = run.name.rsplit('_g', 1)[0] if g else run.name
      rows.append({'model': model, 'normalizer': norm, 'examples_per_norm_batch': g,
                   'final_test_error': None if acc is None else round(1.0 - acc, 4),
                   'status': result['status'], 'run': f'{model}/{run.name}'})
  return {'rows': rows, 'batch_size': {m: BATCH[m] for m in planned}}


def markdown(summary: dict) -> str:
  lines = []
  for model in summary['batch_size']:
    rows = [r for r in summary['rows'] if r['model'] == model]
    sizes = sorted({r['examples_per_norm_batch'] for r in rows if r['examples_per_norm_batch']},
                   reverse=True)
    lines += [f'{model} (batch {summary["batch_size"][model]}, {summary["steps"][model]} steps): '
              'final test error (%) vs examples per normalization batch', '',
              '| normalizer | ' + ' | '.join(str(g) for g in sizes) + ' |',
              '|---|' + '---:|' * len(sizes)]
    for norm in NORMALIZERS:
      mine = [r for r in rows if r['normalizer'] == norm]
      if not mine:
        continue
      by_g = {r['examples_per_norm_batch']: r for r in mine}
      cells = []
      for g in sizes:
        r = by_g.get(g, by_g.get(None))
        err = r and r['final_test_error']
        cells.append('-' if r is None else
                     (f'{100 * err:.1f}' if err is not None else r['status']))
      lines.append(f'| {LABELS[norm]} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  models = list(summary['batch_size'])
  fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
  for ax, model in zip(axes[0], models):
    rows = [r for r in summary['rows'] if r['model'] == model]
    sizes = sorted({r['examples_per_norm_batch'] for r in rows if r['examples_per_norm_batch']})
    for norm in NORMALIZERS:
      mine = [r for r in rows if r['normalizer'] == norm]
      if not mine:
        continue
      if norm in BATCH_STATISTICS:
        pts = sorted((r['examples_per_norm_batch'], r['final_test_error']) for r in mine
                     if r['final_test_error'] is not None)
        ax.plot([g for g, _ in pts], [100 * e for _, e in pts], 'o-', color=COLORS[norm],
                label=LABELS[norm])
        failed = [r['examples_per_norm_batch'] for r in mine if r['final_test_error'] is None]
        if failed:
          ax.scatter(failed, [100] * len(failed), marker='x', color=COLORS[norm],
                     label=f'{LABELS[norm]}: {mine[0]["status"]}')
      elif mine[0]['final_test_error'] is not None:
        ax.axhline(100 * mine[0]['final_test_error'], color=COLORS[norm], ls='--',
                   label=f'{LABELS[norm]} (batch-free)')
    ax.set_xscale('log', base=2)
    ax.set_xticks(sizes, [str(g) for g in sizes])
    ax.invert_xaxis()  # as in Wu & He's Figure 1: the batch shrinks to the right
    ax.set_xlabel('examples per normalization batch')
    ax.set_ylabel('final test error (%)')
    ax.set_title(f'{model}: batch {summary["batch_size"][model]}, {summary["steps"][model]} steps',
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(root: str, *, steps: int | None = None, models: Sequence[str] = nr.MODELS,
        data: str = 'real', ghost_sizes: Sequence[int] = GHOST_SIZES,
        normalizers: Sequence[str] = NORMALIZERS, extra: Sequence[str] = ()) -> dict:
  """Trains every run (skipping finished ones) and writes the figure and JSON table."""
  t0 = time.time()
  steps = {m: steps or DEFAULT_STEPS[m] for m in models}
  planned = {m: plan(m, steps[m], data, ghost_sizes, normalizers, extra) for m in models}
  nr.train_all(root, {m: [r for r, _ in runs] for m, runs in planned.items()})
  summary = summarize(root, planned)
  summary.update(steps=steps, data=data, ghost_sizes=list(ghost_sizes),
                 wall_seconds=round(time.time() - t0, 1))
  nr.write_summary(root, 'bn_batch_size', summary, markdown, plot)
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  parser = nr.ArgumentParser(prog='python -m experiments.bn_batch_size',
                             description=__doc__.split('\n\n')[0])
  nr.add_common_flags(parser, None)
  parser.add_argument('--ghost_sizes', default=','.join(map(str, GHOST_SIZES)),
                      help='Comma-separated examples per normalization batch.')
  parser.add_argument('--normalizers', default=','.join(NORMALIZERS),
                      help=f'Comma-separated subset of {", ".join(NORMALIZERS)}.')
  args = parser.parse_args(argv)
  models = nr.check_common_flags(parser, args, CONTROLLED)
  try:
    sizes = [int(g) for g in args.ghost_sizes.split(',') if g]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 2:
    parser.error(f'--ghost_sizes={args.ghost_sizes!r}: allowed: comma-separated integers '
                 '>= 2 (BN needs two examples per statistic).')
  if len(set(sizes)) != len(sizes):
    parser.error(f'--ghost_sizes={args.ghost_sizes!r}: a size is listed twice.')
  norms = [n for n in args.normalizers.split(',') if n]
  if not norms or any(n not in NORMALIZERS for n in norms) or len(set(norms)) != len(norms):
    parser.error(f'--normalizers={args.normalizers!r}: allowed: a comma-separated subset of '
                 f'{", ".join(NORMALIZERS)}, each named once.')
  for model in models:
    if not any(BATCH[model] % g == 0 for g in sizes) and set(norms) & set(BATCH_STATISTICS):
      parser.error(f'--ghost_sizes={args.ghost_sizes!r}: none divides the {model} batch of '
                   f'{BATCH[model]}; allowed: divisors of it.')
  # A size that divides no chosen network's batch would be dropped without a word.
  unusable = [g for g in sizes if not any(BATCH[m] % g == 0 for m in models)]
  if unusable and set(norms) & set(BATCH_STATISTICS):
    parser.error(f'--ghost_sizes={args.ghost_sizes!r}: {unusable[0]} divides no chosen '
                 'batch (' + ', '.join(f'{m}: {BATCH[m]}' for m in models)
                 + '); allowed: divisors of a batch.')
  nr.run_job(parser, lambda: run(args.workdir, steps=args.steps, models=models,
                                  data=args.data, ghost_sizes=sizes, normalizers=norms,
                                  extra=args.set),
             'bn_batch_size', markdown, args.workdir)


if __name__ == '__main__':
  main()
