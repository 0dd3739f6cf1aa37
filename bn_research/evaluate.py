r"""The paper's evaluation of finished runs: top-1 and top-5, multi-crop, ensembles.

    python -m bn_research.evaluate --workdir=runs/a [--workdir=runs/b ...] \
        [--crops=center,flip,multi:16] [--batch_stats=run|moving_average|population] \
        [--population_batches=N] [--num_eval_examples=N] [--ensemble] \
        [--out=DIR] [--name=evaluation] [--note=TEXT] [--distributed]

Each run directory's latest checkpoint is restored and its network rebuilt from its
config.json (the engine's `steps.Builder`), then evaluated on its held-out set:

* top-1 and top-5 accuracy and the mean negative log-likelihood of the prediction,
  which is the class probabilities (softmax) averaged over the crop scheme's views;
* crop schemes (`--crops`, a list: each gets its rows; the views they share are
  computed once): `center` (the image as the run evaluates it), `flip` (it and its
  mirror image), `multi:N` (N crops, each with its mirror: 2N views; the first crop is
  the whole image, then the centre and four corners at scales 0.875, 0.75 and 0.625
  of the side, each resized back to the network's input size with bilinear weights;
  N <= 16), and `multi:144`, GoogLeNet's 144 crops (`bn_research.crops`), which the
  paper's ensemble used (on streamed ImageNet the pipeline then hands over each
  photograph's three squares instead of its central crop: `data.eval_views`);
* BN's inference statistics (`--batch_stats`): the run's own choice (`run`, default),
  the moving averages, or Algorithm 2's population statistics from the first
  `--population_batches` training batches of the run's data order (the engine's
  `steps.make_population_fn`, streamed data included);
* `--ensemble`: the members' crop-averaged class probabilities averaged, as the
  paper's ensemble (Section 4.2.3) does, with rows for every member and for the
  ensemble.

It writes DIR/NAME.json and DIR/NAME.md (DIR: `--out`, default the directory holding
the runs; NAME: `--name`, default `evaluation`). Bad input (a workdir that is not a
finished run or has no checkpoint, a crop scheme that does not fit the images, an
ensemble of runs of different networks or data) is one line and exit code 2, before
anything is compiled or written.

With `--distributed`, one of several processes started as a multi-process training
run is (`bn_research.engine.distributed`): the devices of every process evaluate
together, each process its own share of every batch, each device keeping its own
sums until one collective adds them up at the end; every process learns of any one's
refusal before anything is compiled, and process 0 alone writes the files.
"""

from __future__ import annotations

from bn_research import signals  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  signals.record_until_started('bn_research.evaluate')  # first: the imports below take seconds

import dataclasses
import datetime
import os
import platform
import sys
import types
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

TOP_K = 5

from bn_research.crops import (  # pylint: disable=g-import-not-at-top
    SQUARES, View, apply_view, check_scheme_fits, view_matrices)

from bn_research.evaluation_plan import (  # pylint: disable=g-import-not-at-top,unused-import
    Plan, RunToEvaluate, config_from_json, make_plan)

# ---------------------------------------------------------------- evaluation


def _statistics_kind(run: RunToEvaluate, plan: Plan) -> str:
  """Which statistics BN infers with: 'population', 'moving_average' or 'none'."""
  from bn_research import normalization  # pylint: disable=g-import-not-at-top
  normalizer = run.config.model.normalizer
  if normalizer not in normalization.MOVING_AVERAGE_NORMALIZERS:
    return 'none'
  kind = run.config.eval.batch_stats if plan.batch_stats == 'run' else plan.batch_stats
  return 'population' if kind == 'population' else 'moving_average'


def _member_logits_fn(builder):
  """logits(params, stats, images, rows, cols) of one view, jitted."""
  import jax  # pylint: disable=g-import-not-at-top
  from bn_research.engine import steps  # pylint: disable=g-import-not-at-top
  model = builder.model({}, dropout=False)

  def logits(params, batch_stats, images, rows, cols):
    return model.apply(steps.model_variables(params, batch_stats),
                       apply_view(images, rows, cols), train=False)
  return jax.jit(logits)


