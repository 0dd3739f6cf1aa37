"""K settings of the MLP trained at once: one compiled program, `jax.vmap` over the setting.

A sweep over the learning rate, the init scale or the seed changes numbers, not shapes,
so K such runs can share one program whose train state has a leading axis of K
(one slice per setting). On small models this turns K tiny dispatches into one wider
one and compiles once instead of K times (`scripts/bench_sweep.py` measures it).

What can be swept (`VMAP_KEYS`), and how each becomes a traced per-member value:

* `optimizer.learning_rate`: the optimizer is the engine's (`optim.make_optimizer`)
  built for a learning rate of 1, chained with `optax.inject_hyperparams(optax.scale)`
  whose `step_size` (the member's learning rate) lives in the optimizer state.
  For a constant schedule the update lr * (-1 * m) equals the engine's (-lr) * m
  bit for bit; with a decaying schedule it differs only in rounding.
* `model.init_stddev`: the model is initialised with stddev 1 and every dense kernel
  is then multiplied by the member's stddev, which is how `normal(stddev)` draws it.
* `seed`: the init key and the state key are derived from the seed as the engine
  derives them (`train.run_keys`), and each member reads its own data order
  (`InMemoryInput` with its seed; the chunk is a stacked (K, steps, B) index array).
  Members with equal seeds share one (steps, B) index chunk.

Several keys at once (their product) work the same way. Everything else is the same
for all members; the model must be the MLP on in-memory data, and the program runs on
one device under jit.

A member equals its separate `train.train_and_evaluate` run up to float rounding: XLA
may pick another kernel or summation order for a batched matmul than for a single one
(bitwise equal in the small test configs; at 784-100-100-100, 40 steps at lr 0.1, the
largest parameter difference was 3e-7). Where training is chaotic (e.g. BN at lr 10)
such last-bit differences grow, and a member is then a different sample of the same
setting rather than a replica of the separate run.

Each member writes its own run directory in the engine's format (`run_files`): config
.json with its own value, data.json, metrics.jsonl with the train/eval/probe rows at
the steps a separate `train_and_evaluate` run logs them, status.json (done, or diverged
with `diverged_step`), and orbax checkpoints under `checkpoints/` holding the engine's
`TrainState` (the same structure, so `checkpoint.load_latest` reads a member's final
params and the engine itself could resume it). A member that goes non-finite is
recorded as diverged at that step, exactly as the engine records it; its slice keeps
computing NaNs while the others continue (the slices never mix), and it is ignored
from then on. Re-running skips finished members and resumes the others from their
latest checkpoints (members resuming from different steps run as separate programs).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bn_research import checkpoint as checkpoint_lib
from bn_research import config as config_lib
from bn_research import inputs as inputs_lib
from bn_research import models
from bn_research import optim
from bn_research import run_files
from bn_research import train

# Swept key -> the type its values are stored as.
VMAP_KEYS = {'optimizer.learning_rate': float, 'model.init_stddev': float, 'seed': int}


class VmapSweepError(ValueError):
  """A sweep that cannot run as one vmapped program; the message says what is allowed."""


def quiet_library_logs() -> None:
  """Keeps INFO lines from this project only (orbax logs every checkpoint step at INFO),

  as `bn_research.main` does for single runs; for scripts that train in-process."""
  import logging as std_logging
  logger = logging.get_absl_logger()
  if any(getattr(f, '_bn_research_quiet', False) for f in logger.filters):
    return

  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or any(
        part in record.pathname for part in ('/bn_research/', '/scripts/', '/experiments/'))
  keep._bn_research_quiet = True
  logger.addFilter(keep)


# ---------------------------------------------------------------- configs


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `configs/x.py[:arg]` with `--config.KEY=VALUE` overrides, as `main` parses them.

  Args:
    spec: the config spec given to --config.
    overrides: `--config.KEY=VALUE` arguments (ml_collections parses them with the
      fields' types, exactly as `bn_research.main` does).

  Returns:
    The resolved config.
  """
  from absl import flags
  from ml_collections import config_flags
  argv = ['vmap_sweep', f'--config={spec}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except Exception as e:  # absl/ml_collections raise many kinds for a bad override
    raise VmapSweepError(f'loading {spec!r} with {list(overrides)}: {e}') from e
  return flag_values.config


def check_vmappable(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Raises VmapSweepError unless `keys` over `config` can run as one vmapped program.

  Args:
    config: the base config (overrides applied).
    keys: the swept dotted keys.
  """
  allowed = ', '.join(VMAP_KEYS)
  bad = [k for k in keys if k not in VMAP_KEYS]
  if bad:
    raise VmapSweepError(
        f'--vmap cannot sweep {", ".join(repr(k) for k in bad)}: only {allowed} can be '
        'vmapped (they change values, not shapes or code). Sweep other keys without --vmap.')
  if config.model.name != 'mlp':
    raise VmapSweepError(f'--vmap needs model.name=mlp, got {config.model.name!r}; '
                         'run other models without --vmap.')
  if config.data.name == 'imagenet2012':
    raise VmapSweepError('--vmap needs an in-memory dataset (mnist, fashion_mnist, '
                         'synthetic), not the streamed imagenet2012.')
  if config.parallelism != 'jit' or config.distributed or config.num_devices > 1:
    raise VmapSweepError(
        '--vmap runs on one device under jit: needs parallelism=jit, distributed=False '
        f'and num_devices 0 or 1 (got parallelism={config.parallelism!r}, '
        f'distributed={config.distributed}, num_devices={config.num_devices}).')


def member_config(base: ml_collections.ConfigDict,
                  point: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The base config with one grid point's values set (typed as the fields are)."""
  c = base.copy_and_resolve_references()
  for key, value in point.items():
    kind = VMAP_KEYS[key]
    if kind is int and (isinstance(value, bool) or float(value) != int(value)):
      raise VmapSweepError(f'{key}={value!r} must be an integer.')
    *path, last = key.split('.')
    node = c
    for p in path:
      node = node[p]
    node[last] = kind(value)
  return c


# ---------------------------------------------------------------- the program


def _scale_kernels(params: Any, stddev: jax.Array) -> Any:
  """Turns the MLP's stddev-1 Gaussian kernels into stddev-`stddev` ones.

  Only dense kernels are drawn from `normal(init_stddev)`; biases and BN's gamma/beta
  have constant initialisers and are left alone.
  """
  def scale(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    return leaf * stddev.astype(leaf.dtype) if name == 'kernel' else leaf
  return jax.tree_util.tree_map_with_path(scale, params)


@dataclasses.dataclass
class Program:
  """The compiled pieces of one vmapped group. Leading axis K on every state leaf.

  Attributes:
    model: the MLP (built with init_stddev 1; the scale is applied at init).
    init: (seeds, stddevs, learning rates), K of each -> the stacked initial state.
    run_chunk: jitted (state, resident, chunk) -> (state, metrics (K, n), finite (K,));
      donates the state.
    evaluate: jitted (params, batch_stats, batch) -> per-member sums, shape (K,).
    probe: jitted (params, batch_stats, images) -> (K, percentiles), or None.
    shared_data: whether all members read one (steps, B) index chunk.
  """
  model: Any
  init: Any
  run_chunk: Any
  evaluate: Any
  probe: Any
  shared_data: bool


def build_program(config: ml_collections.ConfigDict, num_classes: int,
                  sample_image: np.ndarray, *, shared_data: bool,
                  with_probe: bool = False) -> Program:
  """Builds the vmapped program from the engine's own step, chunk and eval functions.

  Args:
    config: any member's config (the swept values are inputs, not constants).
    num_classes: output classes.
    sample_image: two training images (the init's example input).
    shared_data: all members read the same index chunk (in_axes None) or their own.
    with_probe: also build the Figure-1 activation probe.
  """
  model_config = config.model.copy_and_resolve_references()
  model_config.init_stddev = 1.0
  model = models.build_model(model_config, num_classes=num_classes)
  unit_opt = config.optimizer.copy_and_resolve_references()
  unit_opt.learning_rate = 1.0
  unit_schedule = optim.learning_rate_schedule(unit_opt)

  def init_variables(key):
    return model.init({'params': key, 'dropout': key}, sample_image, train=False)

  shapes = jax.eval_shape(lambda seed: init_variables(train.run_keys(seed)[0]), np.int32(0))

  def make_tx(learning_rate):
    # The engine's optimizer at lr 1, then the member's lr as an injected (traced,
    # per-member) hyperparameter stored in the optimizer state.
    return optax.chain(
        optim.make_optimizer(unit_opt, shapes['params'], shapes.get('batch_stats', {})),
        optax.inject_hyperparams(optax.scale)(step_size=learning_rate))

  def init_member(seed, stddev, learning_rate):
    init_key, state_key = train.run_keys(seed)
    variables = init_variables(init_key)
    params = _scale_kernels(variables['params'], stddev)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=variables.get('batch_stats', {}),
                            opt_state=make_tx(learning_rate).init(params), rng=state_key)

  # The update reads step_size from the state, so the placeholder 1.0 is never used.
  train_step = train.make_train_step(model, make_tx(1.0), unit_schedule, axis_name=None)
  chunk_fn = train.make_chunk_fn(train_step, inputs_lib.InMemoryInput.materialize)
  run_chunk = jax.jit(jax.vmap(chunk_fn, in_axes=(0, None, None if shared_data else 0)),
                      donate_argnums=(0,))
  evaluate = jax.jit(jax.vmap(train.make_eval_step(model), in_axes=(0, 0, None)))
  probe = None
  if with_probe:
    probe = jax.jit(jax.vmap(
        train.make_probe_fn(model, config.probe, len(config.model.hidden_sizes)),
        in_axes=(0, 0, None)))
  # Not vmapped: one member's init is compiled once and run K times; a vmapped init
  # compiled about twice as slowly (init is not where the time goes).
  init_one = jax.jit(init_member)

  def init(seeds, stddevs, learning_rates):
    members = [jax.device_get(init_one(np.int32(s), np.float32(d), np.float32(lr)))
               for s, d, lr in zip(seeds, stddevs, learning_rates)]
    return jax.device_put(jax.tree_util.tree_map(lambda *xs: np.stack(xs), *members))

  return Program(model=model, init=init, run_chunk=run_chunk,
                 evaluate=evaluate, probe=probe, shared_data=shared_data)


def engine_states(state: train.TrainState) -> list[train.TrainState]:
  """Every member's slice in the engine's TrainState layout (its optimizer state
  without the injected learning rate), e.g. for `Checkpointer.save` or comparison.

  Sliced on the host: indexing device arrays would compile one program per leaf shape.
  """
  host = jax.device_get(state)
  k_count = len(np.asarray(host.step))
  out = []
  for k in range(k_count):
    s = jax.tree_util.tree_map(lambda x: jax.device_put(np.array(x[k])), host)
    out.append(s.replace(opt_state=s.opt_state[0]))
  return out


def _with_engine_states(state: train.TrainState, members: Sequence[train.TrainState],
                        ) -> train.TrainState:
  """Stacks engine-layout member states back, keeping the injected learning rates."""
  stacked = jax.device_put(jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                                   *jax.device_get(list(members))))
  return stacked.replace(opt_state=(stacked.opt_state,) + tuple(state.opt_state[1:]))


# ---------------------------------------------------------------- running a sweep


@dataclasses.dataclass
class _Member:
  """One setting's run directory and its bookkeeping while the group trains."""
  workdir: str
  config: ml_collections.ConfigDict
  files: Optional[run_files.RunFiles] = None
  checkpointer: Optional[checkpoint_lib.Checkpointer] = None
  active: bool = True
  status: str = 'done'
  extra: dict = dataclasses.field(default_factory=dict)
  last: dict = dataclasses.field(default_factory=dict)
  step: int = 0
  sums: dict = dataclasses.field(default_factory=dict)


def train_members(base: ml_collections.ConfigDict,
                  points: Sequence[tuple[str, Mapping[str, Any]]], *,
                  overwrite: bool = False) -> list[dict]:
  """Trains every (workdir, point) of a sweep in vmapped programs; see the module doc.

  Args:
    base: the config all members share, before the swept values are set.
    points: (run directory, {swept key: value}) per member.
    overwrite: as the engine's --overwrite: a run directory holding a different config
      is moved aside instead of being an error.

  Returns:
    Per member, in order: the status dict written to its status.json plus its last
    metrics (what `train.train_and_evaluate` returns).

  Raises:
    VmapSweepError / ValueError: a sweep or config that cannot run, before anything is
      compiled or written.
  """
  keys = sorted({k for _, point in points for k in point})
  check_vmappable(base, keys)
  members = [_Member(workdir=str(w), config=member_config(base, p)) for w, p in points]
  modes = []
  for m in members:
    config_lib.validate_config(m.config, num_devices=1)
    config_lib.check_workdir_parent(m.workdir)
    modes.append(run_files.check_workdir(m.workdir, m.config, overwrite))

  results: list[dict | None] = [None] * len(members)
  todo = []
  for i, (m, mode) in enumerate(zip(members, modes)):
    if mode == 'done':
      results[i] = run_files.read_status(m.workdir)
      logging.info('%s already holds a finished run (%s); skipping it.', m.workdir,
                   results[i].get('status'))
    else:
      todo.append((i, mode))
  if not todo:
    return results

  source, eval_batches, num_classes, probe_images, description = train._load_data(
      members[todo[0][0]].config, 0, 1)
  if not isinstance(source, inputs_lib.InMemoryInput):
    raise VmapSweepError('--vmap needs an in-memory dataset.')
  groups: dict[int, list[int]] = {}
  for i, mode in todo:
    m = members[i]
    if mode == 'new' and overwrite:
      moved = run_files.move_aside(m.workdir)
      if moved:
        logging.warning('overwrite: the previous run in %s was moved to %s', m.workdir, moved)
    m.checkpointer = checkpoint_lib.Checkpointer(m.workdir)
    start = m.checkpointer.latest_step() if mode == 'resume' else None
    groups.setdefault(start or 0, []).append(i)
  data = dict(source=source, eval_batches=eval_batches, num_classes=num_classes,
              probe_images=probe_images, description=description)
  for start, indices in sorted(groups.items()):
    group = [members[i] for i in indices]
    _train_group(group, start, **data)
    for i, m in zip(indices, group):
      results[i] = {'status': m.status, 'step': m.step, **m.extra, **m.last}
  return results


def _train_group(members: list[_Member], start_step: int, *, source, eval_batches,
                 num_classes, probe_images, description) -> None:
  """One vmapped program over `members`, all starting at `start_step`."""
  config = members[0].config
  k_count = len(members)
  seeds = [m.config.seed for m in members]
  shared_data = len(set(seeds)) == 1
  sources = [inputs_lib.InMemoryInput(source.resident['image'], source.resident['label'],
                                      batch_size=config.batch_size, seed=s)
             for s in (seeds[:1] if shared_data else seeds)]
  with_probe = bool(config.probe.enabled and probe_images is not None)
  program = build_program(config, num_classes, np.asarray(source.resident['image'][:2]),
                          shared_data=shared_data, with_probe=with_probe)
  state = program.init(np.asarray(seeds, np.int32),
                       np.asarray([m.config.model.init_stddev for m in members], np.float32),
                       np.asarray([m.config.optimizer.learning_rate for m in members],
                                  np.float32))
  if start_step:
    restored = [m.checkpointer.restore(like, step=start_step)
                for like, m in zip(engine_states(state), members)]
    state = _with_engine_states(state, restored)
    logging.info('Resumed %d members from their step-%d checkpoints.', k_count, start_step)
  params_count = sum(int(np.prod(x.shape[1:])) for x in jax.tree_util.tree_leaves(state.params))
  schedules = [optim.learning_rate_schedule(m.config.optimizer) for m in members]
  device = jax.devices()[0]
  for m in members:
    m.files = run_files.RunFiles(m.workdir)
    m.files.truncate_metrics(start_step)
    m.files.write_config(m.config)
    m.files.write_description({**description, 'num_params': params_count,
                               'model': config.model.name,
                               'normalizer': config.model.normalizer, 'devices': 1,
                               'processes': 1, 'platform': device.platform,
                               'parallelism': config.parallelism,
                               'vmap_members': k_count})
    m.files.write_status('running', start_step)
    m.step = start_step
    m.sums = {'loss': 0.0, 'accuracy': 0.0, 'n': 0}
  resident = jax.device_put(source.resident)
  batches = [jax.device_put(b) for b in eval_batches()]
  probe_images = jnp.asarray(probe_images) if with_probe else None

  def evaluate(state) -> list[dict]:
    totals = np.zeros((3, k_count))
    for b in batches:
      out = program.evaluate(state.params, state.batch_stats, b)
      totals += np.stack([np.asarray(out[k], np.float64)
                          for k in ('loss_sum', 'correct', 'count')])
    count = np.maximum(totals[2], 1.0)
    rows = [{'eval_loss': float(totals[0, k] / count[k]),
             'eval_accuracy': float(totals[1, k] / count[k])} for k in range(k_count)]
    if program.probe is not None:
      values = np.asarray(program.probe(state.params, state.batch_stats, probe_images))
      for k in range(k_count):
        rows[k].update({f'act_p{q:g}': float(v)
                        for q, v in zip(config.probe.percentiles, values[k])})
    return rows

  def chunk(step, n):
    idx = [s.example_indices(step, n) for s in sources]
    return {'index': idx[0] if shared_data else np.stack(idx)}

  step = start_step
  try:
    if step == 0:
      rows = evaluate(state)
      for m, row, s in zip(members, rows, engine_states(state)):
        if m.checkpointer.latest_step() is None:
          m.checkpointer.save(0, s)
        m.files.write_metrics(0, row)
    logging.info('Training %d vmapped members of %s (%s, %d parameters each), steps %d..%d.',
                 k_count, config.model.name, config.model.normalizer, params_count,
                 step, config.num_train_steps)
    t_log, step_log = time.time(), step
    while step < config.num_train_steps and any(m.active for m in members):
      end = train._chunk_end(step, config)
      state, metrics, finite = program.run_chunk(state, resident, chunk(step, end - step))
      losses = np.asarray(metrics['loss'])
      accuracies = np.asarray(metrics['accuracy'])
      finite = np.asarray(finite)
      for k, m in enumerate(members):
        if not m.active:
          continue
        if np.all(np.isfinite(losses[k])) and finite[k]:
          m.sums['loss'] += float(losses[k].sum())
          m.sums['accuracy'] += float(accuracies[k].sum())
          m.sums['n'] += end - step
          continue
        bad = np.flatnonzero(~np.isfinite(losses[k]))
        at = step + int(bad[0]) + 1 if bad.size else end
        logging.warning('%s diverged: non-finite %s at step %d; the others go on.',
                        m.workdir, 'loss' if bad.size else 'parameters', at)
        m.files.write_metrics(at, {'train_loss': float('nan')})
        m.active, m.step, m.status = False, at, 'diverged'
        m.extra = {'diverged_step': at,
                   'message': f'non-finite loss or parameters at step {at}'}
      step = end
      rows = [{} for _ in members]
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        now = time.time()
        rate = (step - step_log) / max(now - t_log, 1e-9)
        t_log, step_log = now, step
        for k, m in enumerate(members):
          if m.active:
            lr = float(np.asarray(schedules[k](step - 1), np.float32))
            rows[k].update(train_loss=m.sums['loss'] / m.sums['n'],
                           train_accuracy=m.sums['accuracy'] / m.sums['n'],
                           learning_rate=lr, steps_per_second=rate)
            m.sums = {'loss': 0.0, 'accuracy': 0.0, 'n': 0}
        live = [r['train_loss'] for r in rows if r]
        logging.info('step %d/%d  %d/%d members live  train loss %s  %.1f steps/s '
                     '(%.1f member-steps/s)', step, config.num_train_steps, len(live),
                     k_count, f'{min(live):.4f}..{max(live):.4f}' if live else '-', rate,
                     rate * k_count)
      if step % config.eval_every_steps == 0 or step == config.num_train_steps:
        for k, row in enumerate(evaluate(state)):
          if members[k].active:
            rows[k].update(row)
      save = step % config.checkpoint_every_steps == 0 and step < config.num_train_steps
      slices = engine_states(state) if save else None
      for k, m in enumerate(members):
        if not m.active:
          continue
        m.step = step
        if rows[k]:
          m.files.write_metrics(step, rows[k])
          m.last.update(rows[k])
        if save:
          m.checkpointer.save(step, slices[k])
          m.files.write_status('running', step)
    for m, s in zip(members, engine_states(state)):
      if m.active and m.checkpointer.latest_step() != m.step:  # (resumed at the end)
        m.checkpointer.save(m.step, s)
  except BaseException as e:  # record the failure in every unfinished member
    for m in members:
      m.checkpointer.wait()
      if m.active:
        m.files.write_status('failed', m.step, message=f'{type(e).__name__}: {e}')
      else:
        m.files.write_status(m.status, m.step, **m.extra)
      m.files.close()
    raise
  for m in members:
    m.checkpointer.close()
    m.files.write_status(m.status, m.step, **m.extra,
                         **{k: v for k, v in m.last.items() if k.startswith('eval_')})
    m.files.close()
