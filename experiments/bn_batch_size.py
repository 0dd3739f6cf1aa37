r"""BN's dependence on how many examples its statistics see, against batch-free normalizers.

    python -m experiments.bn_batch_size --workdir=runs/bn_batch_size [--steps=N] \
        [--models=mlp,inception] [--ghost_sizes=2,4,8,16,32,64] \
        [--normalizers=batch_norm,batch_renorm,group_norm,layer_norm,none] \
        [--data=real|synthetic] [--set=KEY=VALUE ...]

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

from bn_research import checks
from bn_research import experiment
from bn_research.experiment import COLORS  # one colour per normalizer in every figure
from experiments import normalizer_runs as nr

GHOST_SIZES = (2, 4, 8, 16, 32, 64)
NORMALIZERS = ('batch_norm', 'batch_renorm', 'group_norm', 'layer_norm', 'none')
BATCH_STATISTICS = ('batch_norm', 'batch_renorm')
BATCH = {'mlp': 64, 'inception': 32}
# Keys each run sets (--set may not): the normalizer and its statistics' batch.
CONTROLLED = ('num_train_steps', 'batch_size', 'model.normalizer', 'model.virtual_batch_size',
              'model.renorm_start_step', 'model.renorm_ramp_steps')
# Per network, so that the default run fits in about 15 minutes on a 2-core CPU.
# --steps sets one number for every network.
DEFAULT_STEPS = {'mlp': 10_000, 'inception': 300}
# Batch renorm's schedule as fractions of the run.
RENORM_START, RENORM_END = 0.05, 0.5
LABELS = {'batch_norm': 'BN', 'batch_renorm': 'Batch Renorm', 'group_norm': 'GN (G=4)',
          'layer_norm': 'LN', 'none': 'no normalization'}

NAME = 'bn_batch_size'
WORKDIR = 'runs/bn_batch_size'
HOW, PARALLEL = 'inline', 1
FLAGS = {
    **nr.common_flags(None),
    'ghost_sizes': experiment.Flag('ints', GHOST_SIZES, 'Comma-separated examples per '
                                   'normalization batch (BN needs two per statistic).',
                                   checks.Int(2)),
    'normalizers': experiment.Flag('strs', NORMALIZERS, 'Comma-separated subset of '
                                   f'{", ".join(NORMALIZERS)}.', checks.Choice(NORMALIZERS)),
}


def check_ghost_sizes(args) -> None:
  """ValueError for a ghost size that divides no chosen network's batch (it would be
  dropped without a word), or a network none of them divides."""
  if not set(args.normalizers) & set(BATCH_STATISTICS):
    return
  text = ','.join(map(str, args.ghost_sizes))
  for model in args.models:
    if not any(BATCH[model] % g == 0 for g in args.ghost_sizes):
      raise ValueError(f'--ghost_sizes={text!r}: none divides the {model} batch of '
                       f'{BATCH[model]}; allowed: divisors of it.')
  unusable = [g for g in args.ghost_sizes if not any(BATCH[m] % g == 0 for m in args.models)]
  if unusable:
    raise ValueError(f'--ghost_sizes={text!r}: {unusable[0]} divides no chosen batch ('
                     + ', '.join(f'{m}: {BATCH[m]}' for m in args.models)
                     + '); allowed: divisors of a batch.')


def steps_of(args, model: str) -> int:
  return args.steps or DEFAULT_STEPS[model]


def plan(args) -> list:
  """Every normalizer of every network; BN and renorm at each ghost size that divides
  the batch (the whole batch: plain BN or renorm)."""
  nr.check_overrides(args.overrides, CONTROLLED)
  check_ghost_sizes(args)
  runs = []
  for model in args.models:
    steps, batch = steps_of(args, model), BATCH[model]
    for norm in args.normalizers:
      if norm not in BATCH_STATISTICS:
        runs.append(nr.make_run(args, model, norm, steps, {'model.normalizer': norm}))
        continue
      renorm = ({'model.renorm_start_step': int(RENORM_START * steps),
                 'model.renorm_ramp_steps': int((RENORM_END - RENORM_START) * steps)}
                if norm == 'batch_renorm' else {})
      for g in sorted(set(args.ghost_sizes), reverse=True):
        if batch % g:
          continue
        if g == batch:
          normalizer = norm
        else:
          normalizer = 'virtual_batch_norm' if norm == 'batch_norm' else norm
        runs.append(nr.make_run(args, model, f'{norm}_g{g}', steps, {
            'model.normalizer': normalizer,
            'model.virtual_batch_size': 0 if g == batch else g, **renorm}))
  return runs


def summarize(records, args) -> dict:
  rows = []
  for record in records:
    model, name = nr.model_of(record), record.name
    result = nr.result(record)
    acc = result['final_test_accuracy']
    norm, sep, g = name.rpartition('_g')  # `<normalizer>_g<size>`, or a batch-free one
    if not (sep and g.isdigit()):
      norm, g = name, ''
    rows.append({'model': model, 'normalizer': norm,
                 'examples_per_norm_batch': int(g) if g else None,
                 'final_test_error': None if acc is None else round(1.0 - acc, 4),
                 'status': result['status'], 'run': f'{model}/{name}'})
  return {'rows': rows, 'batch_size': {m: BATCH[m] for m in args.models},
          'steps': {m: steps_of(args, m) for m in args.models}, 'data': args.data,
          'ghost_sizes': list(args.ghost_sizes)}


def table(summary: dict) -> str:
  lines = []
  for model in summary['batch_size']:
    rows = [r for r in summary['rows'] if r['model'] == model]
    # Batch-free normalizers only: one column, so their results still show.
    sizes = sorted({r['examples_per_norm_batch'] for r in rows if r['examples_per_norm_batch']},
                   reverse=True) or [None]
    lines += [f'{model} (batch {summary["batch_size"][model]}, {summary["steps"][model]} steps): '
              'final test error (%) vs examples per normalization batch', '',
              '| normalizer | ' + ' | '.join(str(g or 'any') for g in sizes) + ' |',
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
  return '\n'.join(lines).rstrip()


def plot(summary: dict):
  """Final test error vs examples per normalization batch, one panel per network."""
  models = list(summary['batch_size'])
  fig, axes = experiment.figure(len(models), width=5.5)
  for ax, model in zip(axes if len(models) > 1 else [axes], models):
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
  return fig



if __name__ == '__main__':
  experiment.main(__name__)
