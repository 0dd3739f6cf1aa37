r"""Figures 2 and 3 of the paper: the Inception learning-rate and dropout ablation.

    python -m experiments.inception_ablation --workdir=runs/inception_small --preset=small
    python -m experiments.inception_ablation --workdir=gs-or-local/imagenet --preset=imagenet \
        --set=data.data_dir=/data/tfds --print_commands   # one command per model, for a queue

Trains the seven models of `configs/common.py`'s Inception table (the paper's five plus
its two reported failures), each in `DIR/<model>` in the engine's format (re-running
skips finished models and resumes unfinished ones), then writes

    DIR/figure2.png    eval accuracy vs training step, every model (the paper's Figure 2)
    DIR/figure3.md     per model: steps to reach the `inception` model's maximum
    DIR/figure3.json   accuracy, its own maximum accuracy, and "diverged at step N"

Presets: `small` (configs/inception_small.py: width 1/8 on 28x28 Fashion-MNIST from
Debian's dataset-fashion-mnist, or `--data=digits` for the offline MNIST sample; about
20 minutes on 2 CPU cores) and `imagenet` (configs/imagenet_inception.py).
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
_MODELS = flags.DEFINE_list('models', list(common.INCEPTION_MODELS), 'Models to run.')
_SET = flags.DEFINE_multi_string('set', [], 'Config override for every model, e.g. '
                                 '--set=data.data_dir=/data (repeatable).')
_PARALLEL = flags.DEFINE_integer('parallel', 2, 'Models trained at once (one core each '
                                 'on CPU; use 1 on an accelerator).')
_PRINT = flags.DEFINE_bool('print_commands', False, 'Print one launch command per model '
                           'instead of training.')

CONFIG_FILE = {'small': 'inception_small.py', 'imagenet': 'imagenet_inception.py'}


def check_flags() -> None:
  """ValueError naming the first bad flag, before anything runs."""
  launch.check_positive_flag('steps', _STEPS.value, 'training steps per model')
  launch.check_parallel(_PARALLEL.value)
  unknown = [m for m in _MODELS.value if m not in common.INCEPTION_MODELS]
  if unknown or not _MODELS.value:
    raise ValueError(f'--models={",".join(_MODELS.value)!r}: unknown {unknown}; allowed: '
                     f'{", ".join(common.INCEPTION_MODELS)}.')


def launch_command(model: str, workdir: str) -> list[str]:
  arg = f'model={model}'
  if _DATA.value:
    arg += f',data={_DATA.value}'
  if _STEPS.value is not None:
    arg += f',steps={_STEPS.value}'
  config = os.path.join(launch.REPO, 'configs', CONFIG_FILE[_PRESET.value])
  cmd = [sys.executable, '-m', 'bn_research.main', f'--config={config}:{arg}',
         f'--workdir={workdir}']
  return cmd + [f'--config.{kv}' for kv in _SET.value]


def train_models(root: str, models: list[str]) -> list[str]:
  """Trains the models, `--parallel` at a time; returns those whose process failed."""
  jobs = [launch.Job(m, launch_command(m, os.path.join(root, m)),
                     log=os.path.join(root, f'{m}.log')) for m in models]
  results = launch.run_jobs(jobs, parallel=_PARALLEL.value,
                            single_thread=_PARALLEL.value > 1, poll_seconds=1.0)
  return [r.name for r in results if r.returncode != 0]


def figure3(root: str, models: list[str]) -> dict:
  """The paper's Figure 3 table from the run directories."""
  loaded = {m: runs_lib.load_run(os.path.join(root, m)) for m in models
            if rundir.is_run_dir(os.path.join(root, m))}
  baseline = loaded.get('inception')
  target = (curves.default_target(baseline, 'eval_accuracy') if baseline is not None
            else None)
  rows = {}
  for model, run in loaded.items():
    steps, values = runs_lib.metric_series(run, 'eval_accuracy')
    best_value, best_step = curves.best(steps, values)
    rows[model] = {
        'learning_rate': run.config.get('optimizer', {}).get('learning_rate'),
        'normalizer': run.config.get('model', {}).get('normalizer'),
        'activation': run.config.get('model', {}).get('activation'),
        'steps_to_inception_max': (None if target is None
                                   else curves.steps_to_target(steps, values, target)),
        'max_accuracy': best_value,
        'step_of_max': best_step,
        'final_accuracy': curves.final_value(values),
        'status': runs_lib.status_label(run),
    }
  return {'target': target, 'target_from': 'inception max eval_accuracy', 'models': rows}


def write_markdown(table: dict, path: str, title: str) -> str:
  lines = [f'# {title}', '',
           f'Target: the `inception` model\'s maximum eval accuracy '
           f'({table["target"]:.4f}).' if table['target'] is not None else
           'Target: n/a (the inception model has no eval yet).', '',
           '| model | lr | steps to inception max | max accuracy | status |',
           '|---|---|---|---|---|']
  for model, r in table['models'].items():
    reached = r['steps_to_inception_max']
    best = r['max_accuracy']
    lines.append(f'| {model} | {r["learning_rate"]:g} | '
                 f'{reached if reached is not None else "never"} | '
                 f'{"n/a" if best is None else f"{best:.4f}"} | {r["status"]} |')
  text = '\n'.join(lines) + '\n'
  with open(path, 'w') as f:
    f.write(text)
  return text


def plot_figure2(root: str, table: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for model in table['models']:
    run = runs_lib.load_run(os.path.join(root, model))
    steps, values = runs_lib.metric_series(run, 'eval_accuracy')
    style = '--' if table['models'][model]['normalizer'] == 'none' else '-'
    line, = ax.plot(steps, values, style, label=f'{model} ({table["models"][model]["status"]})')
    status = table['models'][model]['status']
    if status.startswith('diverged') and steps:
      ax.plot(steps[-1], values[-1], 'x', color=line.get_color(), markersize=10)
  if table['target'] is not None:
    ax.axhline(table['target'], color='gray', lw=0.8, ls=':', label='inception max')
  ax.set_xlabel('training step')
  ax.set_ylabel('eval accuracy')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  launch.exit_on_bad_flags('inception_ablation', check_flags)
  root = _WORKDIR.value
  if _PRINT.value:
    for model in _MODELS.value:
      print(shlex.join(launch_command(model, os.path.join(root, model))))
    return
  os.makedirs(root, exist_ok=True)
  t0 = time.time()
  failed = train_models(root, list(_MODELS.value))
  table = figure3(root, list(_MODELS.value))
  some_run = next((os.path.join(root, m) for m in table['models']), None)
  data = (rundir.read_description(some_run) if some_run else None) or {}
  dataset = data.get('dataset', '?')
  title = f'Inception ablation ({_PRESET.value} preset) on {dataset}'
  table['data'] = {k: data.get(k) for k in ('dataset', 'source', 'num_train', 'num_test',
                                             'is_full_mnist', 'warning', 'num_params')}
  table['wall_seconds'] = round(time.time() - t0, 1)
  with open(os.path.join(root, 'figure3.json'), 'w') as f:
    json.dump(table, f, indent=1)
  text = write_markdown(table, os.path.join(root, 'figure3.md'), title)
  plot_figure2(root, table, os.path.join(root, 'figure2.png'), title)
  print(text)
  print(f'wrote {root}/figure2.png, figure3.md, figure3.json in {table["wall_seconds"]} s')
  if failed:
    raise SystemExit(f'training failed for: {", ".join(failed)} (see {root}/<model>.log)')


if __name__ == '__main__':
  app.run(main)
