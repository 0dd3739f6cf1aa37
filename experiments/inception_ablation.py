r"""Figures 2 and 3 of the paper: the Inception learning-rate and dropout ablation.

    python -m experiments.inception_ablation --workdir=runs/inception_small --preset=small
    python -m experiments.inception_ablation --workdir=gs-or-local/imagenet --preset=imagenet \
        --set=data.data_dir=/data/tfds --print_commands   # one command per model, for a queue

Trains the seven models of `configs/common.py`'s Inception table (the paper's five plus
its two reported failures), `--seeds` seeds each. A model's seeds are one sweep
(`scripts.sweep --sweep=seed=0,1,...`; with 2+ seeds `--vmap`: ONE compiled program of
all the seeds), in `DIR/<model>/seed=<s>` in the engine's format; re-running skips
finished runs and resumes unfinished ones. Then it writes

    DIR/figure2.png    eval accuracy vs training step, every model: the mean over seeds
                       (thick) and each seed (thin); the paper's Figure 2
    DIR/figure3.md     per model: steps for the seed-mean curve to reach the `inception`
    DIR/figure3.json   model's maximum (of its seed-mean curve), the maximum of its own
                       seed-mean curve, and its outcome: trains, at chance (never above
                       2x chance) or diverged (in k of n seeds, at which steps); each
                       seed's numbers too

Presets: `small` (configs/inception_small.py: width 1/8 on 28x28 Fashion-MNIST from
Debian's dataset-fashion-mnist, or `--data=digits` for the offline MNIST sample; 2 seeds,
1,500 steps, about 25 minutes on 2 CPU cores) and `imagenet`
(configs/imagenet_inception.py, 1 seed).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import app
from absl import flags

from bn_research import launch
from bn_research import rundir
from bn_research.analysis import curves
from bn_research.analysis import runs as runs_lib
from configs import common

_WORKDIR = flags.DEFINE_string('workdir', 'runs/inception_small', 'Output directory.')
_PRESET = flags.DEFINE_enum('preset', 'small', ['small', 'imagenet'], 'Which configs.')
_DATA = flags.DEFINE_string('data', None, 'small preset: fashion_mnist (default), digits '
                            'or synthetic.')
_STEPS = flags.DEFINE_integer('steps', None, 'Training steps per model (default: the '
                              "config's).")
_BATCH = flags.DEFINE_integer('batch', None, "Global batch B (a multiple of 32; default: the "
                              "config's 32): the config's `batch=B`, which scales the rate, "
                              'steps and cadences and keeps ghost batches of 32.')
_SEEDS = flags.DEFINE_integer('seeds', None, 'Seeds per model, 0..N-1 (default: 2 for the '
                              'small preset, 1 for imagenet).')
_MODELS = flags.DEFINE_list('models', list(common.INCEPTION_MODELS), 'Models to run.')
_SET = flags.DEFINE_multi_string('set', [], 'Config override for every model, e.g. '
                                 '--set=data.data_dir=/data (repeatable).')
_PARALLEL = flags.DEFINE_integer('parallel', 2, 'Models trained at once (one core each '
                                 'on CPU; use 1 on an accelerator).')
_PRINT = flags.DEFINE_bool('print_commands', False, 'Print one launch command per model '
                           'instead of training.')

CONFIG_FILE = {'small': 'inception_small.py', 'imagenet': 'imagenet_inception.py'}
DEFAULT_SEEDS = {'small': 2, 'imagenet': 1}
NUM_CLASSES = {'small': 10, 'imagenet': 1000}


def num_seeds() -> int:
  return _SEEDS.value if _SEEDS.value is not None else DEFAULT_SEEDS[_PRESET.value]


def seed_dir(root: str, model: str, seed: int) -> str:
  from bn_research import sweep as sweep_lib
  return os.path.join(root, model, sweep_lib.run_name({'seed': seed}))


def check_flags() -> None:
  """ValueError naming the first bad flag, before anything runs."""
  launch.check_positive_flag('steps', _STEPS.value, 'training steps per model')
  launch.check_positive_flag('seeds', _SEEDS.value, 'seeds per model')
  launch.check_parallel(_PARALLEL.value)
  if _BATCH.value is not None:
    common.check_batch(_BATCH.value)
  unknown = [m for m in _MODELS.value if m not in common.INCEPTION_MODELS]
  if unknown or not _MODELS.value:
    raise ValueError(f'--models={",".join(_MODELS.value)!r}: unknown {unknown}; allowed: '
                     f'{", ".join(common.INCEPTION_MODELS)}.')


def launch_command(model: str, root: str) -> list[str]:
  """The model's seed sweep: one program of all its seeds when there are several."""
  arg = f'model={model}'
  if _DATA.value:
    arg += f',data={_DATA.value}'
  if _STEPS.value is not None:
    arg += f',steps={_STEPS.value}'
  if _BATCH.value is not None:
    arg += f',batch={_BATCH.value}'
  config = os.path.join(launch.REPO, 'configs', CONFIG_FILE[_PRESET.value])
  seeds = ','.join(str(s) for s in range(num_seeds()))
  cmd = [sys.executable, '-m', 'scripts.sweep', f'--config={config}:{arg}',
         f'--workdir={os.path.join(root, model)}', f'--sweep=seed={seeds}']
  if num_seeds() > 1:
    cmd.append('--vmap')
  return cmd + [f'--config.{kv}' for kv in _SET.value]


def print_progress(root: str, models: list[str]) -> None:
  """One console line: each training model's furthest step (its output is in a log)."""
  parts = []
  for model in models:
    steps = [0]
    for seed in range(num_seeds()):
      try:
        rows = rundir.read_metrics(seed_dir(root, model, seed))
      except (rundir.RunDirError, OSError):
        rows = []
      steps.append(rows[-1]['step'] if rows else 0)
    parts.append(f'{model}: step {max(steps)}')
  print(' | '.join(parts), flush=True)


