"""The pure functions a program compiles: init, train step, chunk, eval step, probe.

Each takes `hparams`, a dict of the member's swept values (`state.SWEEPABLE` keys;
empty for a plain run, where every value is a Python constant of the config). The
model and optimizer are built inside the traced function from the config overlaid with
those values, so a plain run and a member of a sweep run the same code.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bn_research import measure
from bn_research import metrics
from bn_research import models
from bn_research import normalization
from bn_research import optim
from bn_research.engine import state as state_lib

TrainState = state_lib.TrainState


class Builder:
  """Builds a member's model, optimizer and schedule from its config and traced values.

  Args:
    config: the run's config (for a sweep, any member's: swept values come as hparams).
    num_classes: output classes.
    bn_axis_name: the pmap axis BN pools its statistics over, or None.
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               bn_axis_name: Optional[str] = None):
    self.config = config
    self.num_classes = num_classes
    self.bn_axis_name = bn_axis_name

  def model(self, hparams: Mapping[str, Any], *, dropout: bool = True):
    """The member's model; dropout=False builds it without dropout (a Python zero rate,
    which the layers skip), for passes that look at the network, not its noise."""
    values = state_lib.section_values(hparams, 'model')
    if not dropout:
      values['dropout_rate'] = 0.0
    m = state_lib.overlay(self.config.model, values)
    return models.build_model(m, num_classes=self.num_classes, axis_name=self.bn_axis_name)

  def optimizer_config(self, hparams: Mapping[str, Any]):
    return state_lib.overlay(self.config.optimizer,
                             state_lib.section_values(hparams, 'optimizer'))

  def optimizer(self, hparams: Mapping[str, Any], params: Any,
                batch_stats: Any) -> optax.GradientTransformation:
    return optim.make_optimizer(self.optimizer_config(hparams), params, batch_stats)

  def schedule(self, hparams: Mapping[str, Any]) -> optax.Schedule:
    return optim.learning_rate_schedule(self.optimizer_config(hparams))

  def seed(self, hparams: Mapping[str, Any]):
    return hparams.get('seed', self.config.seed)


def model_variables(params: Any, batch_stats: Any) -> dict:
  """The variables a model applies with (no batch_stats collection without BN)."""
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy, in float32 whatever the model computed in."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def make_init(builder: Builder) -> Callable:
  """init(hparams, sample_image) -> the member's step-0 TrainState."""

  def init(hparams, image):
    init_key, state_key = state_lib.run_keys(builder.seed(hparams))
    variables = builder.model(hparams).init({'params': init_key, 'dropout': init_key},
                                            image, train=False)
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    tx = builder.optimizer(hparams, params, batch_stats)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=batch_stats, opt_state=tx.init(params), rng=state_key)

  return init


def make_train_step(builder: Builder, *, axis_name: Optional[str] = None) -> Callable:
  """train_step(hparams, state, batch) -> (state, metrics).

  Args:
    builder: the member's builder.
    axis_name: under pmap, the axis that gradients, metrics and the moving averages
      are averaged over (BN's own statistics follow `builder.bn_axis_name`).
  """

  def train_step(hparams, state: TrainState, batch: dict):
    model = builder.model(hparams)
    tx = builder.optimizer(hparams, state.params, state.batch_stats)
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      # Different dropout masks on each replica.
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
      logits, updates = model.apply(model_variables(params, state.batch_stats),
                                    batch['image'], train=True,
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
               # An array even when the schedule is a Python constant (one-step chunks
               # add a leading axis to every metric).
               'learning_rate': jnp.asarray(builder.schedule(hparams)(state.step),
                                            jnp.float32)}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


def make_chunk_fn(train_step: Callable, materialize: Callable) -> Callable:
  """run_chunk(hparams, state, resident, chunk) -> (state, metrics (n,), params finite).

  A chunk of steps runs in one lax.scan.
  """

  def run_chunk(hparams, state, resident, chunk):
    def body(state, chunk_t):
      return train_step(hparams, state, materialize(resident, chunk_t))
    if jax.tree_util.tree_leaves(chunk)[0].shape[0] == 1:
      # One step: no loop. XLA:CPU runs convolutions inside a while loop (what scan
      # lowers to) several times slower, so conv nets use steps_per_dispatch=1.
      state, metrics = body(state, jax.tree_util.tree_map(lambda x: x[0], chunk))
      metrics = jax.tree_util.tree_map(lambda x: x[None], metrics)
    else:
      state, metrics = jax.lax.scan(body, state, chunk)
    return state, metrics, state_lib.tree_all_finite(state.params)

  return run_chunk


