r"""Figures 2 and 3 of the paper: the Inception learning-rate and dropout ablation.

    python -m experiments.inception_ablation --workdir=runs/inception_small --preset=small
    python -m experiments.inception_ablation --workdir=gs-or-local/imagenet --preset=imagenet \
        --set=data.data_dir=/data/tfds --how=print   # one command per run, for a queue

Trains the seven models of `configs/common.py`'s Inception table (the paper's five plus
its two reported failures), `--seeds` seeds each. A model's seeds are one sweep over
`seed` in `DIR/<model>/seed=<s>` (with its `sweep.json`), in the engine's format;
re-running skips finished runs and resumes unfinished ones. By default (`--how=vmap
--parallel=2`) each model's seeds train as ONE compiled program, in its own process
(`scripts.sweep --vmap`, console in `DIR/<model>.log`), two models at a time (one core
each on CPU; `--parallel=1` trains them one after another in this process, the choice
on an accelerator); `--how=processes` trains every run in its own process instead.
Then it writes

    DIR/figure2.png    eval accuracy vs training step, every model: the mean over seeds
                       (thick) and each seed (thin); the paper's Figure 2
    DIR/figure3.md     per model: steps for the seed-mean curve to reach the `inception`
    DIR/figure3.json   model's maximum (of its seed-mean curve), the maximum of its own
                       seed-mean curve, and its outcome: trains, at chance (never above
                       2x chance) or diverged (in k of n seeds, at which steps); each
                       seed's numbers too; and the paper's claims with a verdict each

Presets: `small` (configs/inception_small.py: width 1/8 on 28x28 Fashion-MNIST from
Debian's dataset-fashion-mnist, or `--data=digits` for the offline MNIST sample; 2 seeds,
1,500 steps) and `imagenet` (configs/imagenet_inception.py, 1 seed). `--print_commands`
is `--how=print`.
"""

from __future__ import annotations

import os
from typing import Sequence

from bn_research import checks
from bn_research import experiment
from bn_research import launch
from bn_research import plan as plan_lib
from bn_research.analysis import curves
from bn_research.analysis import runs as runs_lib
from configs import common

CONFIG_FILE = {'small': 'inception_small.py', 'imagenet': 'imagenet_inception.py'}
DEFAULT_SEEDS = {'small': 2, 'imagenet': 1}
NUM_CLASSES = {'small': 10, 'imagenet': 1000}

NAME = 'figure3'
OUTPUTS = {'png': 'figure2'}
WORKDIR = 'runs/inception_small'
HOW, PARALLEL = 'vmap', 2
FLAGS = {
    'preset': experiment.Flag(str, 'small', 'Which configs: small or imagenet.',
                              checks.Choice(tuple(CONFIG_FILE))),
    'data': experiment.Flag(str, None, 'small preset: fashion_mnist (default), digits or '
                            'synthetic.'),
    'steps': experiment.Flag(int, None, "Training steps per model (default: the config's).",
                             checks.Int(1)),
    'batch': experiment.Flag(int, None, "Global batch B (a multiple of 32; default: the "
                             "config's 32): the config's `batch=B`, which scales the rate, "
                             'steps and cadences and keeps ghost batches of 32.'),
    'seeds': experiment.Flag(int, None, 'Seeds per model, 0..N-1 (default: 2 for the small '
                             'preset, 1 for imagenet).', checks.Int(1)),
    'models': experiment.Flag('strs', tuple(common.INCEPTION_MODELS), 'Models to run.',
                              checks.Choice(tuple(common.INCEPTION_MODELS))),
    'print_commands': experiment.Flag(bool, False, 'Print one command per run instead of '
                                      'training (the same as --how=print).'),
}


def num_seeds(args) -> int:
  return args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.preset]


def config_spec(model: str, args) -> str:
  """The model's config file and argument: model, data, steps, batch."""
  arg = f'model={model}'
  if args.data:
    arg += f',data={args.data}'
  if args.steps is not None:
    arg += f',steps={args.steps}'
  if args.batch is not None:
    arg += f',batch={args.batch}'
  return os.path.join(launch.REPO, 'configs', CONFIG_FILE[args.preset]) + ':' + arg


def plan(args) -> list[plan_lib.Run]:
  """Per model, one sweep over its seeds in DIR/<model>/seed=<s>."""
  if args.batch is not None:
    common.check_batch(args.batch)
  if args.print_commands:
    args.how = 'print'
  runs = []
  for model in args.models:
    runs += plan_lib.grid(config_spec(model, args), os.path.join(args.workdir, model),
                          {'seed': list(range(num_seeds(args)))}, args.overrides)
  return runs


def model_of(record: experiment.RunRecord) -> str:
  """The model of a run in DIR/<model>/seed=<s>."""
  return os.path.basename(os.path.dirname(os.path.abspath(record.run.workdir)))


