"""The training loop: one config-driven loop from one CPU to a TPU pod slice.

`train_and_evaluate(config, workdir)` is everything a run does. The train step is a
pure function `(state, batch) -> (state, metrics)`; a chunk of steps runs inside one
`lax.scan` per dispatch. Two parallel layouts, chosen by `config.parallelism`:

* 'jit' (default): `jax.jit` over a 1-D device mesh; the state is replicated, the global
  batch is sharded on its leading axis, so BN statistics are over the global batch
  (use `model.virtual_batch_size` for per-group, paper-style statistics).
* 'pmap': `jax.pmap` with axis name 'batch'; gradients are averaged and BN pools its
  statistics across replicas through that axis name.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bn_research import config as config_lib
from bn_research import checkpoint as checkpoint_lib
from bn_research import inputs as inputs_lib
from bn_research import models
from bn_research import optim
from bn_research import run_files

PMAP_AXIS = 'batch'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def cross_entropy_loss(logits: jax.Array, labels: jax.Array,
                       mask: Optional[jax.Array] = None) -> jax.Array:
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def run_keys(seed) -> tuple[jax.Array, jax.Array]:
  """(init key, state key) of a run: the only place a run's randomness comes from.

  Initialisers draw from an 'rbg' key: XLA compiles its generator far faster than
  threefry's, which matters for Inception's ~70 initialisers on CPU. The state key
  (dropout) is a classic threefry key, stored in checkpoints as two uint32s.
  """
  init_key = jax.random.key(seed, impl='rbg')
  state_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  return init_key, state_key


def create_train_state(model, config: ml_collections.ConfigDict, sample_image: Any
                       ) -> tuple[TrainState, optax.GradientTransformation, optax.Schedule]:
  """A run's step-0 state, its optimizer and its learning-rate schedule.

  Args:
    model: the built model.
    config: the run's config (seed, optimizer).
    sample_image: at least two example inputs (BN refuses a batch of one in training
      mode); only their shape matters.
  """

  def init_state(image):
    init_rng, state_rng = run_keys(config.seed)
    variables = model.init({'params': init_rng, 'dropout': init_rng}, image, train=False)
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    tx = optim.make_optimizer(config.optimizer, params, batch_stats)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=batch_stats, opt_state=tx.init(params), rng=state_rng)

  # The keys, the initialisers and the optimizer's zeros in one program, compiled once
  # without XLA's backend optimisations: built op by op they cost a dozen small
  # compiles, and the run time of one initialisation does not matter (2x faster to
  # build for Inception on CPU).
  sample_image = np.asarray(sample_image)
  state = jax.jit(init_state).lower(sample_image).compile(
      {'xla_backend_optimization_level': 0})(sample_image)
  # The optimizer depends only on the parameters' structure, so this is the same one.
  tx = optim.make_optimizer(config.optimizer, state.params, state.batch_stats)
  return state, tx, optim.learning_rate_schedule(config.optimizer)


def tree_all_finite(tree: Any) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(model, tx, schedule, *, axis_name: Optional[str]) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics)."""

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      # Different dropout masks on each replica.
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
      variables = {'params': params}
      if state.batch_stats:
        variables['batch_stats'] = state.batch_stats
      logits, updates = model.apply(variables, batch['image'], train=True,
                                    mutable=['batch_stats'], rngs={'dropout': rng})
      loss = cross_entropy_loss(logits, batch['label'])
      return loss, (logits, updates.get('batch_stats', state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    if axis_name is not None:
      # Re-use the pmap axis_name that BN pools its statistics over.
      grads = jax.lax.pmean(grads, axis_name)
      # Identical already when BN pools statistics across replicas; with per-replica
      # statistics this is the mean over replicas, as virtual_batch_norm averages groups.
      batch_stats = jax.lax.pmean(batch_stats, axis_name)
      loss = jax.lax.pmean(loss, axis_name)
      accuracy = jax.lax.pmean(accuracy, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'accuracy': accuracy,
               'learning_rate': schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


def make_chunk_fn(train_step, materialize) -> Callable:
  """Runs a chunk of steps in one lax.scan; also reports whether parameters stayed finite."""

  def run_chunk(state, resident, chunk):
    def body(state, chunk_t):
      return train_step(state, materialize(resident, chunk_t))
    if jax.tree_util.tree_leaves(chunk)[0].shape[0] == 1:
      # One step: no loop. XLA:CPU runs convolutions inside a while loop (what scan
      # lowers to) several times slower, so conv nets use steps_per_dispatch=1.
      state, metrics = body(state, jax.tree_util.tree_map(lambda x: x[0], chunk))
      metrics = jax.tree_util.tree_map(lambda x: x[None], metrics)
    else:
      state, metrics = jax.lax.scan(body, state, chunk)
    return state, metrics, tree_all_finite(state.params)

  return run_chunk


def make_eval_step(model) -> Callable:
  def eval_step(params, batch_stats, batch):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits = model.apply(variables, batch['image'], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    mask = batch['mask']
    return {'loss_sum': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask)}
  return eval_step


def make_probe_fn(model, probe: ml_collections.ConfigDict, num_hidden: int) -> Callable:
  """Percentiles of one unit's pre-nonlinearity input on the probe batch (Figure 1).

  The network is run as it is evaluated (inference mode), so in the BN network the
  tracked value is BN's output with the moving averages.
  """
  layer = probe.layer % num_hidden
  name = f'hidden_{layer}'
  qs = jnp.asarray(probe.percentiles, jnp.float32)

  def probe_fn(params, batch_stats, images):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    values = state['intermediates'][name][0][:, probe.unit].astype(jnp.float32)
    return jnp.percentile(values, qs)

  return probe_fn


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _load_data(config: ml_collections.ConfigDict, process_index: int, process_count: int):
  """Returns (input, eval_batches_fn, num_classes, probe_images, description)."""
  local_batch = config.batch_size // process_count
  if config.data.name == 'imagenet2012':
    from bn_research.data import imagenet
    pipeline = imagenet.ImageNetPipeline(
        config.data, batch_size=local_batch, seed=config.seed,
        process_index=process_index, process_count=process_count)
    eval_batch = config.eval_batch_size // process_count
    return (inputs_lib.StreamInput(pipeline),
            lambda: pipeline.eval_batches(eval_batch), pipeline.num_classes, None,
            {'dataset': 'imagenet2012', 'num_train': pipeline.num_train_examples})
  from bn_research import data as data_lib
  ds = data_lib.load_dataset(config.data)
  source = inputs_lib.InMemoryInput(
      ds.train_images, ds.train_labels, batch_size=config.batch_size, seed=config.seed,
      process_index=process_index, process_count=process_count)
  n_eval = config.num_eval_examples or len(ds.test_labels)
  batches = inputs_lib.padded_eval_batches(ds.test_images[:n_eval], ds.test_labels[:n_eval],
                                           config.eval_batch_size)
  if process_count > 1:
    per = config.eval_batch_size // process_count
    lo = process_index * per
    batches = [{k: v[lo:lo + per] for k, v in b.items()} for b in batches]
  probe_images = ds.test_images[:config.probe.num_examples]
  return source, lambda: batches, ds.num_classes, probe_images, dict(ds.description)


def _chunk_end(step: int, config: ml_collections.ConfigDict) -> int:
  """Chunks end at every log, eval and checkpoint step, so runs resume identically."""
  ends = [config.num_train_steps]
  for every in (config.steps_per_dispatch, config.log_every_steps,
                config.eval_every_steps, config.checkpoint_every_steps):
    ends.append((step // every + 1) * every)
  return min(ends)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False) -> dict:
  """Trains and evaluates as the config says, writing everything into `workdir`.

  Returns:
    The final status dict (as written to status.json) plus the last metrics.

  Raises:
    ValueError: a bad config or workdir, before anything is compiled or written.
  """
  config_lib.validate_config(config)
  config_lib.check_workdir_parent(workdir)
  mode = run_files.check_workdir(workdir, config, overwrite)
  if mode == 'done':
    status = run_files.read_status(workdir)
    logging.info('%s already holds a finished run (%s); nothing to do.', workdir,
                 status.get('status'))
    return status

  if config.distributed:
    # TPU pods, SLURM and Open MPI are detected by JAX itself. Elsewhere, set
    # JAX_COORDINATOR_ADDRESS (read by JAX) and these two, per process.
    kwargs = {key: int(os.environ[env]) for key, env in (
        ('num_processes', 'BN_RESEARCH_NUM_PROCESSES'),
        ('process_id', 'BN_RESEARCH_PROCESS_ID')) if os.environ.get(env)}
    jax.distributed.initialize(**kwargs)
  process_index, process_count = jax.process_index(), jax.process_count()
  if config.num_devices:
    if config.num_devices > jax.device_count():
      raise ValueError(f'num_devices={config.num_devices} but only {jax.device_count()} '
                       'devices are available.')
    devices = jax.devices()[:config.num_devices]
  else:
    devices = jax.devices()
  local_devices = [d for d in devices if d.process_index == process_index]
  config_lib.validate_config(config, num_devices=len(devices))
  use_pmap = config.parallelism == 'pmap'
  compiler_options = config_lib.parse_compiler_options(config.compiler_options)
  config_lib.check_compiler_options(compiler_options)
  if compiler_options and use_pmap:
    logging.warning('compiler_options %s are not applied under pmap (jax.pmap takes no '
                    'compile options).', compiler_options)

  # Everything that can fail on bad input happens before the workdir is touched.
  source, eval_batches, num_classes, probe_images, description = _load_data(
      config, process_index, process_count)
  if mode == 'new' and overwrite:
    moved = run_files.move_aside(workdir) if process_index == 0 else None
    if moved:
      logging.warning('--overwrite: the previous run in %s was moved to %s', workdir, moved)

  files = run_files.RunFiles(workdir, is_writer=process_index == 0)
  model = models.build_model(
      config.model, num_classes=num_classes,
      axis_name=PMAP_AXIS if use_pmap and config.model.bn_cross_replica else None)

  # ---- initial state -------------------------------------------------------------
  if isinstance(source, inputs_lib.InMemoryInput):
    sample_image = np.asarray(source.resident['image'][:2])
  else:
    sample_image = np.asarray(next(iter(eval_batches()))['image'][:2])
  state, tx, schedule = create_train_state(model, config, sample_image)
  params = state.params
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))

  checkpointer = checkpoint_lib.Checkpointer(workdir)
  start_step = 0
  if mode == 'resume' and checkpointer.latest_step() is not None:
    state = checkpointer.restore(state)
    start_step = int(state.step)
    logging.info('Resumed from the checkpoint at step %d.', start_step)
  files.truncate_metrics(start_step)
  files.write_config(config)
  files.write_description({**description, 'num_params': num_params,
                           'model': config.model.name,
                           'normalizer': config.model.normalizer,
                           'devices': len(devices), 'processes': process_count,
                           'platform': devices[0].platform,
                           'parallelism': config.parallelism})
  files.write_status('running', start_step)
  if description.get('warning'):
    logging.warning('DATA: %s', description['warning'])

  # ---- placement and compiled functions -------------------------------------------
  train_step = make_train_step(model, tx, schedule, axis_name=PMAP_AXIS if use_pmap else None)
  run_chunk = make_chunk_fn(train_step, source.materialize)
  eval_step = make_eval_step(model)
  num_local = len(local_devices)

  if use_pmap:
    # pmap runs on jit + shard_map: a leading device axis sharded over a 1-D mesh is
    # what it expects (jax.device_put_replicated is deprecated).
    pmap_sharding = NamedSharding(jax.sharding.Mesh(np.asarray(local_devices), ('d',)),
                                  P('d'))

    def replicate(tree):
      return jax.device_put(jax.tree_util.tree_map(
          lambda x: np.broadcast_to(np.asarray(x), (num_local,) + np.shape(x)), tree),
          pmap_sharding)

    state = replicate(state)
    resident = replicate(source.resident)
    p_chunk = jax.pmap(run_chunk, axis_name=PMAP_AXIS, devices=devices,
                       donate_argnums=(0,))

    def to_devices(chunk):
      # (K, local_batch, ...) -> (local devices, K, local_batch / devices, ...)
      return jax.tree_util.tree_map(
          lambda x: np.moveaxis(x.reshape((x.shape[0], num_local, -1) + x.shape[2:]), 1, 0),
          chunk)

    def dispatch(state, chunk):
      state, metrics, finite = p_chunk(state, resident, to_devices(chunk))
      return state, jax.tree_util.tree_map(lambda x: x[0], metrics), finite[0]

    def host_state(state):
      return jax.tree_util.tree_map(lambda x: x[0], state)
  else:
    # Auto axes: XLA's partitioner places the collectives (BN's statistics over the
    # global batch, the gradient all-reduce).
    mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    resident = jax.device_put(source.resident, replicated)
    chunk_sharding = NamedSharding(mesh, P(None, 'data'))
    j_chunk = jax.jit(run_chunk, donate_argnums=(0,),
                      out_shardings=(replicated, replicated, replicated),
                      compiler_options=compiler_options or None)

    def to_global(x):
      global_shape = (x.shape[0], x.shape[1] * process_count) + x.shape[2:]
      return jax.make_array_from_process_local_data(chunk_sharding, x, global_shape)

    def dispatch(state, chunk):
      return j_chunk(state, resident, jax.tree_util.tree_map(to_global, chunk))

    def host_state(state):
      return state

  batch_sharding = None if use_pmap else NamedSharding(mesh, P('data'))
  j_eval = jax.jit(eval_step, compiler_options=compiler_options or None)
  eval_cache: list = []

  def evaluate(state) -> dict:
    s = host_state(state)
    totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
    batches = eval_cache or eval_batches()
    for b in batches:
      if batch_sharding is not None and not isinstance(b['image'], jax.Array):
        b = {k: jax.make_array_from_process_local_data(
            batch_sharding, v, (v.shape[0] * process_count,) + v.shape[1:])
             for k, v in b.items()}
        if isinstance(source, inputs_lib.InMemoryInput):
          eval_cache.append(b)  # small, fixed test set: place it on devices once
      out = j_eval(s.params, s.batch_stats, b)
      for k in totals:
        totals[k] += float(out[k])
    count = max(totals['count'], 1.0)
    return {'eval_loss': totals['loss_sum'] / count, 'eval_accuracy': totals['correct'] / count}

  probe = None
  if config.probe.enabled and probe_images is not None and config.model.name == 'mlp':
    j_probe = jax.jit(make_probe_fn(model, config.probe, len(config.model.hidden_sizes)),
                      compiler_options=compiler_options or None)
    probe_images = jnp.asarray(probe_images)

    def probe(state) -> dict:
      s = host_state(state)
      values = np.asarray(j_probe(s.params, s.batch_stats, probe_images))
      return {f'act_p{q:g}': float(v) for q, v in zip(config.probe.percentiles, values)}

  # ---- the loop ------------------------------------------------------------------
  step = start_step
  last = {}
  if step == 0:
    # A step-0 checkpoint: even a run that diverges at once keeps a finite state.
    checkpointer.save(0, host_state(state))
    row = evaluate(state)
    if probe:
      row.update(probe(state))
    files.write_metrics(0, row)
  logging.info('Training %s (%s, %d parameters) on %s: %d devices (%s), steps %d..%d.',
               config.model.name, config.model.normalizer, num_params,
               description.get('dataset', config.data.name), len(devices),
               config.parallelism, start_step, config.num_train_steps)
  bar = None
  if sys.stdout.isatty() and process_index == 0:
    import tqdm
    bar = tqdm.tqdm(total=config.num_train_steps, initial=start_step, unit='step',
                    dynamic_ncols=True)
  sums = {'loss': 0.0, 'accuracy': 0.0, 'n': 0}
  t_log, step_log = time.time(), step
  t_start, step_start = None, step
  status, extra = 'done', {}
  # Fault injection for the resume tests: a real SIGKILL once this step is passed.
  kill_at = int(os.environ.get('BN_RESEARCH_KILL_AT_STEP', '0') or 0)
  try:
    while step < config.num_train_steps:
      end = _chunk_end(step, config)
      chunk = source.chunk(step, end - step)
      new_state, metrics, finite = dispatch(state, chunk)
      losses = np.asarray(metrics['loss'])
      if not (np.all(np.isfinite(losses)) and bool(finite)):
        bad = np.flatnonzero(~np.isfinite(losses))
        diverged_at = step + int(bad[0]) + 1 if bad.size else end
        logging.warning('Diverged: non-finite %s at step %d. Stopping; the last finite '
                        'checkpoint is kept.', 'loss' if bad.size else 'parameters',
                        diverged_at)
        files.write_metrics(diverged_at, {'train_loss': float('nan')})
        status, extra = 'diverged', {'diverged_step': diverged_at,
                                     'message': f'non-finite loss or parameters at step {diverged_at}'}
        # The checkpoints on disk (at least step 0's) all hold finite states.
        step = diverged_at
        break
      state, step = new_state, end
      if t_start is None:  # the first chunk includes compilation
        t_start, step_start = time.time(), step
      if bar is not None:
        bar.update(len(losses))
      sums['loss'] += float(losses.sum())
      sums['accuracy'] += float(np.asarray(metrics['accuracy']).sum())
      sums['n'] += len(losses)
      row = {}
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        row.update(train_loss=sums['loss'] / sums['n'],
                   train_accuracy=sums['accuracy'] / sums['n'],
                   learning_rate=float(np.asarray(metrics['learning_rate'])[-1]))
        sums = {'loss': 0.0, 'accuracy': 0.0, 'n': 0}
        now = time.time()
        rate = (step - step_log) / max(now - t_log, 1e-9)
        t_log, step_log = now, step
        overall = ((step - step_start) / max(now - t_start, 1e-9)
                   if step > step_start else rate)
        eta = (config.num_train_steps - step) / max(overall, 1e-9)
        logging.info('step %d/%d  loss %.4f  acc %.4f  %.1f steps/s  %.0f examples/s  ETA %s',
                     step, config.num_train_steps, row['train_loss'],
                     row['train_accuracy'], rate, rate * config.batch_size,
                     _format_eta(eta))
        row.update(steps_per_second=rate)
      if step % config.eval_every_steps == 0 or step == config.num_train_steps:
        row.update(evaluate(state))
        if probe:
          row.update(probe(state))
        logging.info('step %d  eval_loss %.4f  eval_accuracy %.4f', step,
                     row['eval_loss'], row['eval_accuracy'])
      if row:
        files.write_metrics(step, row)
        last.update(row)
      if step % config.checkpoint_every_steps == 0 and step < config.num_train_steps:
        checkpointer.save(step, host_state(state))
        files.write_status('running', step)
      if kill_at and step >= kill_at:
        checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    if status == 'done':
      checkpointer.save(step, host_state(state))
  except BaseException as e:  # record the failure, keep everything written so far
    checkpointer.wait()
    files.write_status('failed', step, message=f'{type(e).__name__}: {e}')
    files.close()
    raise
  finally:
    if bar is not None:
      bar.close()
  checkpointer.close()
  files.write_status(status, step, **extra, **{k: v for k, v in last.items()
                                               if k.startswith('eval_')})
  files.close()
  return {'status': status, 'step': step, **extra, **last}
