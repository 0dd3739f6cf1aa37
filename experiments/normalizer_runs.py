"""What the normalizer experiments (`bn_batch_size`, `bn_only`) share.

* the two networks as config specs plus overrides, turned into typed `plan.Run`s
  (`plan_runs`), so every run is exactly `plan.command(run)`;
* `train_all`: trains the runs one after the other in this process (`plan.run_plan`,
  how='inline'), which skips finished runs and resumes unfinished ones;
  `write_summary` and `run_job`: the summary files and the command line's ending;
* `read_result`: the one place these experiments read a run directory;
* `ArgumentParser`: flags whose errors are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import time
from typing import Callable, Sequence

from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ('mlp', 'inception')
DATA = ('real', 'synthetic')
# Wu & He's G = 32 does not divide the MLP's 100 units nor the width-1/8 Inception's
# widths (their gcd is 4): 4 groups divide both.
NORM_GROUPS = 4


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line on stderr and exit code 2 (no usage block)."""

  def error(self, message: str):
    self.exit(2, f'{self.prog}: error: {message}\n')


def add_common_flags(parser: argparse.ArgumentParser, default_steps: int | None) -> None:
  parser.add_argument('--workdir', required=True, help='Output directory.')
  parser.add_argument('--steps', type=int, default=default_steps,
                      help='Training steps per run (scales the whole job; default: '
                      + (f'{default_steps}' if default_steps else "each network's own")
                      + ').')
  parser.add_argument('--models', default=','.join(MODELS),
                      help=f'Comma-separated networks: {", ".join(MODELS)}.')
  parser.add_argument('--data', default='real', choices=DATA,
                      help='real: MNIST for the MLP (TFDS if prepared, else the offline '
                      '5k sample) and Fashion-MNIST for Inception (Debian\'s '
                      'dataset-fashion-mnist); synthetic: prototypes plus noise (tests).')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='Config override for every run, e.g. --set=seed=1 (repeatable).')


def check_common_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       controlled: Sequence[str]) -> list[str]:
  """Validates the shared flags (parser.error on a bad one); returns the models.

  `controlled`: the config keys the experiment sets per run, which --set may not change.
  """
  if args.steps is not None and args.steps < 2:
    parser.error(f'--steps={args.steps}: allowed: an integer >= 2.')
  models = [m for m in args.models.split(',') if m]
  bad = [m for m in models if m not in MODELS]
  if bad or not models or len(set(models)) != len(models):
    parser.error(f'--models={args.models!r}: allowed: a comma-separated subset of '
                 f'{", ".join(MODELS)}, each named once.')
  for kv in args.set:
    key = kv.split('=', 1)[0].strip()
    if '=' not in kv or not key:
      parser.error(f'--set={kv!r}: allowed: KEY=VALUE, e.g. --set=seed=1.')
    if key in controlled:
      parser.error(f'--set={kv!r}: the experiment sets {key} for each run; allowed: any '
                   f'other key (not {", ".join(controlled)}).')
  return models


def eval_every(steps: int) -> int:
  """Evaluations at a few points of the run; a divisor of `steps` of at least 2, so no
  chunk of the engine is a single step."""
  for parts in (5, 4, 2):
    if steps % parts == 0 and steps // parts >= 2:
      return steps // parts
  return steps


def model_spec(model: str, steps: int, data: str) -> tuple[str, list[str]]:
  """(config spec, overrides) of the network that every normalizer variant starts from.

  mlp: the paper's Figure 1 network (configs/mnist_mlp.py: 3 x 100 sigmoid, momentum
  0.9, lr 0.05) at batch 64, so that ghost batches of 2 ... 64 all divide it.
  inception: configs/inception_small.py's BN-Baseline recipe (width 1/8, batch 32) with
  its STUDY_RECIPE (lr 0.01 decaying, moving-average evaluation), without dropout and
  LRN, which have no part in a normalizer comparison.
  """
  every = eval_every(steps)
  common = [f'num_train_steps={steps}', f'eval_every_steps={every}',
            f'log_every_steps={every}', f'checkpoint_every_steps={steps}',
            f'model.norm_groups={NORM_GROUPS}']
  if model == 'mlp':
    source = ',source=synthetic' if data == 'synthetic' else ''
    spec = f'configs/mnist_mlp.py:bn{source}'
    # Evaluated with the moving averages, as Group Normalization's comparison is (and
    # as the tables in README were measured); population statistics from ghost batches
    # would be a second change of BN at once.
    overrides = common + ['batch_size=64', f'steps_per_dispatch={every}',
                          'probe.enabled=false', 'eval.batch_stats=moving_average']
  else:
    source = 'synthetic' if data == 'synthetic' else 'fashion_mnist'
    spec = f'configs/inception_small.py:model=bn_baseline,data={source}'
    from configs import inception_small  # pylint: disable=g-import-not-at-top
    overrides = common + ['model.dropout_rate=0.0', 'model.use_lrn=false'] + [
        f'{k}={v}' for k, v in inception_small.STUDY_RECIPE.items()]
  return spec, overrides