def figure3(records: Sequence[experiment.RunRecord], seeds: int,
            num_classes: int = 10) -> dict:
  """The paper's Figure 3 table from the runs, over seeds."""
  at_chance = 2.0 / num_classes
  loaded: dict[str, list[experiment.RunRecord]] = {}
  for record in records:
    loaded.setdefault(model_of(record), []).append(record)
  per_seed = {m: [tuple(map(list, zip(*r.curve('eval_accuracy')))) or ([], [])
                  for r in runs] for m, runs in loaded.items()}
  means = {m: curves.mean_curve(c) for m, c in per_seed.items()}
  target = (curves.best(*means['inception'])[0] if 'inception' in means else None)
  rows = {}
  for model, runs in loaded.items():
    steps, values = means[model]
    best_value, best_step = curves.best(steps, values)
    statuses = [r.status for r in runs]
    config = runs[0].config
    rows[model] = {
        'learning_rate': config.get('optimizer', {}).get('learning_rate'),
        'normalizer': config.get('model', {}).get('normalizer'),
        'activation': config.get('model', {}).get('activation'),
        'steps_to_target': (None if target is None
                            else curves.steps_to_target(steps, values, target)),
        'max_accuracy': best_value,
        'step_of_max': best_step,
        'final_accuracy': curves.final_value(values),
        'status': curves.outcome(statuses, best_value, at_chance),
        'diverged_steps': [s.get('diverged_step', s.get('step')) for s in statuses
                           if s.get('status') == 'diverged'],
        'mean_curve': {'steps': steps, 'eval_accuracy': values},
        'seeds': [{
            'seed': i,
            'steps_to_target': (None if target is None else
                                curves.steps_to_target(*per_seed[model][i], target)),
            'max_accuracy': curves.best(*per_seed[model][i])[0],
            'final_accuracy': curves.final_value(per_seed[model][i][1]),
            'status': runs_lib.status_label(runs_lib.load_run(r.run.workdir)),
            'curve': {'steps': per_seed[model][i][0], 'eval_accuracy': per_seed[model][i][1]},
        } for i, r in enumerate(runs)],
    }
  return {'target': target, 'target_from': "max of the inception model's seed-mean eval "
          'accuracy', 'at_chance_below': at_chance, 'seeds': seeds, 'models': rows}


def summarize(records: Sequence[experiment.RunRecord], args) -> dict:
  """Figure 3's table, the data the runs saw, and the paper's claims judged."""
  summary = figure3(records, num_seeds(args), NUM_CLASSES[args.preset])
  data = records[0].data if records else {}
  summary['title'] = (f'Inception ablation ({args.preset} preset) on '
                      f'{data.get("display_name", data.get("dataset", "?"))}, '
                      f'{num_seeds(args)} seed(s)')
  summary['data'] = {k: data.get(k) for k in ('dataset', 'display_name', 'source',
                                               'num_train', 'num_test', 'num_params')}
  summary['claims'] = claims(summary)
  return summary