def _row(name: str, scheme: str, views: int, totals: dict) -> dict:
  count = max(totals['count'], 1.0)
  return {'name': name, 'crops': scheme, 'views': views,
          'top1_accuracy': totals['correct'] / count,
          f'top{TOP_K}_accuracy': totals[f'correct_top{TOP_K}'] / count,
          'nll': totals['nll_sum'] / count, 'count': int(totals['count'])}


@dataclasses.dataclass
class _Member:
  """A restored run ready to evaluate: its variables, jitted view logits and data."""
  name: str
  params: Any
  batch_stats: Any
  logits: Any
  eval_batches: Any  # the held-out batches, each sharded over the devices
  matrices: list
  planes: list  # per view: which of the three squares it is of (streamed multi:144)
  to_input: Any = None  # the source's `materialize_eval`: host batch -> network input
  shards: int = 1  # how many slices each held-out batch is split into (the data axis)


def _accumulate(totals: dict, key: tuple, out: dict) -> None:
  """Adds a batch's per-shard sums where they are: read once, after the last batch."""
  acc = totals.get(key)
  totals[key] = out if acc is None else {k: acc[k] + v for k, v in out.items()}


def _shard_metrics_fn(shards: int):
  """metrics(probs, labels, mask) -> `metrics.probability_metrics`' sums of each of the
  batch's `shards` slices, (shards,) arrays split as the batch is: each device sums its
  own slice and nothing crosses devices (or processes) until `_sum_shards`."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bn_research import metrics  # pylint: disable=g-import-not-at-top

  def per_shard(probs, labels, mask):
    split = lambda x: x.reshape((shards, -1) + x.shape[1:])
    return jax.vmap(functools.partial(metrics.probability_metrics, top_k=TOP_K))(
        split(probs), split(labels), split(mask))
  return jax.jit(per_shard)


def _sum_shards(totals: dict) -> dict:
  """Every total's per-shard sums added up: the evaluation's one collective across the
  devices and processes, then its one read."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.device_get(jax.jit(lambda t: jax.tree_util.tree_map(
      lambda x: jnp.sum(x, axis=0), t))(totals))