@dataclasses.dataclass
class RunSpec:
  """One training run of an experiment: its directory name, config spec, overrides."""
  name: str
  spec: str
  overrides: list[str]


def plan_runs(root: str, planned: dict[str, Sequence[RunSpec]]) -> list:
  """Every run as a `plan.Run` in root/<model>/<name>: resolved and validated before
  anything is trained or written (ValueError naming the run and the bad value)."""
  from bn_research import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from bn_research import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  runs = []
  for model, specs in planned.items():
    for run in specs:
      overrides = [(k, sweep_lib.parse_value(v))
                   for k, _, v in (kv.partition('=') for kv in run.overrides)]
      try:
        runs.append(plan_lib.make_run(run.name, os.path.join(root, model, run.name),
                                      os.path.join(REPO, run.spec), overrides))
      except ValueError as e:
        raise ValueError(f'run {run.name}: {e}') from None
  return runs


def train_all(root: str, planned: dict[str, Sequence[RunSpec]]) -> None:
  """Trains every network's runs into root/<model>/<name>, one after the other in this
  process (`plan.run_plan`, how='inline'): all are validated first, and finished runs
  are skipped (a re-run only resumes what is unfinished)."""
  from bn_research import plan as plan_lib  # pylint: disable=g-import-not-at-top
  runs = plan_runs(root, planned)
  t0 = time.time()
  for outcome in plan_lib.run_plan(runs, 'inline'):
    logging.info('%s: %s%s', outcome.name, outcome.status,
                 ' (already finished)' if outcome.skipped else '')
  if runs:
    logging.info('%d runs in %.0f s; each as a command: %s', len(runs), time.time() - t0,
                 shlex.join(plan_lib.command(runs[0])))


def write_summary(root: str, name: str, summary: dict, markdown: Callable[[dict], str],
                  plot: Callable[[dict, str], None]) -> None:
  """root/<name>.json, .md and .png."""
  with open(os.path.join(root, f'{name}.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(root, f'{name}.md'), 'w') as f:
    f.write(markdown(summary))
  plot(summary, os.path.join(root, f'{name}.png'))


def run_job(parser: argparse.ArgumentParser, job: Callable[[], dict], name: str,
            markdown: Callable[[dict], str], workdir: str) -> None:
  """Runs a validated command line's job: a ValueError (a bad --set or config, raised
  before anything trains) is one line and exit code 2; then prints the table."""
  logging.set_verbosity(logging.INFO)
  from bn_research import log_filter
  log_filter.quiet_library_logs()
  try:
    summary = job()
  except ValueError as e:
    parser.error(str(e))
  print(markdown(summary))
  print(f'wrote {workdir}/{name}.png, {name}.md and {name}.json in '
        f'{summary["wall_seconds"]} s')


def read_result(run_dir: str, *, count_params: bool = False) -> dict:
  """Status and test-accuracy curve of one run: the only read of run files here.

  Args:
    run_dir: a run directory.
    count_params: also count parameters in its latest checkpoint.

  Returns:
    {'status', 'diverged_step', 'steps', 'test_accuracy', 'final_test_accuracy'
    (None unless the run finished), 'initial_test_accuracy' (step 0)}, plus with
    count_params 'num_params' and 'normalizer_params' (the normalizers' gamma and beta).
  """
  from bn_research.analysis import runs
  run = runs.load_run(run_dir)
  steps, acc = runs.metric_series(run, 'eval_accuracy')
  status = run.status or {}
  done = status.get('status') == 'done' and steps and steps[-1] == status.get('step')
  out = {'status': runs.status_label(run), 'diverged_step': status.get('diverged_step'),
         'steps': steps, 'test_accuracy': acc,
         'final_test_accuracy': acc[-1] if done else None,
         'initial_test_accuracy': acc[0] if steps and steps[0] == 0 else None}
  if count_params:
    import jax
    import numpy as np
    from bn_research import optim, rundir
    state = rundir.load_latest(run_dir) or {}
    params = state.get('params', {})
    mask = optim.normalizer_mask(params, state.get('batch_stats'))
    sizes = [(int(np.size(p)), m) for p, m in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(mask))]
    out.update(num_params=sum(n for n, _ in sizes),
               normalizer_params=sum(n for n, m in sizes if m))
  return out