def make_eval_step(builder: Builder, materialize: Callable = lambda batch: batch
                   ) -> Callable:
  """eval_step(hparams, params, batch_stats, batch) -> masked sums of loss, top-1 and
  top-5 hits (`metrics.top_k_correct`), and the example count.

  `materialize` turns the host's evaluation batch into the network's (the source's
  `materialize_eval`: ImageNet's uint8 images are normalised on the device).
  """

  def eval_step(hparams, params, batch_stats, batch):
    batch = materialize(batch)
    logits = builder.model(hparams).apply(model_variables(params, batch_stats),
                                          batch['image'], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    mask = batch['mask']
    top5 = metrics.top_k_correct(logits, batch['label'], 5)
    return {'loss_sum': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
            'correct_top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}

  return eval_step


def make_probe_fn(builder: Builder) -> Callable:
  """probe(hparams, params, batch_stats, images) -> percentiles of one unit (Figure 1).

  The percentiles of the input to one unit's nonlinearity (BN's output, in the BN
  network) on the probe batch. `probe.mode`: 'inference' runs the network as it is
  evaluated (BN with `batch_stats`: the moving averages or the population statistics);
  'train' normalises the probe batch with its own statistics, as training does.
  """
  probe = builder.config.probe
  widths = models.entry_for(builder.config.model).hidden_widths(builder.config.model)
  layer = probe.layer % len(widths)
  name = f'hidden_{layer}'
  qs = jnp.asarray(probe.percentiles, jnp.float32)
  train = probe.mode == 'train'

  def probe_fn(hparams, params, batch_stats, images):
    variables = model_variables(params, batch_stats)
    # Dropout off: the probe looks at the normalised input, not at noise.
    model = builder.model(hparams, dropout=False)
    if train:
      _, state = model.apply(variables, images, train=True,
                             mutable=['intermediates', 'batch_stats'])
    else:
      _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    values = state['intermediates'][name][0][:, probe.unit].astype(jnp.float32)
    return jnp.percentile(values, qs)

  return probe_fn


def _replace_statistics(batch_stats: Any, population: Any) -> Any:
  """The moving averages' tree with every BN layer's mean and var from `population`."""
  if not isinstance(batch_stats, dict):
    return population
  return {k: (_replace_statistics(v, population[k]) if k in population else v)
          for k, v in batch_stats.items()}


def _is_count(path: tuple) -> bool:
  last = path[-1]
  return getattr(last, 'key', None) == 'count'


def make_population_moments_fn(builder: Builder, materialize: Callable) -> Callable:
  """moments(hparams, params, batch_stats, resident, chunk) -> summed batch moments.

  Algorithm 2, step 10, over a piece of the N mini-batches: training-mode forward passes
  over the chunk's mini-batches (the training batch size) with the current weights
  collect each BN layer's mu_B and var_B and return their sums over the piece (`count`,
  m, as it is). Pieces add up; `population_batch_stats` turns the total into E[x] and
  Var[x]. Dropout is off in these passes.
  """

  def moments(hparams, params, batch_stats, resident, chunk):
    model = builder.model(hparams, dropout=False)
    variables = {'params': params, 'batch_stats': batch_stats}

    def moments_of(chunk_t):
      batch = materialize(resident, chunk_t)
      # No rngs: noisy_batch_norm is then plain BN, as the inference network is.
      _, updates = model.apply(variables, batch['image'], train=True,
                               mutable=['batch_stats', 'batch_moments'])
      return updates['batch_moments']

    stacked = jax.lax.map(moments_of, chunk)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x[0] if _is_count(path) else jnp.sum(x, axis=0), stacked)

  return moments


def add_moments(a: Any, b: Any) -> Any:
  """Two pieces' summed moments added (`count`, m, is per batch: kept)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x, y: x if _is_count(path) else x + y, a, b)


def population_batch_stats(batch_stats: Any, sums: Any, num_batches: int) -> Any:
  """The moving averages' tree with Algorithm 2's statistics from N batches' summed
  moments: E[x] = mean of mu_B and Var[x] = m/(m-1) mean of var_B (conv layers per
  channel over m' = m*p*q), in a copy."""
  means = jax.tree_util.tree_map_with_path(
      lambda path, x: x if _is_count(path) else x / num_batches, sums)
  return _replace_statistics(batch_stats, normalization.population_statistics([means]))


def make_population_fn(builder: Builder, materialize: Callable) -> Callable:
  """population(hparams, params, batch_stats, resident, chunk) -> batch_stats.

  Algorithm 2 over all of the chunk's N mini-batches in one program: the summed moments
  of `make_population_moments_fn`, turned into statistics by `population_batch_stats`.
  """
  moments = make_population_moments_fn(builder, materialize)

  def population(hparams, params, batch_stats, resident, chunk):
    n = jax.tree_util.tree_leaves(chunk)[0].shape[0]
    return population_batch_stats(
        batch_stats, moments(hparams, params, batch_stats, resident, chunk), n)

  return population


def make_measure_fn(builder: Builder, layers: Any, materialize: Callable) -> Callable:
  """measure(hparams, state, resident, chunk) -> the `measure.*` measurements.

  At the state's step t, on the batch of the next update (a one-step chunk): the
  internal covariate shift per layer, the loss landscape along the gradient, the
  layers' Jacobian singular values, the nonlinearities' saturation and the parameter
  norms, as `measure.*` selects (`bn_research.measure`). The update the ICS needs (G'
  is taken after layers 1..i-1 moved) is computed here and discarded, so training
  itself is untouched.
  """
  train_step = make_train_step(builder)
  m = builder.config.measure

  def measure_fn(hparams, state, resident, chunk):
    batch = materialize(resident, jax.tree_util.tree_map(lambda x: x[0], chunk))
    # Only the ICS needs the update (and pays for it).
    new_state = train_step(hparams, state, batch)[0] if m.ics else state
    rng = jax.random.fold_in(state.rng, state.step)  # the update's own dropout key
    fn = measure.make_measurement(
        builder.model(hparams), layers=layers, etas=tuple(m.etas), ics=m.ics,
        landscape=m.landscape, jacobian=m.jacobian, saturation=m.saturation,
        param_norms=m.param_norms, jacobian_examples=m.jacobian_examples)
    return fn(state.params, new_state.params, state.batch_stats, batch, rng)

  return measure_fn