def _evaluate_together(members: Sequence[_Member], plan: Plan, views: Sequence[View],
                       ensemble: bool, totals: dict) -> None:
  """One pass over the first member's held-out batches, every member on each batch
  (all members share the held-out set when `ensemble`:
  `evaluation_plan.check_ensemble`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bn_research import metrics  # pylint: disable=g-import-not-at-top
  index = {v: i for i, v in enumerate(views)}
  batch_metrics = _shard_metrics_fn(members[0].shards)
  to_input = members[0].to_input or (lambda b: b)
  for batch in members[0].eval_batches:
    # Streamed ImageNet sends uint8 images; they are normalised on the device.
    images = to_input({'image': batch['image']})['image']
    member_probs = {scheme: [] for scheme in plan.schemes}
    for m in members:
      logits = jnp.stack([
          m.logits(m.params, m.batch_stats, images if p is None else images[:, p], *mats)
          for mats, p in zip(m.matrices, m.planes)])
      for scheme, scheme_views in plan.schemes.items():
        probs = metrics.mean_softmax(logits[np.asarray([index[v] for v in scheme_views])])
        _accumulate(totals, (m.name, scheme),
                    batch_metrics(probs, batch['label'], batch['mask']))
        member_probs[scheme].append(probs)
    if ensemble:
      for scheme, probs in member_probs.items():
        _accumulate(totals, ('ensemble', scheme),
                    batch_metrics(jnp.mean(jnp.stack(probs), axis=0), batch['label'],
                                  batch['mask']))


def load_runs(plan: Plan) -> list[tuple[Any, dict]]:
  """Each run's data (`inputs.RunData`) and restored checkpoint, after checking the crop
  schemes fit its images.

  Raises:
    ValueError: one line (a scheme that does not fit the images, no checkpoint that
      restores, or the data's own refusal), before anything is compiled.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bn_research import inputs  # pylint: disable=g-import-not-at-top
  from bn_research import rundir  # pylint: disable=g-import-not-at-top
  loaded = []
  for run in plan.runs:
    if plan.num_eval_examples is not None:
      run.config.num_eval_examples = plan.num_eval_examples
    googlenet = [t for t, views in plan.schemes.items() if any(v.side for v in views)]
    if googlenet and run.config.data.name == 'imagenet2012':
      # Streamed photographs: the pipeline hands over their three squares instead of
      # the central crop, so the other schemes' views cannot be taken here.
      others = [t for t in plan.schemes if t not in googlenet]
      if others:
        raise ValueError(f'--crops={",".join(others)} with {googlenet[0]} on streamed '
                         f'ImageNet ({run.workdir!r}); allowed: {googlenet[0]} alone (the '
                         'others in an evaluation of their own).')
      run.config.data.eval_views = 'squares'
    data = inputs.load_run_data(run.config)
    height, width = np.shape(data.sample_image)[1:3]
    for text, views in plan.schemes.items():
      check_scheme_fits(text, views, height, width)
    devices = jax.device_count()  # every process's: each held-out batch spans them
    if run.config.eval_batch_size % devices:
      raise ValueError(f'--workdir={run.workdir!r}: eval_batch_size='
                       f'{run.config.eval_batch_size} cannot be split over the {devices} '
                       'devices here; allowed: a multiple of the device count (set '
                       'JAX_PLATFORMS / CUDA_VISIBLE_DEVICES to use fewer).')
    state = rundir.load_latest(run.workdir)
    if state is None:
      raise ValueError(f'--workdir={run.workdir!r}: no checkpoint in '
                       f'{rundir.CHECKPOINT_DIR}/ can be restored; allowed: a run with one.')
    loaded.append((data, state))
  return loaded


def inference_variables(run: RunToEvaluate, plan: Plan, data, state: dict,
                        devices: Sequence[Any]) -> tuple[Any, dict, str]:
  """A run's program on `devices` and its variables for inference, placed.

  The engine's placement (a plain run's `JitProgram`, jit over a 1-D data mesh of the
  devices, all processes' in a multi-process job): the variables replicated, each
  held-out batch and each of Algorithm 2's training batches sharded, each process
  holding its own share. BN's statistics come from the engine's own evaluation path
  (`JitProgram.inference_statistics`), so Algorithm 2's are estimated exactly as the
  run's evaluations do, on every device.

  Returns:
    (program, {'params', 'batch_stats'} on the devices, which statistics: see
    `_statistics_kind`).
  """
  from bn_research.engine import programs  # pylint: disable=g-import-not-at-top
  config = run.config
  kind = _statistics_kind(run, plan)
  config.eval.batch_stats = 'population' if kind == 'population' else 'moving_average'
  config.eval.population_batches = plan.population_batches or config.eval.population_batches
  program = programs.JitProgram(config, data, devices, hparams={}, num_members=1,
                                vmapped=False)
  placed = program.place([{'params': state['params'],
                           'batch_stats': state.get('batch_stats') or {}}])
  stats = program.inference_statistics(types.SimpleNamespace(**placed))
  return program, {'params': placed['params'], 'batch_stats': stats}, kind


def evaluate(plan: Plan, loaded: Optional[Sequence[tuple[Any, dict]]] = None) -> dict:
  """Evaluates the plan's runs (and their ensemble); returns the record to write.

  Args:
    plan: from `make_plan`.
    loaded: the runs' data and checkpoints from `load_runs(plan)` (loaded here if None).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bn_research.engine import steps  # pylint: disable=g-import-not-at-top

  loaded = load_runs(plan) if loaded is None else loaded
  views = list(dict.fromkeys(v for vs in plan.schemes.values() for v in vs))
  members, descriptions = [], []
  for run, (data, state) in zip(plan.runs, loaded):
    config = run.config
    builder = steps.Builder(config, data.num_classes)
    program, variables, kind = inference_variables(run, plan, data, state, jax.devices())
    height, width = (int(n) for n in np.shape(data.sample_image)[1:3])
    if run.config.data.get('eval_views') == 'squares':
      from bn_research.data import imagenet_images  # pylint: disable=g-import-not-at-top
      side = imagenet_images.squares_size(height)
      matrices = [view_matrices(v, side, side, out=height) for v in views]
      planes = [SQUARES.index(v.square) for v in views]
    else:
      matrices = [view_matrices(v, height, width) for v in views]
      planes = [None] * len(views)
    members.append(_Member(
        run.workdir, variables['params'], variables['batch_stats'],
        _member_logits_fn(builder), program.placed_eval_batches(),
        # NumPy: jit places them on every device of every process, as it does constants.
        [tuple(np.asarray(m) for m in pair) for pair in matrices], planes,
        data.source.materialize_eval, program.mesh['data']))
    descriptions.append({
        'workdir': run.workdir, 'step': int(state['step']), 'status': run.status.get('status'),
        'model': config.model.name, 'normalizer': config.model.normalizer,
        'seed': config.seed, 'learning_rate': config.optimizer.learning_rate,
        'batch_size': config.batch_size, 'dataset': data.description.get('dataset'),
        'num_classes': data.num_classes, 'batch_stats': kind,
        'image_size': [height, width], 'devices': program.mesh['data'],
        'processes': jax.process_count()})
  logging.info('Evaluating %d run(s), crops %s, on %d device(s) of %d process(es).',
               len(members), ', '.join(plan.schemes), jax.device_count(),
               jax.process_count())
  totals: dict = {}
  if plan.ensemble:
    _evaluate_together(members, plan, views, True, totals)
  else:
    for member in members:  # each on its own held-out set
      _evaluate_together([member], plan, views, False, totals)
  totals = _sum_shards(totals)
  names = [m.name for m in members] + (['ensemble'] if plan.ensemble else [])
  rows = [_row(name, scheme, len(plan.schemes[scheme]),
               {k: float(v) for k, v in totals[(name, scheme)].items()})
          for name in names for scheme in plan.schemes]
  record = {'runs': descriptions, 'rows': rows, 'top_k': TOP_K,
            'crop_schemes': {s: [v.name for v in vs] for s, vs in plan.schemes.items()},
            'ensemble': plan.ensemble}
  if plan.ensemble:
    record['ensemble_vs_best_single'] = ensemble_vs_best_single(rows)
  return record


def ensemble_vs_best_single(rows: Sequence[dict]) -> list[dict]:
  """Per crop scheme: the ensemble's top-1 and top-5 next to its best member's (the
  member with the highest top-1 under that scheme)."""
  out = []
  for scheme in dict.fromkeys(r['crops'] for r in rows):
    members = [r for r in rows if r['crops'] == scheme and r['name'] != 'ensemble']
    (ensemble,) = [r for r in rows if r['crops'] == scheme and r['name'] == 'ensemble']
    best = max(members, key=lambda r: r['top1_accuracy'])
    out.append({'crops': scheme, 'best_single': best['name'],
                **{f'{who}_{metric}': r[metric]
                   for who, r in (('best_single', best), ('ensemble', ensemble))
                   for metric in ('top1_accuracy', f'top{TOP_K}_accuracy')}})
  return out


from bn_research.evaluation_files import check_out, default_out, write  # pylint: disable=g-import-not-at-top


def _define_flags() -> None:
  """Defined only when run as a program: importing this module (tests, another
  program that has its own --workdir) defines no flags."""
  flags.DEFINE_multi_string('workdir', [], 'A finished run directory (repeatable).')
  flags.DEFINE_list('crops', ['center'], 'Crop schemes: center, flip, multi:N '
    '(N crops and their mirror images; N <= 16), multi:144 (GoogLeNet\'s crops).')
  flags.DEFINE_enum('batch_stats', 'run', ['run', 'moving_average', 'population'],
    "BN's inference statistics: the run's eval.batch_stats, "
    'the moving averages, or Algorithm 2 population statistics.')
  flags.DEFINE_integer('population_batches', None, 'Training batches of '
    "the population estimate (default: the run's "
    'eval.population_batches).')
  flags.DEFINE_integer('num_eval_examples', None, 'Held-out examples (0: all; '
    "default: the run's num_eval_examples).")
  flags.DEFINE_bool('ensemble', False, "Also evaluate the average of the runs' "
    'class probabilities (2 or more runs).')
  flags.DEFINE_string('out', None, 'Directory for the results (default: the one '
    'holding the runs).')
  flags.DEFINE_string('name', 'evaluation', 'File name of the results, without '
    '.json / .md.')
  flags.DEFINE_string('note', '', 'Text recorded with the results (e.g. how the runs '
    'were trained).')
  flags.DEFINE_bool('distributed', False, 'One of several processes evaluating '
    'together, started as a multi-process training run is (JAX_COORDINATOR_ADDRESS, '
    'BN_RESEARCH_NUM_PROCESSES, BN_RESEARCH_PROCESS_ID; bn_research.engine.distributed).')


def _refuse(error: BaseException) -> None:
  print(f'bn_research.evaluate: error: {error}', file=sys.stderr)
  sys.exit(2)


def _checked(what: str, check, settings=None) -> Any:
  """`check()`'s value; a ValueError in any process ends every process with one line and
  exit code 2 (`distributed.agree`: no process is left waiting for one that left).
  With `settings`, the processes start together after the check (before JAX's first
  computation), so the check itself needs no other process."""
  from bn_research.engine import distributed  # pylint: disable=g-import-not-at-top
  refusal, value = None, None
  try:
    value = check()
  except ValueError as e:
    refusal = e
  if settings is not None:
    distributed.start(settings)
  try:
    distributed.agree(what, refusal)
  except ValueError as e:
    _refuse(e)
  return value


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from bn_research.engine import distributed  # pylint: disable=g-import-not-at-top
  try:
    settings = distributed.read_environment() if f.distributed else None
  except ValueError as e:
    _refuse(e)
  out = f.out or (default_out(f.workdir) if f.workdir else '.')

  def plan_it() -> Plan:
    check_out(out, f.name)
    return make_plan(f.workdir, crops=f.crops, batch_stats=f.batch_stats,
                     population_batches=f.population_batches,
                     num_eval_examples=f.num_eval_examples, ensemble=f.ensemble)

  plan = _checked('evaluation checked', plan_it, settings)
  from bn_research import log_filter  # pylint: disable=g-import-not-at-top
  log_filter.quiet_library_logs()
  # The data loaders' progress lines stay out of a refusal's one line.
  logging.set_verbosity(logging.WARNING)
  loaded = _checked('runs loaded', lambda: load_runs(plan))
  logging.set_verbosity(logging.INFO)
  signals.started('bn_research.evaluate')  # after JAX's import and the runs' loading
  signals.end_in_one_line('bn_research.evaluate')
  import jax  # pylint: disable=g-import-not-at-top
  try:
    record = evaluate(plan, loaded)
  except jax.errors.JaxRuntimeError as e:
    if distributed.is_multiprocess():  # most often another process is gone
      distributed.end_after_failed_collective(
          e, aftermath='nothing is written; start every process again with the same command')
    raise
  if jax.process_index() != 0:
    return  # process 0 writes the files; every process holds the same totals
  record['command'] = ' '.join(['python -m bn_research.evaluate'] + sys.argv[1:])
  if f.note:
    record['note'] = f.note
  record['date'] = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  record['machine'] = (f'{platform.machine()}, {os.cpu_count()} CPU cores, JAX devices: '
                       f'{jax.devices()[0].device_kind} x {jax.device_count()} in '
                       f'{jax.process_count()} process(es)')
  for path in write(record, out, f.name):
    print(path)
  for row in record['rows']:
    print(f'{row["name"]} [{row["crops"]}]: top-1 {row["top1_accuracy"]:.4f}, '
          f'top-{TOP_K} {row[f"top{TOP_K}_accuracy"]:.4f}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
