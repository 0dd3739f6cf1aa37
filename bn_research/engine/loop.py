"""The training loop: the only one in the project. It drives any `Program`.

A run is K members (K = 1 for a plain run). The loop asks the program for chunks of
steps that end on every log, eval and checkpoint step (so a resumed run sees exactly
the chunks an uninterrupted one did), keeps each member's running sums, and decides per
member, at each chunk end:

* divergence: a non-finite loss or parameter, or (at a log step) a mean training loss
  over the log interval above `max_loss`: the member is recorded `diverged` at its own
  step, with the reason, and is ignored from then on (its slice cannot affect the
  others: vmap never mixes members);
* what to write: train rows at log steps, eval (and probe) rows at eval steps, a
  checkpoint at checkpoint steps, through the member's `Sink`.

Everything else that happens periodically (progress bar, ETA line, a test's kill hook)
is an action `action(step, report)` called after every chunk, before its rows are
written (an action may add to them: the log line adds `steps_per_second`).

The loop touches no file and no device itself: `Sink`s write, the `Program` computes.
Tests drive it with a NumPy program and recording sinks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Protocol, Sequence

from absl import logging
import numpy as np


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When things happen. One predicate, `is_time`, for every interval.

  Attributes:
    total: the last step.
    log_every, eval_every, checkpoint_every: intervals (0: only at the last step).
    dispatch_every: the most steps one dispatch runs.
    measure_every: interval of the program's measurements (0: never).
  """
  total: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  dispatch_every: int = 1
  measure_every: int = 0

  @classmethod
  def from_config(cls, config) -> 'Cadence':
    return cls(total=config.num_train_steps, log_every=config.log_every_steps,
               eval_every=config.eval_every_steps,
               checkpoint_every=config.checkpoint_every_steps,
               dispatch_every=config.steps_per_dispatch,
               measure_every=config.measure.every_steps)

  def is_measure_step(self, step: int) -> bool:
    """Measurements at multiples of measure_every, step 0 included, never at the end
    unless it is one (they look at the next update's batch)."""
    return bool(self.measure_every) and step % self.measure_every == 0

  def is_time(self, step: int, every: int) -> bool:
    """True at multiples of `every` and at the last step."""
    return step == self.total or bool(every) and step % every == 0

  def chunk_end(self, step: int) -> int:
    """The next step at which something happens (or the dispatch limit)."""
    ends = [self.total]
    for every in (self.dispatch_every, self.log_every, self.eval_every,
                  self.checkpoint_every, self.measure_every):
      if every:
        ends.append((step // every + 1) * every)
    return min(ends)


class Sink(Protocol):
  """Where one member's results go (a run directory, or a test's recorder)."""

  def write_metrics(self, step: int, row: dict) -> None: ...
  def save(self, step: int, state: Any) -> None: ...
  def mark_running(self) -> None: ...
  def finish(self, status: str, step: int, **extra: Any) -> None: ...


class Interrupted(Exception):
  """A run stopped by a signal after saving its state; `signum` says which."""

  def __init__(self, signum: int, step: int):
    super().__init__(f'interrupted by signal {signum} at step {step}')
    self.signum = signum
    self.step = step


@dataclasses.dataclass
class Report:
  """What an action sees after a chunk."""
  step: int
  num_steps: int
  total: int
  live: int
  members: int
  train_rows: list  # per member: its train row at a log step, else None
  eval_rows: list   # per member: its eval row at an eval step, else None
  time: float


@dataclasses.dataclass
class MemberState:
  """One member's bookkeeping while the loop runs."""
  sink: Any
  active: bool = True
  status: str = 'done'
  step: int = 0
  extra: dict = dataclasses.field(default_factory=dict)
  last: dict = dataclasses.field(default_factory=dict)
  loss_sum: float = 0.0
  accuracy_sum: float = 0.0
  count: int = 0

  def diverge(self, step: int, reason: str, row: dict) -> None:
    self.sink.write_metrics(step, row)
    self.active, self.step, self.status = False, step, 'diverged'
    self.extra = {'diverged_step': step, 'reason': reason,
                  'message': f'{reason} at step {step}'}

  def finish_as_recorded(self) -> None:
    """Writes the member's final status as the loop recorded it."""
    self.sink.finish(self.status, self.step, **self.extra, **_eval_metrics(self.last))

  def result(self) -> dict:
    return {'status': self.status, 'step': self.step, **self.extra, **self.last}


def _eval_metrics(row: dict) -> dict:
  return {k: v for k, v in row.items() if k.startswith('eval_')}


def run(program: Any, sinks: Sequence[Any], state: Any, *, start_step: int,
        cadence: Cadence, max_loss: float = 0.0,
        actions: Sequence[Callable[[int, Report], None]] = (),
        stop_requested: Callable[[], Optional[int]] = lambda: None,
        logged: Optional[Sequence[Sequence[dict]]] = None) -> list[dict]:
  """Trains the program's members from `start_step` to `cadence.total`.

  Args:
    program: a `programs.Program` (or anything with its dispatch / evaluate / probe /
      split methods and `num_members`).
    sinks: one per member, in member order.
    state: the program's placed state at `start_step`.
    start_step: where training starts (0, or a checkpoint's step).
    cadence: the run's intervals.
    max_loss: a member whose mean training loss over a log interval exceeds this is
      diverged ('loss above ...'); 0 disables the test.
    actions: called as `action(step, report)` after every chunk.
    stop_requested: returns a signal number when the run must stop (SIGTERM/SIGINT),
      else None; checked after every chunk.
    logged: per member, the rows it logged after step 0 up to `start_step` (a resumed
      run's), so that its final status holds the same metrics as an uninterrupted one.

  Returns:
    Per member: {'status', 'step', ...extra, ...last metrics}.

  Raises:
    Interrupted: when `stop_requested` said so; every live member's state at that step
      was saved and its status written 'interrupted'.
  """
  members = [MemberState(sink=s, step=start_step) for s in sinks]
  for m, rows in zip(members, logged or ()):
    for row in rows:
      m.last.update({k: v for k, v in row.items() if k != 'step'})
  step = start_step
  try:
    if step == 0:
      # A step-0 checkpoint: even a member that diverges at once keeps a finite state.
      for m, member_state in zip(members, program.split(state)):
        m.sink.save(0, member_state)
      rows = _evaluate(program, state)
      if cadence.is_measure_step(0):
        rows = [{**r, **x} for r, x in zip(rows, program.measure(state, 0))]
      for m, row in zip(members, rows):
        m.sink.write_metrics(0, row)
    while step < cadence.total and any(m.active for m in members):
      end = cadence.chunk_end(step)
      state, metrics, finite = program.dispatch(state, step, end - step)
      losses = np.asarray(metrics['loss'], np.float64)
      accuracies = np.asarray(metrics['accuracy'], np.float64)
      for k, m in enumerate(members):
        if not m.active:
          continue
        bad = np.flatnonzero(~np.isfinite(losses[k]))
        if bad.size or not finite[k]:
          at = step + int(bad[0]) + 1 if bad.size else end
          what = 'loss' if bad.size else 'parameters'
          logging.warning('%s: non-finite %s at step %d: diverged.', _name(m), what, at)
          # A NaN row marks the divergence step in metrics.jsonl for readers and
          # plots; the reason is in the status.
          m.diverge(at, f'non-finite {what}', {'train_loss': float('nan')})
          continue
        m.loss_sum += float(losses[k].sum())
        m.accuracy_sum += float(accuracies[k].sum())
        m.count += end - step
      step = end
      train_rows: list = [None] * len(members)
      eval_rows: list = [None] * len(members)
      live = [m for m in members if m.active]
      if live and cadence.is_time(step, cadence.log_every):
        learning_rates = np.asarray(metrics['learning_rate'])
        for k, m in enumerate(members):
          if not m.active:
            continue
          row = {'train_loss': m.loss_sum / m.count,
                 'train_accuracy': m.accuracy_sum / m.count,
                 'learning_rate': float(learning_rates[k][-1])}
          m.loss_sum, m.accuracy_sum, m.count = 0.0, 0.0, 0
          if max_loss and row['train_loss'] > max_loss:
            logging.warning('%s: mean training loss %.4g over the log interval ending at '
                            'step %d is above divergence.max_loss=%g: diverged.',
                            _name(m), row['train_loss'], step, max_loss)
            m.diverge(step, f'loss above {max_loss:g}', row)
            continue
          train_rows[k] = row
      live = [m for m in members if m.active]
      if live and cadence.is_time(step, cadence.eval_every):
        for k, row in enumerate(_evaluate(program, state)):
          if members[k].active:
            eval_rows[k] = row
      if live and cadence.is_measure_step(step):
        for k, row in enumerate(program.measure(state, step)):
          if members[k].active:
            eval_rows[k] = {**(eval_rows[k] or {}), **row}
      report = Report(step=step, num_steps=len(losses[0]), total=cadence.total,
                      live=len(live), members=len(members), train_rows=train_rows,
                      eval_rows=eval_rows, time=time.time())
      for action in actions:  # may add to the rows (e.g. steps_per_second)
        action(step, report)
      for k, m in enumerate(members):
        if not m.active:
          continue
        m.step = step
        row = {**(train_rows[k] or {}), **(eval_rows[k] or {})}
        if row:
          m.sink.write_metrics(step, row)
          m.last.update(row)
      signum = stop_requested()
      if live and (signum is not None or (cadence.is_time(step, cadence.checkpoint_every)
                                          and step < cadence.total)):
        for m, member_state in zip(members, program.split(state)):
          if m.active:
            m.sink.save(step, member_state)
            m.sink.mark_running()
      if signum is not None:
        for m in members:
          if m.active:
            m.sink.finish('interrupted', step, signal=signum)
          else:
            m.finish_as_recorded()
        raise Interrupted(signum, step)
    if any(m.active for m in members):
      for m, member_state in zip(members, program.split(state)):
        if m.active:
          m.sink.save(step, member_state)
  except Interrupted:
    raise
  except BaseException as e:  # record the failure, keep everything written so far
    for m in members:
      if m.active:
        m.sink.finish('failed', m.step, message=f'{type(e).__name__}: {e}')
      else:
        m.finish_as_recorded()
    raise
  for m in members:
    m.finish_as_recorded()
  return [m.result() for m in members]


def _evaluate(program: Any, state: Any) -> list[dict]:
  rows = program.evaluate(state)
  probes = program.probe(state)
  if probes is not None:
    rows = [{**r, **p} for r, p in zip(rows, probes)]
  return rows


def _name(member: MemberState) -> str:
  return str(getattr(member.sink, 'name', 'run'))


# ---------------------------------------------------------------- periodic actions


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class LogLine:
  """At log steps: loss, accuracy, steps/s, examples/s and ETA, one line.

  The first chunk includes compilation, so the overall rate (for the ETA) starts after it.
  """

  def __init__(self, start_step: int, batch_size: int):
    self._batch = batch_size
    self._t_log = time.time()
    self._step_log = start_step
    self._t_first: Optional[float] = None
    self._step_first = start_step

  def __call__(self, step: int, report: Report) -> None:
    if self._t_first is None:
      self._t_first, self._step_first = report.time, step
    rows = [r for r in report.train_rows if r is not None]
    if not rows:
      return
    rate = (step - self._step_log) / max(report.time - self._t_log, 1e-9)
    self._t_log, self._step_log = report.time, step
    overall = ((step - self._step_first) / max(report.time - self._t_first, 1e-9)
               if step > self._step_first else rate)
    eta = format_eta((report.total - step) / max(overall, 1e-9))
    for r in rows:
      r['steps_per_second'] = rate
    if report.members == 1:
      logging.info('step %d/%d  loss %.4f  acc %.4f  %.1f steps/s  %.0f examples/s  ETA %s',
                   step, report.total, rows[0]['train_loss'], rows[0]['train_accuracy'],
                   rate, rate * self._batch, eta)
    else:
      losses = [r['train_loss'] for r in rows]
      logging.info('step %d/%d  %d/%d members live  train loss %.4f..%.4f  %.1f steps/s '
                   '(%.1f member-steps/s)  ETA %s', step, report.total, report.live,
                   report.members, min(losses), max(losses), rate, rate * report.live, eta)
    evals = [r for r in report.eval_rows if r is not None]
    if len(evals) == 1:
      logging.info('step %d  eval_loss %.4f  eval_accuracy %.4f', step,
                   evals[0]['eval_loss'], evals[0]['eval_accuracy'])


class ProgressBar:
  """A tqdm bar on an interactive terminal."""

  def __init__(self, start_step: int, total: int):
    import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm.tqdm(total=total, initial=start_step, unit='step',
                          dynamic_ncols=True)

  def __call__(self, step: int, report: Report) -> None:
    self._bar.update(report.num_steps)
    if step >= report.total:
      self._bar.close()
