"""The loop never reads the devices between read steps: real programs (jit, vmapped
members, pmap) trained with every device-to-host read forbidden outside the program's
reading methods (`read`, `evaluate`, `probe`, `split`, `measure`), which record when
they are called.

Two guards, for the whole run:
* JAX's transfer guard ('disallow_explicit'). It is enforced where device memory is
  not host memory (GPU, TPU); on CPU NumPy reads device buffers in place, unguarded.
* On every backend: what `dispatch` returns must be device arrays (not values already
  read), and it reaches the loop sealed: any look at it (NumPy conversion, indexing,
  `float`, truth value) raises; only `read` and `wait` unseal it.
"""

import dataclasses

import jax
import numpy as np
import pytest

from bn_research import inputs
from bn_research.engine import loop
from bn_research.engine import programs
from tests import helpers

READERS = ('read', 'evaluate', 'probe', 'split', 'measure')


class Sealed:
  """A chunk's outputs as the loop holds them: opaque until `read`."""

  def __init__(self, outputs):
    self.outputs = outputs

  def _refuse(self, *args, **kwargs):
    raise AssertionError('a chunk\'s outputs were looked at outside a read step')

  __array__ = __getitem__ = __iter__ = __len__ = __float__ = __bool__ = _refuse


class Guarded:
  """A program whose reading methods alone may transfer to the host."""

  def __init__(self, program):
    self._program = program
    self.calls = []  # (method, number of chunks dispatched so far)
    self.dispatched = 0

  def dispatch(self, state, chunk):
    state, outputs = self._program.dispatch(state, chunk)
    self.dispatched += 1
    leaves = jax.tree_util.tree_leaves(outputs)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves), (
        'dispatch returned values already on the host')
    return state, Sealed(outputs)

  def wait(self, sealed):
    self._program.wait(sealed.outputs)

  def read(self, sealed):
    self.calls.append(('read', self.dispatched))
    with jax.transfer_guard_device_to_host('allow'):
      return self._program.read([s.outputs for s in sealed])

  def __getattr__(self, name):
    attr = getattr(self._program, name)
    if name not in READERS:
      return attr

    def allowed(*args, **kwargs):
      self.calls.append((name, self.dispatched))
      with jax.transfer_guard_device_to_host('allow'):
        return attr(*args, **kwargs)
    return allowed


class Sink:
  def __init__(self):
    self.rows, self.statuses = [], []

  def write_metrics(self, step, row):
    self.rows.append((step, row))

  def save(self, step, state):
    pass

  def mark_running(self):
    pass

  def finish(self, status, step, **extra):
    self.statuses.append((status, step))


def _program(layout):
  config = helpers.tiny_mlp_config(num_train_steps=40, log_every_steps=20,
                                   eval_every_steps=40, checkpoint_every_steps=40,
                                   steps_per_dispatch=5)
  config.parallelism = 'pmap' if layout == 'pmap' else 'jit'
  data = inputs.load_run_data(config)
  devices = jax.devices()[:1]
  if layout == 'pmap':
    return config, programs.PmapProgram(config, data, devices)
  hparams = ({'optimizer.learning_rate': np.asarray([0.1, 0.3], np.float32)}
             if layout == 'vmap' else {})
  return config, programs.JitProgram(config, data, devices, hparams=hparams,
                                     num_members=2 if layout == 'vmap' else 1,
                                     vmapped=layout == 'vmap')


@pytest.mark.parametrize('layout', ['jit', 'vmap', 'pmap'])
def test_chunks_between_log_steps_read_nothing_from_the_devices(layout):
  config, program = _program(layout)
  state = program.init()
  with pytest.raises(AssertionError, match='outside a read step'):
    np.asarray(Sealed(None))
  guarded = Guarded(program)
  sinks = [Sink() for _ in range(program.num_members)]
  with jax.transfer_guard_device_to_host('disallow_explicit'):
    results = loop.run(guarded, sinks, state, start_step=0,
                       cadence=loop.Cadence.from_config(config))
  assert [r['status'] for r in results] == ['done'] * program.num_members
  # 8 chunks of 5 steps; metrics read twice, each time after 4 chunks (log steps 20, 40).
  assert guarded.dispatched == 8
  assert [c for c in guarded.calls if c[0] == 'read'] == [('read', 4), ('read', 8)]
  # Evaluations at steps 0 and 40 only; state copies at the checkpoint steps 0 and 40.
  assert [c for c in guarded.calls if c[0] == 'evaluate'] == [('evaluate', 0),
                                                               ('evaluate', 8)]
  assert {n for _, n in guarded.calls} == {0, 4, 8}
  for sink in sinks:
    assert [s for s, _ in sink.rows] == [0, 20, 40]
    assert np.isfinite(sink.rows[1][1]['train_loss'])


class _StreamOf:
  """A host pipeline that streams an in-memory input's batches, in its order."""

  def __init__(self, source):
    self.source = source
    self.opened = []

  def train_batches(self, start_step):
    self.opened.append(start_step)
    step = start_step
    images, labels = self.source.resident['image'], self.source.resident['label']
    while True:
      idx = self.source.example_indices(step, 1)[0]
      yield {'image': np.asarray(images[idx]), 'label': np.asarray(labels[idx])}
      step += 1


def test_population_statistics_of_streamed_data_equal_the_in_memory_ones():
  """Algorithm 2 on a stream reads the stream's first N batches (from a stream of its
  own, the training stream untouched): the same batches, so the same evaluation, as
  the in-memory run (whose statistics tests/test_population_eval.py checks against a
  float64 NumPy Algorithm 2)."""
  config = helpers.tiny_mlp_config(**{
      'num_train_steps': 30, 'log_every_steps': 10, 'eval_every_steps': 15,
      'checkpoint_every_steps': 30, 'steps_per_dispatch': 5,
      'eval.batch_stats': 'population', 'eval.population_batches': 7})
  memory = inputs.load_run_data(config)
  pipeline = _StreamOf(memory.source)
  stream = dataclasses.replace(memory, source=inputs.StreamInput(pipeline))
  devices = jax.devices()[:1]
  rows = {}
  for name, data in (('memory', memory), ('stream', stream)):
    program = programs.JitProgram(config, data, devices, hparams={}, num_members=1,
                                  vmapped=False)
    sink = Sink()
    loop.run(program, [sink], program.init(), start_step=0,
             cadence=loop.Cadence.from_config(config))
    rows[name] = dict(sink.rows)
  # The training stream opened once at 0, the population's own stream once (its
  # batches are kept for the later estimates).
  assert pipeline.opened == [0, 0]
  assert sorted(rows['stream']) == sorted(rows['memory']) == [0, 10, 15, 20, 30]
  for step in (0, 15, 30):
    for key in ('eval_loss', 'eval_accuracy'):
      assert rows['stream'][step][key] == pytest.approx(rows['memory'][step][key],
                                                        rel=1e-6), (step, key)
  # ...and the estimate is not the moving averages'.
  config.eval.batch_stats = 'moving_average'
  program = programs.JitProgram(config, memory, devices, hparams={}, num_members=1,
                                vmapped=False)
  sink = Sink()
  loop.run(program, [sink], program.init(), start_step=0,
           cadence=loop.Cadence.from_config(config))
  assert abs(dict(sink.rows)[30]['eval_loss'] - rows['stream'][30]['eval_loss']) > 1e-4
