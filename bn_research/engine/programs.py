"""Layouts: how K members' compiled program is built and placed on the devices.

Every layout returns a `Program`, the one interface the loop drives (`loop.run`):

* `JitProgram(vmapped=False)`: one member (a plain run), `jax.jit` over a 1-D `data`
  mesh; the state is replicated and the global batch sharded, so BN's statistics are
  over the global batch (XLA's partitioner places the collectives).
* `JitProgram(vmapped=True)`: K members `jax.vmap`ped in one program on a 2-D
  `members x data` mesh. The member axis of the state is sharded over `members`; each
  member's batch over `data`. The swept values are traced per-member inputs. BN's
  statistics are taken per member (vmap never mixes slices), over that member's batch.
  The member axis is mapped by hand (`jax.shard_map` over `members`, the `data` axis
  left to the partitioner): each device vmaps its own members, so no convolution is
  ever partitioned along the member axis. Left to XLA's SPMD partitioner, a vmapped
  convolution (per-member kernels become one grouped convolution whose groups are the
  members) sharded over `members` computed wrong values on XLA:CPU (jax 0.10.2: a
  1x1 convolution off by the size of its output, `tests/test_engine_members.py`).
* `PmapProgram`: one member under `jax.pmap` with axis name 'batch'; gradients are
  averaged and BN pools its statistics across replicas through that axis name.

Host-facing results always carry a member axis: metrics (K, n), finiteness (K,),
one evaluation row per member, and `split` / `place` convert between the program's
state and per-member `TrainState`s of NumPy arrays (what checkpoints hold).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bn_research import inputs as inputs_lib
from bn_research import models
from bn_research import normalization
from bn_research.engine import state as state_lib
from bn_research.engine import steps
# The loop's interface and the pmap layout live in their own modules; their names are
# this module's too (`programs.Program`, `programs.PmapProgram`, ...).
from bn_research.engine.layout import (EVAL_SUMS, PMAP_AXIS, Compiled,  # pylint: disable=unused-import
                                       Program, compile_interruptibly, eval_rows,
                                       mesh_shape, outputs_pair, probe_rows)
from bn_research.engine.pmap_program import PmapProgram  # pylint: disable=unused-import


def member_vmap(fn: Callable, in_axes: tuple, mesh: jax.sharding.Mesh, *,
                broadcast: Sequence[int] = ()) -> Callable:
  """`fn` vmapped over members (`in_axes`: 0 per member, None shared), each device
  mapping its own members: `jax.shard_map` manual over `members`, automatic over
  `data` (the partitioner still splits a member's batch). Every output is per member.

  The shared arguments at positions `broadcast` are broadcast to the member axis
  first. Convolutional models need that: XLA's batching of a convolution whose kernel
  is per member but whose input is shared is not implemented for grouped (depthwise)
  convolutions under a sharded program; with both batched it is. What is broadcast is
  an index chunk (in-memory data) or one batch (streamed data).
  """
  batched = jax.vmap(fn, in_axes=tuple(0 if i in broadcast else a
                                       for i, a in enumerate(in_axes)))

  def device_members(*args):
    k = jax.tree_util.tree_leaves(args[1])[0].shape[0]  # this device's members
    return batched(*(jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), a)
                     if i in broadcast else a for i, a in enumerate(args)))

  specs = tuple(P() if a is None else P('members') for a in in_axes)
  return jax.shard_map(device_members, mesh=mesh, in_specs=specs, out_specs=P('members'),
                       axis_names={'members'})


class JitProgram(Program):
  """One member (vmapped=False) or K vmapped members under jit on a device mesh.

  Args:
    config: the run's config; for a sweep, the first member's (the swept values come
      from `hparams`).
    data: the run's inputs (`inputs.RunData`).
    devices: the devices of the mesh (all processes').
    hparams: {swept key: (K,) values} for a vmapped program; {} for a plain run.
    member_sources: for a vmapped program whose members read their own data order
      (a seed sweep on in-memory data), one input per member; else None (shared).
    vmapped: whether the state has a member axis.
    compiler_options: XLA options for the train, eval and probe programs.
  """

  def __init__(self, config: ml_collections.ConfigDict, data: inputs_lib.RunData,
               devices: Sequence[Any], *, hparams: Mapping[str, np.ndarray],
               num_members: int, member_sources: Optional[Sequence[Any]] = None,
               vmapped: bool = True, compiler_options: Optional[dict] = None):
    self.config = config
    self.data = data
    self.vmapped = vmapped
    self.num_members = num_members
    self.hparams = {k: np.asarray(v) for k, v in hparams.items()}
    self.member_sources = member_sources
    self.layout = 'vmap' if vmapped else 'jit'
    options = compiler_options or None
    process_count = jax.process_count()
    self._process_count = process_count
    builder = steps.Builder(config, data.num_classes)
    self.mesh = (mesh_shape(num_members, len(devices)) if vmapped
                 else {'members': 1, 'data': len(devices)})
    mesh = jax.make_mesh((self.mesh['members'], self.mesh['data']), ('members', 'data'),
                         devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    self._replicated = NamedSharding(mesh, P())
    # A vmapped state's leading axis is the member axis; a plain state is replicated.
    self._state_sharding = NamedSharding(mesh, P('members') if vmapped else P())
    self._hparams_sharding = self._state_sharding
    self._batch_sharding = NamedSharding(mesh, P('data'))
    own_data = member_sources is not None
    self._chunk_sharding = NamedSharding(
        mesh, P('members', None, 'data') if own_data else P(None, 'data'))
    self._own_data = own_data

    source = data.source
    self._resident = jax.device_put(source.resident, self._replicated)
    # Image models need the shared input broadcast to the member axis (`member_vmap`).
    convolutional = models.entry_for(config.model).images
    shared_chunk = (3,) if convolutional and not own_data else ()
    init_fn = steps.make_init(builder)
    run_chunk = outputs_pair(
        steps.make_chunk_fn(steps.make_train_step(builder), source.materialize))
    eval_step = steps.make_eval_step(builder, source.materialize_eval)
    probe_fn = steps.make_probe_fn(builder) if data.probe_images is not None else None
    if vmapped:
      chunk_axes = (0, 0, None, 0 if own_data else None)
      run_chunk = member_vmap(run_chunk, chunk_axes, mesh, broadcast=shared_chunk)
      eval_step = member_vmap(eval_step, (0, 0, 0, None), mesh,
                              broadcast=(3,) if convolutional else ())
      if probe_fn is not None:
        probe_fn = member_vmap(probe_fn, (0, 0, 0, None), mesh)
    self._init = init_fn
    self._run_chunk = Compiled(jax.jit(
        run_chunk, donate_argnums=(1,), compiler_options=options,
        out_shardings=(self._state_sharding, (self._replicated, self._replicated))), self)
    self._eval = Compiled(jax.jit(eval_step, compiler_options=options,
                                   out_shardings=self._replicated), self)
    # Evaluation sums stay on the devices until the whole split has been seen.
    self._add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b),
                        out_shardings=self._replicated)
    self._probe = (jax.jit(probe_fn, compiler_options=options,
                           out_shardings=self._replicated) if probe_fn is not None else None)
    self._population = None
    self._last_stats: Optional[tuple] = None
    self._population_chunk: Optional[dict] = None
    if (config.eval.batch_stats == 'population'
        and config.model.normalizer in normalization.MOVING_AVERAGE_NORMALIZERS):
      population_fn = steps.make_population_moments_fn(builder, source.materialize)
      finish = steps.population_batch_stats
      if vmapped:
        population_fn = member_vmap(
            population_fn, (0, 0, 0, None, 0 if own_data else None), mesh,
            broadcast=(4,) if convolutional and not own_data else ())
        finish = jax.vmap(finish, in_axes=(0, 0, None))
      self._population = Compiled(jax.jit(population_fn, compiler_options=options,
                                           out_shardings=self._state_sharding), self)
      self._population_add = jax.jit(steps.add_moments, out_shardings=self._state_sharding)
      self._population_finish = jax.jit(finish, static_argnums=(2,),
                                         out_shardings=self._state_sharding)
    self._measure = None
    if config.measure.every_steps:
      from bn_research import measure as measure_lib  # pylint: disable=g-import-not-at-top
      # The layers' order is read once, outside jit (traced dicts come back sorted).
      first = {k: v[0] for k, v in self.hparams.items()}
      layers = measure_lib.model_layers(measure_lib.creation_order(
          builder.model(first), np.asarray(data.sample_image)))
      measure_fn = steps.make_measure_fn(builder, layers, source.materialize)
      if vmapped:
        measure_fn = member_vmap(measure_fn, (0, 0, None, 0 if own_data else None), mesh,
                                 broadcast=shared_chunk)
      self._measure = jax.jit(measure_fn, compiler_options=options,
                              out_shardings=self._replicated)
    # The swept values on the devices ({} for a plain run: nothing is traced).
    self._hp = self._global(self.hparams, self._hparams_sharding)
    self._eval_batches: Optional[list] = None
    self._probe_images = None

  # ---- placement ---------------------------------------------------------------

  def _global(self, tree: Any, sharding: NamedSharding) -> Any:
    """Host arrays that every process holds in full -> global arrays with `sharding`."""
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree_util.tree_map(put, tree)

  def _process_local(self, tree: Any, sharding: NamedSharding, batch_axis: int) -> Any:
    """This process's slice of a batch (axis `batch_axis`) -> global arrays."""
    def put(x):
      shape = list(x.shape)
      shape[batch_axis] *= self._process_count
      return jax.make_array_from_process_local_data(sharding, x, tuple(shape))
    return jax.tree_util.tree_map(put, tree)

  def init(self) -> Any:
    image = np.asarray(self.data.sample_image)
    # The keys, the initialisers and the optimizer's zeros in one program, compiled
    # without XLA's backend optimisations: the run time of one initialisation does not
    # matter, its compile time does (about 2x faster to build Inception on CPU).
    # Members are initialised one by one with that one program, not vmapped: batched
    # 'rbg' initialisers would draw other numbers than the member's separate run.
    members = [{k: v[i] for k, v in self.hparams.items()} for i in range(self.num_members)]
    init = compile_interruptibly(
        lambda: jax.jit(self._init).lower(members[0], image).compile(
            {'xla_backend_optimization_level': 0}), self.check_stop)
    return self.place([jax.device_get(init(hp, image)) for hp in members])

  def place(self, members: Sequence[Any]) -> Any:
    if self.vmapped:
      host = state_lib.stack_states(members)
    else:
      (host,) = members
      host = jax.tree_util.tree_map(np.asarray, host)
    return self._global(host, self._state_sharding)

  def split(self, state: Any) -> list[Any]:
    if self._process_count > 1:
      # Every process needs every member's values (process 0 writes the files).
      state = jax.jit(lambda s: s, out_shardings=self._replicated)(state)
    if self.vmapped:
      return state_lib.unstack_state(state, self.num_members)
    return [jax.tree_util.tree_map(np.asarray, jax.device_get(state))]

  # ---- training ----------------------------------------------------------------

  def _chunk(self, start: int, num_steps: int) -> Any:
    if self._own_data:
      chunk = {'index': np.stack([s.example_indices(start, num_steps)
                                  for s in self.member_sources])}
      return self._global(chunk, self._chunk_sharding)
    chunk = self.data.source.chunk(start, num_steps)
    if self.data.in_memory:
      return self._global(chunk, self._chunk_sharding)
    return self._process_local(chunk, self._chunk_sharding, batch_axis=1)

  def prepare(self, start, num_steps):
    return self._chunk(start, num_steps)

  def dispatch(self, state, chunk):
    return self._run_chunk(self._hp, state, self._resident, chunk)

  # ---- evaluation ----------------------------------------------------------------

  def placed_eval_batches(self) -> Iterator[Any]:
    """The held-out batches on the devices. A small in-memory test set is placed once
    and kept; streamed batches are placed one at a time as the evaluation reaches
    them (the host produces batch i+1 while the devices evaluate batch i)."""
    if self._eval_batches is not None:
      yield from self._eval_batches
      return
    if self.data.in_memory:
      self._eval_batches = [self._global(b, self._batch_sharding)
                            for b in self.data.eval_batches()]
      yield from self._eval_batches
      return
    for b in self.data.eval_batches():
      yield self._process_local(b, self._batch_sharding, batch_axis=0)

  def _population_batches(self) -> dict:
    """The first `eval.population_batches` training batches of the run's data order, on
    the host: the same batches at every evaluation, so the estimates are comparable.
    Streamed data reads them once, from a stream of its own opened at step 0."""
    if self._population_chunk is None:
      n = self.config.eval.population_batches
      if self._own_data:
        self._population_chunk = {'index': np.stack([s.example_indices(0, n)
                                                     for s in self.member_sources])}
      elif self.data.in_memory:
        self._population_chunk = self.data.source.chunk(0, n)
      else:
        self._population_chunk = self.data.source.fixed_chunk(0, n)
    return self._population_chunk

  def _place_population_piece(self, lo: int, hi: int) -> Any:
    chunk = self._population_batches()
    if self._own_data:
      return self._global({k: v[:, lo:hi] for k, v in chunk.items()}, self._chunk_sharding)
    piece = {k: v[lo:hi] for k, v in chunk.items()}
    if self.data.in_memory:
      return self._global(piece, self._chunk_sharding)
    return self._process_local(piece, self._chunk_sharding, batch_axis=1)

  def inference_statistics(self, state) -> Any:
    """BN's statistics for evaluation: the moving averages, or Algorithm 2's population
    statistics from the first `eval.population_batches` training batches.

    The batches go through in pieces of at most `steps_per_dispatch` (a signal is
    noticed between pieces); each piece's moments are summed on the devices.
    """
    if self._population is None:
      return state.batch_stats
    if self._last_stats is not None and self._last_stats[0] is state:
      return self._last_stats[1]  # the probe right after the evaluation
    n = self.config.eval.population_batches
    piece = max(1, min(n, self.config.steps_per_dispatch))
    sums = None
    for lo in range(0, n, piece):
      self.check_stop()
      moments = self._population(self._hp, state.params, state.batch_stats, self._resident,
                                 self._place_population_piece(lo, min(n, lo + piece)))
      sums = moments if sums is None else self._population_add(sums, moments)
    stats = self._population_finish(state.batch_stats, sums, n)
    self._last_stats = (state, stats)
    return stats

  def evaluate(self, state) -> list[dict]:
    stats = self.inference_statistics(state)
    totals = None
    for b in self.placed_eval_batches():
      self.check_stop()
      out = self._eval(self._hp, state.params, stats, b)
      totals = out if totals is None else self._add(totals, out)
    if totals is None:
      return eval_rows(np.zeros((len(EVAL_SUMS), self.num_members)))
    totals = jax.device_get(totals)  # the one read of this evaluation
    return eval_rows(np.stack([np.asarray(totals[k], np.float64).reshape(-1)
                                for k in EVAL_SUMS]))

  def measure(self, state, step: int) -> Optional[list[dict]]:
    if self._measure is None:
      return None
    out = self._measure(self._hp, state, self._resident, self._chunk(step, 1))
    out = {k: np.asarray(v, np.float64).reshape(self.num_members) for k, v in out.items()}
    return [{k: float(v[i]) for k, v in out.items()} for i in range(self.num_members)]

  def probe(self, state) -> Optional[list[dict]]:
    if self._probe is None:
      return None
    if self._probe_images is None:
      self._probe_images = self._global(np.asarray(self.data.probe_images),
                                        self._replicated)
    values = np.asarray(self._probe(self._hp, state.params, self.inference_statistics(state),
                                    self._probe_images)).reshape(self.num_members, -1)
    return probe_rows(values, self.config.probe.percentiles)
