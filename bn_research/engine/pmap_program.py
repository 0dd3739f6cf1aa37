"""The pmap layout: one member under `jax.pmap` (axis name 'batch'); gradients are
averaged and BN pools its statistics across replicas through that axis name."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bn_research import inputs as inputs_lib
from bn_research.engine import steps
from bn_research.engine.layout import (EVAL_SUMS, PMAP_AXIS, Compiled, Program,
                                       compile_interruptibly, eval_rows, outputs_pair,
                                       probe_rows)


class PmapProgram(Program):
  """One member under `jax.pmap` over this process's devices (axis name 'batch')."""

  layout = 'pmap'

  def __init__(self, config: ml_collections.ConfigDict, data: inputs_lib.RunData,
               devices: Sequence[Any]):
    self.config = config
    self.data = data
    self.num_members = 1
    self.mesh = {'members': 1, 'data': len(devices)}
    process_index = jax.process_index()
    self._local = [d for d in devices if d.process_index == process_index]
    plain = steps.Builder(config, data.num_classes)
    # BN pools statistics across replicas, or keeps them per replica (then the moving
    # averages are averaged, as virtual_batch_norm averages its groups).
    pooled = steps.Builder(config, data.num_classes,
                           bn_axis_name=PMAP_AXIS if config.model.bn_cross_replica else None)
    run_chunk = steps.make_chunk_fn(steps.make_train_step(pooled, axis_name=PMAP_AXIS),
                                    data.source.materialize)
    self._init_fn = steps.make_init(plain)
    # Compiled ahead of time (interruptibly) on one process; on several, pmap's AOT path
    # takes global shapes where calls give this process's: compiled at the first call.
    interruptible = ((lambda f: Compiled(f, self)) if jax.process_count() == 1
                     else (lambda f: f))
    self._run_chunk = interruptible(jax.pmap(
        outputs_pair(lambda s, r, c: run_chunk({}, s, r, c)), axis_name=PMAP_AXIS,
        devices=devices, donate_argnums=(0,)))
    eval_step = steps.make_eval_step(plain, data.source.materialize_eval)
    # The sums over every process's devices: each process feeds its share of the split.
    self._eval = interruptible(jax.pmap(
        lambda params, stats, batch: jax.lax.psum(eval_step({}, params, stats, batch),
                                                  PMAP_AXIS),
        axis_name=PMAP_AXIS, devices=devices))
    self._probe = (jax.jit(steps.make_probe_fn(plain))
                   if data.probe_images is not None else None)
    # pmap runs on jit + shard_map: a leading device axis sharded over a 1-D mesh is
    # what it expects (jax.device_put_replicated is deprecated).
    self._sharding = NamedSharding(jax.sharding.Mesh(np.asarray(self._local), ('d',)),
                                   P('d'))
    self._resident = self._replicate(data.source.resident)

  def _replicate(self, tree):
    n = len(self._local)
    return jax.device_put(jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree), self._sharding)

  def _per_device(self, tree: Any, batch_axis: int) -> Any:
    """This process's batch (axis `batch_axis`) split over its devices (leading axis)."""
    n = len(self._local)

    def split(x):
      shape = x.shape[:batch_axis] + (n, -1) + x.shape[batch_axis + 1:]
      return np.moveaxis(x.reshape(shape), batch_axis, 0)
    return jax.device_put(jax.tree_util.tree_map(split, tree), self._sharding)

  def _share(self, tree: Any, batch_axis: int) -> Any:
    """In-memory batches are global: this process's share of them."""
    count = jax.process_count()
    if count == 1:
      return tree

    def take(x):
      per = x.shape[batch_axis] // count
      lo = jax.process_index() * per
      return np.take(x, np.arange(lo, lo + per), axis=batch_axis)
    return jax.tree_util.tree_map(take, tree)

  def init(self):
    image = np.asarray(self.data.sample_image)
    init = compile_interruptibly(
        lambda: jax.jit(self._init_fn).lower({}, image).compile(
            {'xla_backend_optimization_level': 0}), self.check_stop)
    state = init({}, image)
    return self._replicate(jax.device_get(state))

  def place(self, members):
    (host,) = members
    return self._replicate(host)

  def split(self, state):
    return [jax.tree_util.tree_map(lambda x: np.asarray(x[0]), jax.device_get(state))]

  def prepare(self, start, num_steps):
    chunk = self.data.source.chunk(start, num_steps)
    if self.data.in_memory:
      chunk = self._share(chunk, batch_axis=1)
    # (K, local_batch, ...) -> (local devices, K, local_batch / devices, ...)
    return self._per_device(chunk, batch_axis=1)

  def dispatch(self, state, chunk):
    return self._run_chunk(state, self._resident, chunk)

  def read(self, outputs):
    # Every replica holds the same (pmean-ed) values: the first local one is read.
    first = [jax.tree_util.tree_map(lambda x: x[0], o) for o in outputs]
    return super().read(first)

  def evaluate(self, state):
    totals = None
    for b in self.data.eval_batches():
      self.check_stop()
      if self.data.in_memory:
        b = self._share(b, batch_axis=0)
      out = self._eval(state.params, state.batch_stats, self._per_device(b, batch_axis=0))
      totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    if totals is None:
      return eval_rows(np.zeros((len(EVAL_SUMS), 1)))
    totals = jax.device_get(jax.tree_util.tree_map(lambda x: x[0], totals))
    return eval_rows(np.asarray([[float(totals[k])] for k in EVAL_SUMS]))

  def probe(self, state):
    if self._probe is None:
      return None
    (s,) = self.split(state)
    values = np.asarray(self._probe({}, s.params, s.batch_stats,
                                    jnp.asarray(self.data.probe_images)))
    return probe_rows(values[None], self.config.probe.percentiles)
