"""The one training loop, driven by a NumPy program: no JAX, milliseconds per test.

The fake program's "training" is arithmetic whose every value the tests can predict:
member k's loss at step s is `base[k] + s / 1000`, its accuracy s / total, and a member
can be made to go non-finite (or to blow its loss up) at a chosen step.
"""

import math

import numpy as np
import pytest

from bn_research.engine import loop


class FakeProgram:
  """K members; the state is the step reached and each member's parameter sum."""

  def __init__(self, k, *, nan_at=None, bad_params_at=None, huge_at=None, total=100):
    self.num_members = k
    self.base = np.arange(k, dtype=np.float64)
    self.nan_at = nan_at or {}
    self.bad_params_at = bad_params_at or {}
    self.huge_at = huge_at or {}
    self.total = total
    self.dispatches = []
    self.evaluations = []
    self.log = []  # ('prepare' | 'dispatch' | 'read', start or [chunk starts])

  def loss(self, k, s):
    if self.nan_at.get(k, math.inf) <= s:
      return math.nan
    if self.huge_at.get(k, math.inf) <= s:
      return 1e6
    return self.base[k] + s / 1000

  def prepare(self, start, n):
    self.log.append(('prepare', start))
    return (start, n)

  def dispatch(self, state, chunk):
    start, n = chunk
    self.log.append(('dispatch', start))
    self.dispatches.append((start, n))
    steps = np.arange(start + 1, start + n + 1)
    losses = np.array([[self.loss(k, s) for s in steps] for k in range(self.num_members)])
    acc = np.tile(steps / self.total, (self.num_members, 1))
    lr = np.tile(0.1 * np.ones(n), (self.num_members, 1))
    finite = np.array([self.bad_params_at.get(k, math.inf) > start + n
                       for k in range(self.num_members)])
    return start + n, (start, ({'loss': losses, 'accuracy': acc, 'learning_rate': lr}, finite))

  def read(self, outputs):
    self.log.append(('read', [start for start, _ in outputs]))
    return [out for _, out in outputs]

  def wait(self, outputs):
    pass

  def evaluate(self, state):
    self.evaluations.append(state)
    return [{'eval_loss': float(self.base[k] + state), 'eval_accuracy': 0.5}
            for k in range(self.num_members)]

  def probe(self, state):
    return None

  def split(self, state):
    return [('state', k, state) for k in range(self.num_members)]


class RecordingSink:
  def __init__(self, name):
    self.name = name
    self.rows, self.saved, self.statuses = [], [], []

  def write_metrics(self, step, row):
    self.rows.append((step, dict(row)))

  def save(self, step, state):
    self.saved.append(step)

  def mark_running(self):
    self.statuses.append(('running', self.saved[-1]))

  def finish(self, status, step, **extra):
    self.statuses.append((status, step, extra))


def _run(program, k, cadence, start=0, **kw):
  sinks = [RecordingSink(f'm{i}') for i in range(k)]
  results = loop.run(program, sinks, start, start_step=start, cadence=cadence, **kw)
  return sinks, results


@pytest.mark.parametrize('k', [1, 3])
def test_rows_checkpoints_and_sums_follow_the_cadence(k):
  cadence = loop.Cadence(total=100, log_every=20, eval_every=50, checkpoint_every=40,
                         dispatch_every=7)  # 7 divides none of the intervals
  program = FakeProgram(k)
  sinks, results = _run(program, k, cadence)
  ends = [s + n for s, n in program.dispatches]
  # Chunks end at every log, eval and checkpoint step and at dispatch limits.
  for every in (20, 50, 40):
    assert set(range(every, 101, every)) <= set(ends)
  assert all(n <= 7 for _, n in program.dispatches)
  assert sum(n for _, n in program.dispatches) == 100
  for i, sink in enumerate(sinks):
    steps = [s for s, _ in sink.rows]
    assert steps == [0, 20, 40, 50, 60, 80, 100]
    rows = dict(sink.rows)
    # A train row is the mean over its log interval: steps 21..40 for the row at 40.
    assert rows[40]['train_loss'] == pytest.approx(i + np.mean(np.arange(21, 41)) / 1000)
    assert rows[40]['train_accuracy'] == pytest.approx(np.mean(np.arange(21, 41)) / 100)
    assert 'eval_loss' in rows[50] and 'train_loss' not in rows[50]
    assert 'eval_loss' in rows[100] and 'train_loss' in rows[100]
    assert rows[0] == {'eval_loss': float(i), 'eval_accuracy': 0.5}
    assert sink.saved == [0, 40, 80, 100]
    assert sink.statuses[-1][0] == 'done' and sink.statuses[-1][1] == 100
    assert sink.statuses[-1][2]['eval_loss'] == pytest.approx(i + 100)
    assert results[i]['status'] == 'done' and results[i]['step'] == 100
  assert program.evaluations == [0, 50, 100]


