"""What the normalizer jobs (`bn_batch_size`, `bn_only`) share: their networks and flags.

Not a job itself: the two networks every normalizer variant starts from, as a config
spec plus typed overrides (`model_overrides`), the flags both jobs take
(`common_flags`), the check that `--set` leaves the keys a job varies alone, and the
reading of a run's result from the driver's `experiment.RunRecord` (`result`).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from bn_research import checks
from bn_research import experiment
from bn_research import launch
from bn_research import plan as plan_lib

MODELS = ('mlp', 'inception')
DATA = ('real', 'synthetic')
# Wu & He's G = 32 does not divide the MLP's 100 units nor the width-1/8 Inception's
# widths (their gcd is 4): 4 groups divide both.
NORM_GROUPS = 4


def common_flags(default_steps: int | None) -> dict[str, experiment.Flag]:
  """--steps, --models and --data, as both normalizer jobs declare them."""
  return {
      'steps': experiment.Flag(
          int, default_steps, 'Training steps per run (scales the whole job; default: '
          + (f'{default_steps}' if default_steps else "each network's own") + ').',
          checks.Int(2)),
      'models': experiment.Flag('strs', MODELS, f'Comma-separated networks: '
                                f'{", ".join(MODELS)}.', checks.Choice(MODELS)),
      'data': experiment.Flag(str, 'real', "real: MNIST for the MLP (TFDS if prepared, "
                              "else the offline 5k sample) and Fashion-MNIST for Inception "
                              "(Debian's dataset-fashion-mnist); synthetic: prototypes "
                              'plus noise (tests).', checks.Choice(DATA)),
  }


def check_overrides(overrides: dict[str, Any], controlled: Sequence[str]) -> None:
  """ValueError if `--set` names a key the job sets for each run."""
  for key, value in overrides.items():
    if key in controlled:
      raise ValueError(f'--set={key}={value!r}: the experiment sets {key} for each run; '
                       f'allowed: any other key (not {", ".join(controlled)}).')


def eval_every(steps: int) -> int:
  """Evaluations at a few points of the run; a divisor of `steps` of at least 2, so no
  chunk of the engine is a single step."""
  for parts in (5, 4, 2):
    if steps % parts == 0 and steps // parts >= 2:
      return steps // parts
  return steps


def model_overrides(model: str, steps: int, data: str) -> tuple[str, dict[str, Any]]:
  """(config spec, typed overrides) of the network every normalizer variant starts from.

  mlp: the paper's Figure 1 network (configs/mnist_mlp.py: 3 x 100 sigmoid, momentum
  0.9, lr 0.05) at batch 64, so that ghost batches of 2 ... 64 all divide it.
  inception: configs/inception_small.py's BN-Baseline recipe (width 1/8, batch 32) with
  its STUDY_RECIPE (lr 0.01 decaying, moving-average evaluation), without dropout and
  LRN, which have no part in a normalizer comparison.
  """
  every = eval_every(steps)
  common = {'num_train_steps': steps, 'eval_every_steps': every, 'log_every_steps': every,
            'checkpoint_every_steps': steps, 'model.norm_groups': NORM_GROUPS}
  if model == 'mlp':
    source = ',source=synthetic' if data == 'synthetic' else ''
    spec = f'configs/mnist_mlp.py:bn{source}'
    # Evaluated with the moving averages, as Group Normalization's comparison is;
    # population statistics from ghost batches would be a second change of BN at once.
    overrides = {**common, 'batch_size': 64, 'steps_per_dispatch': every,
                 'probe.enabled': False, 'eval.batch_stats': 'moving_average'}
  else:
    source = 'synthetic' if data == 'synthetic' else 'fashion_mnist'
    spec = f'configs/inception_small.py:model=bn_baseline,data={source}'
    from configs import inception_small  # pylint: disable=g-import-not-at-top
    overrides = {**common, 'model.dropout_rate': 0.0, 'model.use_lrn': False,
                 **inception_small.STUDY_RECIPE}
  return os.path.join(launch.REPO, spec), overrides


def make_run(args: Any, model: str, name: str, steps: int,
             overrides: dict[str, Any]) -> plan_lib.Run:
  """The run `DIR/<model>/<name>`: the network's recipe for `steps`, `--set`, then
  `overrides`; ValueError naming the run and the bad value."""
  spec, base = model_overrides(model, steps, args.data)
  try:
    return plan_lib.make_run(name, os.path.join(args.workdir, model, name), spec,
                             {**base, **args.overrides, **overrides})
  except ValueError as e:
    raise ValueError(f'run {model}/{name}: {e}') from None


def model_of(record: experiment.RunRecord) -> str:
  """The network of a run in `DIR/<model>/<name>`."""
  return os.path.basename(os.path.dirname(os.path.abspath(record.run.workdir)))


def result(record: experiment.RunRecord, *, count_params: bool = False) -> dict:
  """Status and test-accuracy curve of one run.

  Returns:
    {'status' ('done', 'diverged at step N', ...), 'diverged_step', 'steps',
    'test_accuracy', 'final_test_accuracy' (None unless the run finished),
    'initial_test_accuracy' (step 0)}, plus with count_params 'num_params' and
    'normalizer_params' (the normalizers' gamma and beta) of its latest checkpoint.
  """
  from bn_research.analysis import runs  # pylint: disable=g-import-not-at-top
  curve = record.curve('eval_accuracy')
  steps, acc = [s for s, _ in curve], [a for _, a in curve]
  status = record.status
  done = status.get('status') == 'done' and steps and steps[-1] == status.get('step')
  out = {'status': runs.status_label(runs.load_run(record.run.workdir)),
         'diverged_step': status.get('diverged_step'), 'steps': steps,
         'test_accuracy': acc, 'final_test_accuracy': acc[-1] if done else None,
         'initial_test_accuracy': acc[0] if steps and steps[0] == 0 else None}
  if count_params:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from bn_research import optim, rundir  # pylint: disable=g-import-not-at-top
    state = rundir.load_latest(record.run.workdir) or {}
    params = state.get('params', {})
    mask = optim.normalizer_mask(params, state.get('batch_stats'))
    sizes = [(int(np.size(p)), m) for p, m in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(mask))]
    out.update(num_params=sum(n for n, _ in sizes),
               normalizer_params=sum(n for n, m in sizes if m))
  return out