def claims(table: dict) -> list[dict]:
  """The paper's Section 4.2 claims, one comparison each, with its verdict here.

  Each entry: the claim, the paper's numbers behind it (Figure 3: steps to Inception's
  72.2% and maximum accuracy), ours, `holds` (strict: a divergence claim needs every
  seed to diverge) and `verdict` ("holds", "does not hold", "partly" where some
  seeds diverged, or "too short to judge" where a step comparison is a tie at the
  evaluation resolution). A claim whose models are missing is left out.
  """
  m = table['models']
  inf = float('inf')
  def steps(name):
    s = m[name]['steps_to_target']
    return s if s is not None else inf
  def best(name):
    return m[name]['max_accuracy'] or 0.0
  def show(name):
    r = m[name]
    reached = r['steps_to_target'] if r['steps_to_target'] is not None else 'never'
    best_text = 'n/a' if r['max_accuracy'] is None else f'{r["max_accuracy"]:.3f}'
    return f'{name}: target at {reached}, max {best_text}, {r["status"]}'
  out = []
  def add(text, paper, names, test, partly=lambda: False, tie=lambda: False):
    # A tie at the evaluation resolution (both reach the target at the same evaluation,
    # or neither does) says the run was too short to tell the models apart.
    if all(n in m for n in names):
      holds = bool(test())
      verdict = ('holds' if holds else 'partly' if partly() else
                 'too short to judge' if tie() else 'does not hold')
      out.append({'claim': text, 'paper': paper, 'here': '; '.join(show(n) for n in names),
                  'holds': holds, 'verdict': verdict})
  def same_steps(a, b):
    return lambda: steps(a) == steps(b)
  add("BN-Baseline reaches Inception's maximum in fewer steps", '13.3M vs 31.0M steps',
      ('bn_baseline', 'inception'), lambda: steps('bn_baseline') < steps('inception'),
      tie=same_steps('bn_baseline', 'inception'))
  add("BN-Baseline ends above Inception's maximum", '72.7% vs 72.2%',
      ('bn_baseline', 'inception'), lambda: best('bn_baseline') > best('inception'))
  for x, paper_steps, paper_best in (('bn_x5', '2.1M', '73.0%'), ('bn_x30', '2.7M', '74.8%')):
    name = 'BN-x5' if x == 'bn_x5' else 'BN-x30'
    add(f"{name} reaches Inception's maximum in far fewer steps than Inception",
        f'{paper_steps} vs 31.0M steps', (x, 'inception'),
        lambda x=x: steps(x) < steps('inception'), tie=same_steps(x, 'inception'))
    add(f'{name} reaches it in fewer steps than BN-Baseline', f'{paper_steps} vs 13.3M steps',
        (x, 'bn_baseline'), lambda x=x: steps(x) < steps('bn_baseline'),
        tie=same_steps(x, 'bn_baseline'))
    add(f"{name} ends above Inception's maximum", f'{paper_best} vs 72.2%',
        (x, 'inception'), lambda x=x: best(x) > best('inception'))
  add('BN-x30 starts slower than BN-x5 (reaches the target later)', '2.7M vs 2.1M steps',
      ('bn_x30', 'bn_x5'), lambda: steps('bn_x30') > steps('bn_x5'),
      tie=same_steps('bn_x30', 'bn_x5'))
  add('BN-x30 ends above BN-x5', '74.8% vs 73.0%', ('bn_x30', 'bn_x5'),
      lambda: best('bn_x30') > best('bn_x5'))
  add('Inception without BN at 5x the rate diverges', '"machine infinity"',
      ('inception_x5',), lambda: m['inception_x5']['status'] == 'diverged',
      partly=lambda: m['inception_x5']['status'].startswith('diverged in'))
  add('Inception with sigmoids and no BN stays at chance', 'chance (1/1000)',
      ('inception_sigmoid',), lambda: m['inception_sigmoid']['status'] == 'at chance')
  add('BN-x5-Sigmoid trains', 'max 69.8%', ('bn_x5_sigmoid',),
      lambda: m['bn_x5_sigmoid']['status'] == 'trains')
  add("BN-x5-Sigmoid stays below Inception's maximum", '69.8% vs 72.2%',
      ('bn_x5_sigmoid', 'inception'), lambda: best('bn_x5_sigmoid') < best('inception'))
  return out


def table(summary: dict) -> str:
  """Figure 3 per model, then the paper's claims with their verdicts."""
  lines = [f'**{summary["title"]}**', '',
           (f"Target: the `inception` model's maximum seed-mean eval accuracy "
            f'({summary["target"]:.4f}); {summary["seeds"]} seed(s) per model.')
           if summary['target'] is not None else
           'Target: n/a (the inception model has no eval yet).', '',
           '| model | lr | steps to inception max | max accuracy | outcome | per seed: '
           'steps to target, max |', '|---|---|---|---|---|---|']
  for model, r in summary['models'].items():
    reached = r['steps_to_target']
    best = r['max_accuracy']
    seeds = '; '.join(
        f'{s["steps_to_target"] if s["steps_to_target"] is not None else "never"}, '
        f'{"n/a" if s["max_accuracy"] is None else format(s["max_accuracy"], ".3f")}'
        for s in r['seeds'])
    outcome_text = r['status'] + (f' (step {", ".join(map(str, r["diverged_steps"]))})'
                                  if r['diverged_steps'] else '')
    lines.append(f'| {model} | {r["learning_rate"]:g} | '
                 f'{reached if reached is not None else "never"} | '
                 f'{"n/a" if best is None else f"{best:.4f}"} | {outcome_text} | {seeds} |')
  if summary.get('claims'):
    lines += ['', "| the paper's claim | paper | here | verdict |", '|---|---|---|---|']
    lines += [f'| {c["claim"]} | {c["paper"]} | {c["here"]} | {c["verdict"]} |'
              for c in summary['claims']]
  return '\n'.join(lines)


def plot(summary: dict):
  """The paper's Figure 2: seed-mean eval accuracy per model (thin: each seed)."""
  fig, ax = experiment.figure(width=9, height=5.5)
  for model, r in summary['models'].items():
    style = '--' if r['normalizer'] == 'none' else '-'
    steps, values = r['mean_curve']['steps'], r['mean_curve']['eval_accuracy']
    line, = ax.plot(steps, values, style, lw=2, label=f'{model} ({r["status"]})')
    for seed in r['seeds']:
      ax.plot(seed['curve']['steps'], seed['curve']['eval_accuracy'], style, lw=0.6,
              alpha=0.45, color=line.get_color())
    if r['diverged_steps'] and steps:
      ax.plot(steps[-1], values[-1], 'x', color=line.get_color(), markersize=10)
  if summary['target'] is not None:
    ax.axhline(summary['target'], color='gray', lw=0.8, ls=':', label='inception max')
  ax.set_xlabel('training step')
  ax.set_ylabel('eval accuracy (mean over seeds; thin: each seed)')
  ax.set_title(summary['title'])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