def test_one_member_going_non_finite_stops_alone_at_its_own_step():
  cadence = loop.Cadence(total=60, log_every=10, eval_every=30, checkpoint_every=20,
                         dispatch_every=10)
  program = FakeProgram(3, nan_at={1: 17}, bad_params_at={2: 45})
  sinks, results = _run(program, 3, cadence)
  assert [r['status'] for r in results] == ['done', 'diverged', 'diverged']
  assert results[1]['diverged_step'] == 17 and results[1]['reason'] == 'non-finite loss'
  # Non-finite parameters are seen at the end of the chunk that made them.
  assert results[2]['diverged_step'] == 50 and results[2]['reason'] == 'non-finite parameters'
  assert [s for s, _ in sinks[1].rows] == [0, 10, 17]
  assert math.isnan(sinks[1].rows[-1][1]['train_loss'])
  assert sinks[1].saved == [0]  # nothing after its last finite checkpoint
  assert sinks[2].saved == [0, 20, 40]
  assert sinks[0].saved == [0, 20, 40, 60]
  # The others' rows are untouched by the diverged member.
  assert dict(sinks[0].rows)[30]['train_loss'] == pytest.approx(np.mean(np.arange(21, 31)) / 1000)
  assert sinks[1].statuses[-1][:2] == ('diverged', 17)


def test_a_mean_loss_above_max_loss_over_a_log_interval_is_divergence():
  cadence = loop.Cadence(total=40, log_every=10, eval_every=40, checkpoint_every=20,
                         dispatch_every=5)
  program = FakeProgram(2, huge_at={0: 26})
  sinks, results = _run(program, 2, cadence, max_loss=100.0)
  assert results[0]['status'] == 'diverged' and results[0]['step'] == 30
  assert results[0]['reason'] == 'loss above 100'
  assert sinks[0].rows[-1][0] == 30 and sinks[0].rows[-1][1]['train_loss'] > 100
  assert results[1]['status'] == 'done'
  # 0 disables the test.
  _, results = _run(FakeProgram(2, huge_at={0: 26}), 2, cadence, max_loss=0.0)
  assert [r['status'] for r in results] == ['done', 'done']


def test_resumed_loop_starts_at_its_step_without_a_step_0_row():
  cadence = loop.Cadence(total=50, log_every=10, eval_every=25, checkpoint_every=20,
                         dispatch_every=100)
  program = FakeProgram(1)
  sinks, _ = _run(program, 1, cadence, start=20)
  assert program.dispatches[0] == (20, 5)
  assert [s for s, _ in sinks[0].rows] == [25, 30, 40, 50]
  assert sinks[0].saved == [40, 50]


def test_a_stop_request_saves_and_records_interrupted():
  cadence = loop.Cadence(total=100, log_every=10, eval_every=50, checkpoint_every=50,
                         dispatch_every=10)
  program = FakeProgram(2, nan_at={1: 5})

  def stop():
    return 15 if program.dispatches[-1][0] >= 20 else None

  sinks = [RecordingSink('a'), RecordingSink('b')]
  with pytest.raises(loop.Interrupted) as err:
    loop.run(program, sinks, 0, start_step=0, cadence=cadence, stop_requested=stop)
  assert err.value.signum == 15 and err.value.step == 30
  assert sinks[0].saved == [0, 30]
  assert sinks[0].statuses[-1] == ('interrupted', 30, {'signal': 15})
  assert sinks[1].statuses[-1][:2] == ('diverged', 5)