def train_models(root: str, models: list[str]) -> list[str]:
  """Trains the models, `--parallel` at a time; returns those whose process failed."""
  jobs = [launch.Job(m, launch_command(m, root), log=os.path.join(root, f'{m}.log'))
          for m in models]
  results = launch.run_jobs(jobs, parallel=_PARALLEL.value, pin_cores=_PARALLEL.value > 1,
                            single_thread=_PARALLEL.value > 1, poll_seconds=1.0,
                            on_poll=lambda names: print_progress(root, names))
  return [r.name for r in results if r.returncode != 0]


def figure3(root: str, models: list[str], seeds: int, num_classes: int = 10) -> dict:
  """The paper's Figure 3 table from the run directories, over seeds."""
  at_chance = 2.0 / num_classes
  loaded = {}
  for m in models:
    dirs = [seed_dir(root, m, s) for s in range(seeds)]
    if all(rundir.is_run_dir(d) for d in dirs):
      loaded[m] = [runs_lib.load_run(d) for d in dirs]
  per_seed = {m: [runs_lib.metric_series(r, 'eval_accuracy') for r in runs]
              for m, runs in loaded.items()}
  means = {m: curves.mean_curve(c) for m, c in per_seed.items()}
  target = (curves.best(*means['inception'])[0] if 'inception' in means else None)
  rows = {}
  for model, runs in loaded.items():
    steps, values = means[model]
    best_value, best_step = curves.best(steps, values)
    statuses = [r.status or {} for r in runs]
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
            'status': runs_lib.status_label(r),
            'curve': {'steps': per_seed[model][i][0], 'eval_accuracy': per_seed[model][i][1]},
        } for i, r in enumerate(runs)],
    }
  return {'target': target, 'target_from': "max of the inception model's seed-mean eval "
          'accuracy', 'at_chance_below': at_chance, 'seeds': seeds, 'models': rows}


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


def write_markdown(table: dict, path: str, title: str) -> str:
  lines = [f'# {title}', '',
           (f"Target: the `inception` model's maximum seed-mean eval accuracy "
            f'({table["target"]:.4f}); {table["seeds"]} seed(s) per model.')
           if table['target'] is not None else
           'Target: n/a (the inception model has no eval yet).', '',
           '| model | lr | steps to inception max | max accuracy | outcome | per seed: '
           'steps to target, max |', '|---|---|---|---|---|---|']
  for model, r in table['models'].items():
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
  if table.get('claims'):
    lines += ['', "| the paper's claim | paper | here | verdict |", '|---|---|---|---|']
    lines += [f'| {c["claim"]} | {c["paper"]} | {c["here"]} | {c["verdict"]} |'
              for c in table['claims']]
  text = '\n'.join(lines) + '\n'
  with open(path, 'w') as f:
    f.write(text)
  return text


def plot_figure2(table: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 5.5))
  for model, r in table['models'].items():
    style = '--' if r['normalizer'] == 'none' else '-'
    steps, values = r['mean_curve']['steps'], r['mean_curve']['eval_accuracy']
    line, = ax.plot(steps, values, style, lw=2, label=f'{model} ({r["status"]})')
    for seed in r['seeds']:
      ax.plot(seed['curve']['steps'], seed['curve']['eval_accuracy'], style, lw=0.6,
              alpha=0.45, color=line.get_color())
    if r['diverged_steps'] and steps:
      ax.plot(steps[-1], values[-1], 'x', color=line.get_color(), markersize=10)
  if table['target'] is not None:
    ax.axhline(table['target'], color='gray', lw=0.8, ls=':', label='inception max')
  ax.set_xlabel('training step')
  ax.set_ylabel('eval accuracy (mean over seeds; thin: each seed)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  def check():
    if len(argv) > 1:
      raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')
    check_flags()
  launch.exit_on_bad_flags('inception_ablation', check)
  root = _WORKDIR.value
  if _PRINT.value:
    for model in _MODELS.value:
      print(shlex.join(launch_command(model, root)))
    return
  os.makedirs(root, exist_ok=True)
  t0 = time.time()
  models = list(_MODELS.value)
  from bn_research.experiment import one_line_errors  # pylint: disable=g-import-not-at-top
  with one_line_errors('inception_ablation'):  # a signal: one line, 128 + signum
    failed = train_models(root, models)
  table = figure3(root, models, num_seeds(), NUM_CLASSES[_PRESET.value])
  some_run = next((seed_dir(root, m, 0) for m in table['models']), None)
  data = (rundir.read_description(some_run) if some_run else None) or {}
  title = (f'Inception ablation ({_PRESET.value} preset) on '
           f'{data.get("display_name", data.get("dataset", "?"))}, {num_seeds()} seed(s)')
  table['data'] = {k: data.get(k) for k in ('dataset', 'display_name', 'source',
                                             'num_train', 'num_test', 'num_params')}
  table['wall_seconds'] = round(time.time() - t0, 1)
  table['claims'] = claims(table)
  with open(os.path.join(root, 'figure3.json'), 'w') as f:
    json.dump(table, f, indent=1)
  text = write_markdown(table, os.path.join(root, 'figure3.md'), title)
  plot_figure2(table, os.path.join(root, 'figure2.png'), title)
  print(text)
  print(f'wrote {root}/figure2.png, figure3.md, figure3.json in {table["wall_seconds"]} s')
  if failed:
    raise SystemExit(f'training failed for: {", ".join(failed)} (see {root}/<model>.log)')


if __name__ == '__main__':
  app.run(main)