def test_a_failure_is_recorded_then_raised():
  class Broken(FakeProgram):
    def dispatch(self, state, chunk):
      if chunk[0] >= 20:
        raise RuntimeError('device lost')
      return super().dispatch(state, chunk)

  cadence = loop.Cadence(total=40, log_every=10, eval_every=40, checkpoint_every=20,
                         dispatch_every=10)
  sinks = [RecordingSink('a')]
  with pytest.raises(RuntimeError):
    loop.run(Broken(1), sinks, 0, start_step=0, cadence=cadence)
  status, step, extra = sinks[0].statuses[-1]
  assert status == 'failed' and step == 20 and 'device lost' in extra['message']


def test_actions_see_every_chunk_and_may_annotate_rows():
  cadence = loop.Cadence(total=30, log_every=10, eval_every=30, checkpoint_every=30,
                         dispatch_every=5)
  seen = []

  def action(step, report):
    seen.append((step, report.num_steps))
    for row in report.train_rows:
      if row is not None:
        row['steps_per_second'] = 123.0

  sinks, _ = _run(FakeProgram(1), 1, cadence, actions=[action])
  assert seen == [(s, 5) for s in range(5, 31, 5)]
  assert all(r['steps_per_second'] == 123.0 for s, r in sinks[0].rows if 'train_loss' in r)


def test_cadence_predicate_and_chunk_ends():
  c = loop.Cadence(total=95, log_every=20, eval_every=0, checkpoint_every=30,
                   dispatch_every=50)
  assert [s for s in range(96) if c.is_time(s, 20)] == [0, 20, 40, 60, 80, 95]
  assert [s for s in range(1, 96) if c.is_time(s, 0)] == [95]
  ends, s = [], 0
  while s < 95:
    s = c.chunk_end(s)
    ends.append(s)
  assert ends == [20, 30, 40, 50, 60, 80, 90, 95]


def test_metrics_are_read_only_at_read_steps_and_the_next_chunk_is_prepared_ahead():
  # Log every 20, chunks of 5: three chunks between two reads stay unread.
  cadence = loop.Cadence(total=40, log_every=20, eval_every=40, checkpoint_every=40,
                         dispatch_every=5)
  program = FakeProgram(2, nan_at={1: 12})
  sinks, results = _run(program, 2, cadence)
  reads = [starts for kind, starts in program.log if kind == 'read']
  assert reads == [[0, 5, 10, 15], [20, 25, 30, 35]]
  # Chunk k+1 is prepared right after chunk k is dispatched (before anything is read).
  kinds = [(kind, x) for kind, x in program.log if kind != 'read']
  assert kinds[:4] == [('prepare', 0), ('dispatch', 0), ('prepare', 5), ('dispatch', 5)]
  assert ('prepare', 40) not in kinds  # nothing past the last step
  # A divergence inside an unread chunk is still recorded at its own step.
  assert results[1]['status'] == 'diverged' and results[1]['diverged_step'] == 12
  assert [s for s, _ in sinks[1].rows] == [0, 12]
  # The live member's sums cover every chunk between the reads.
  assert dict(sinks[0].rows)[20]['train_loss'] == pytest.approx(np.mean(np.arange(1, 21)) / 1000)


def test_a_signal_inside_a_long_phase_ends_the_run_at_its_newest_checkpoint():
  class SlowEval(FakeProgram):
    def evaluate(self, state):
      if state == 50:  # a signal arrives between two evaluation batches
        raise loop.Stopped(15)
      return super().evaluate(state)

  cadence = loop.Cadence(total=100, log_every=10, eval_every=50, checkpoint_every=20,
                         dispatch_every=10)
  sinks = [RecordingSink('a')]
  with pytest.raises(loop.Interrupted) as err:
    loop.run(SlowEval(1), sinks, 0, start_step=0, cadence=cadence)
  assert err.value.signum == 15 and err.value.step == 40
  assert sinks[0].saved == [0, 20, 40]
  assert sinks[0].statuses[-1] == ('interrupted', 40, {'signal': 15})
  # Nothing of step 50 was written (the resumed run writes it, from step 40 on).
  assert max(s for s, _ in sinks[0].rows) == 40


def test_stop_checker_raises_once_a_signal_was_received():
  received = []
  check = loop.stop_checker(lambda: received[0] if received else None)
  check()
  received.append(2)
  with pytest.raises(loop.Stopped) as err:
    check()
  assert err.value.signum == 2
