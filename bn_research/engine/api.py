"""Training entry points: a plain run, and K members of a sweep in one program.

Both are the same thing: members (configs + run directories) -> a program (a layout
from `programs`) -> the one loop (`loop.run`). A plain run is K = 1 on the 'jit' or
'pmap' layout; a member sweep is K >= 1 vmapped members on a members x data mesh.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from bn_research import config as config_lib
from bn_research import inputs as inputs_lib
from bn_research import models
from bn_research import rundir
from bn_research import signals
from bn_research.engine import SweepError
from bn_research.engine import distributed
from bn_research.engine import loop
from bn_research.engine import programs
from bn_research.engine import resume
from bn_research.engine import state as state_lib
from bn_research.engine import steps


# ---------------------------------------------------------------- members


def member_config(base: ml_collections.ConfigDict,
                  point: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The base config with one grid point's values set (typed as the fields are)."""
  c = base.copy_and_resolve_references()
  for key, value in point.items():
    kind = state_lib.SWEEPABLE.get(key, type(state_lib.member_value(c, key)))
    if kind is int and (isinstance(value, bool) or float(value) != int(value)):
      raise SweepError(f'{key}={value!r} must be an integer.')
    *path, last = key.split('.')
    node = c
    for p in path:
      node = node[p]
    node[last] = kind(value)
  return c


def check_sweepable(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Raises SweepError unless `keys` over `config` can run as one vmapped program."""
  bad = [k for k in keys if k not in state_lib.SWEEPABLE]
  if bad:
    raise SweepError(
        f'--vmap cannot sweep {", ".join(repr(k) for k in bad)}: it changes the '
        f'program\'s structure; keys that can be vmapped: {", ".join(state_lib.SWEEPABLE)}. '
        'Sweep it without --vmap.')
  ignored = [k for k in keys if k.startswith('model.') and not models.reads(config.model, k)]
  if ignored:
    raise SweepError(f'{ignored[0]} is not read by model.name={config.model.name!r}: '
                     'nothing to sweep.')
  if config.parallelism != 'jit':
    raise SweepError(f'--vmap builds a jit program on a members x data mesh: needs '
                     f'parallelism=jit, got {config.parallelism!r}.')


# ---------------------------------------------------------------- run directories


class RunDirSink:
  """A member's run directory as the loop's sink: metrics, checkpoints, status."""

  def __init__(self, workdir: str, *, is_writer: bool):
    self.name = workdir
    self.files = rundir.RunFiles(workdir, is_writer=is_writer)
    # Only the writer checkpoints (the state it saves is every process's same host
    # copy): no process ever waits for another inside a checkpoint save.
    self.checkpointer = rundir.Checkpointer(workdir) if is_writer else None

  def write_metrics(self, step: int, row: dict) -> None:
    self.files.write_metrics(step, row)

  def save(self, step: int, state: Any) -> None:
    if self.checkpointer is None or self.checkpointer.latest_step() == step:
      return  # (a resumed run's final step, or step 0 of a re-started member)
    self.checkpointer.save(step, state)

  def mark_running(self) -> None:
    if self.checkpointer is not None:
      # Never a checkpoint still being written asynchronously.
      self.files.write_status('running', self.checkpointer.latest_complete_step() or 0)

  def finish(self, status: str, step: int, **extra: Any) -> None:
    if self.checkpointer is not None:
      self.checkpointer.wait()
      if status != 'failed':
        self.checkpointer.close()
    self.files.write_status(status, step, **extra)
    self.files.close()

  def wait(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.wait()


class _Member:
  def __init__(self, workdir: str, config: ml_collections.ConfigDict, mode: str):
    self.workdir, self.config, self.mode = workdir, config, mode


def _prepare(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
             overwrite: bool) -> tuple[list, dict]:
  """Decides what to do with every member's workdir (`resume.decide`; writes nothing;
  the configs were validated by the caller).

  Returns:
    (members to train, results of members already finished as {index: status}).
  """
  todo, done = [], {}
  for i, (c, w) in enumerate(zip(configs, workdirs)):
    mode = resume.decide(w, c, overwrite)
    if mode == resume.DONE:
      done[i] = rundir.read_status(w)
      logging.info('%s already holds a finished run (%s); nothing to do.', w,
                   done[i].get('status'))
    else:
      todo.append((i, _Member(w, c, mode)))
  return todo, done


# ---------------------------------------------------------------- signals


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Any]:
  """SIGTERM and SIGINT end the run cleanly: at the next chunk end, or at once inside a
  long phase (start-up, compilation, evaluation; see `loop.Stopped`)."""
  # One that the command's start-up recorder took after its start-up ended counts.
  received: list[int] = [s for s in [signals.received()] if s is not None]
  if threading.current_thread() is not threading.main_thread():
    yield lambda: None
    return

  def handler(signum, frame):
    del frame
    if received:  # a second signal: stop now
      raise KeyboardInterrupt
    logging.warning('Signal %d: stopping at the next chunk end or between the pieces of '
                    'a long phase (the state is saved).', signum)
    received.append(signum)

  # A signal the process was started ignoring (SIGINT in a shell's background job)
  # stays ignored.
  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)
              if signal.getsignal(s) is not signal.SIG_IGN}
  try:
    yield lambda: received[0] if received else None
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


class _KillHook:
  """Test-only fault injection: a real SIGKILL once this step is passed
  (BN_RESEARCH_KILL_AT_STEP), after the pending checkpoints are complete."""

  def __init__(self, at: int, sinks: Sequence[RunDirSink]):
    self._at, self._sinks = at, sinks

  def __call__(self, step: int, report: loop.Report) -> None:
    if step >= self._at:
      for s in self._sinks:
        s.wait()
      os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- the one driver


def _devices(config: ml_collections.ConfigDict) -> list:
  if config.distributed:
    # The environment was validated by the caller (distributed.read_environment).
    distributed.start(distributed.read_environment())
  if config.num_devices:
    if config.num_devices > jax.device_count():
      raise ValueError(f'num_devices={config.num_devices} but only {jax.device_count()} '
                       'devices are available.')
    return jax.devices()[:config.num_devices]
  return jax.devices()


def _restore(members: list[_Member], keys: Sequence[str], data: inputs_lib.RunData,
             unusable: list) -> dict[int, list]:
  """Restores every resuming member from its newest restorable checkpoint.

  A checkpoint that cannot be restored is named in one warning line and an earlier one
  is tried (`rundir.Checkpointer.restore_latest_good`); a member with none starts at 0.

  Returns:
    {start step: [(member, restored host state or None)]}, members in order.
  """
  builder = steps.Builder(members[0].config, data.num_classes)
  init = steps.make_init(builder)
  groups: dict[int, list] = {}
  for m in members:
    restored, step = None, 0
    if m.mode == resume.RESUME:
      hparams = {k: state_lib.member_value(m.config, k) for k in keys}
      like = jax.eval_shape(init, hparams, np.asarray(data.sample_image))
      checkpointer = rundir.Checkpointer(m.workdir)
      restored, found = checkpointer.restore_latest_good(
          like, set_aside_now=not distributed.is_multiprocess())
      checkpointer.close()
      unusable.extend((m.workdir, step, why) for step, why in checkpointer.unusable)
      if restored is not None:
        restored, step = jax.device_get(restored), found
      else:
        logging.warning('%s: no checkpoint can be restored; starting at step 0.', m.workdir)
    groups.setdefault(step, []).append((m, restored))
  return groups


def _check_start_up(stop_requested: Any, step: int) -> None:
  """Between start-up phases (nothing written yet): a received signal ends the run."""
  signum = stop_requested()
  if signum is not None:
    raise loop.Interrupted(signum, step)


def _train(members: list[_Member], restored: list, keys: Sequence[str], *,
           overwrite: bool, vmapped: bool, devices: list, start_step: int,
           data: inputs_lib.RunData, stop_requested: Any,
           compiler_options: Mapping[str, Any]) -> list[dict]:
  """Trains `members` (all starting at `start_step`) as one program, through the loop.
  `compiler_options`: the parsed `config.compiler_options` (checked by XLA already)."""
  config = members[0].config
  process_index = jax.process_index()
  if config.parallelism == 'pmap':
    if compiler_options:
      logging.warning('compiler_options %s are not applied under pmap (jax.pmap takes no '
                      'compile options).', compiler_options)
    program = programs.PmapProgram(config, data, devices)
  else:
    member_sources = None
    if vmapped and 'seed' in keys and data.in_memory:
      member_sources = [inputs_lib.InMemoryInput(
          data.source.resident['image'], data.source.resident['label'],
          batch_size=config.batch_size, seed=m.config.seed) for m in members]
    if vmapped and 'seed' in keys and not data.in_memory:
      logging.warning('Streamed data: the members share one batch stream, so a seed '
                      'sweep varies initialisation and dropout only.')
    program = programs.JitProgram(
        config, data, devices, num_members=len(members), vmapped=vmapped,
        hparams=state_lib.stack_hparams([m.config for m in members], keys),
        member_sources=member_sources, compiler_options=dict(compiler_options))
  program.check_stop = loop.stop_checker(stop_requested)

  for m in members:
    if m.mode == resume.NEW and overwrite and process_index == 0:
      moved = rundir.move_aside(m.workdir)
      if moved:
        logging.warning('--overwrite: the previous run in %s was moved to %s',
                        m.workdir, moved)
  try:
    if start_step:
      state = program.place(restored)
      logging.info('Resumed from the checkpoint at step %d.', start_step)
    else:
      state = program.init()
  except loop.Stopped as e:  # in the initialisers' compilation: nothing written yet
    raise loop.Interrupted(e.signum, start_step) from None
  _check_start_up(stop_requested, start_step)
  sinks = [RunDirSink(m.workdir, is_writer=process_index == 0) for m in members]
  # From the placed state's shapes: no copy of every member's values to the host.
  num_params = state_lib.count_params(state.params, leading_axis=program.layout != 'jit')
  platform = devices[0].platform
  logged = []
  for m, s in zip(members, sinks):
    # Rows past the resumed step are dropped (a killed run may have logged beyond it).
    s.files.truncate_metrics(start_step if start_step else -1)
    # What the loop would have recorded up to the resumed step: a run resumed at its
    # last step (its status.json was lost) ends with the same status as the original.
    logged.append([r for r in rundir.read_metrics(m.workdir) if 0 < r['step'] <= start_step])
    s.files.write_config(m.config)
    s.files.write_description({
        **data.description, 'num_params': num_params, 'model': config.model.name,
        'normalizer': config.model.normalizer, 'devices': len(devices),
        'processes': jax.process_count(), 'platform': platform,
        'parallelism': 'vmap' if vmapped else config.parallelism,
        'mesh': dict(program.mesh), 'vmap_members': len(members) if vmapped else 1})
    s.files.write_status('running', start_step)
  if data.description.get('warning'):
    logging.warning('DATA: %s', data.description['warning'])
  logging.info('Training %d member(s) of %s (%s, %d parameters each) on %s: %d devices '
               '(%s, mesh %s), steps %d..%d.', len(members), config.model.name,
               config.model.normalizer, num_params,
               data.description.get('dataset', config.data.name), len(devices),
               program.layout, program.mesh, start_step, config.num_train_steps)

  actions: list = [loop.LogLine(start_step, config.batch_size)]
  if sys.stdout.isatty() and process_index == 0:
    actions.append(loop.ProgressBar(start_step, config.num_train_steps))
  kill_at = int(os.environ.get('BN_RESEARCH_KILL_AT_STEP', '0') or 0)
  if kill_at:
    actions.append(_KillHook(kill_at, sinks))
  return loop.run(program, sinks, state, start_step=start_step,
                  cadence=loop.Cadence.from_config(config),
                  max_loss=config.divergence.max_loss, actions=actions,
                  stop_requested=stop_requested, logged=logged)


@contextlib.contextmanager
def _locked(workdirs: Sequence[str]) -> Iterator[None]:
  """Holds every member's workdir lock (process 0 only) for the run's life."""
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      for w in workdirs:
        stack.enter_context(rundir.WorkdirLock(w))
    yield


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False) -> dict:
  """Trains and evaluates as the config says, writing everything into `workdir`.

  Re-running resumes from the newest restorable checkpoint; a finished run is left
  alone. The workdir is locked for the run's life: a second run on it is refused.

  Returns:
    The final status dict (as written to status.json) plus the last metrics.

  Raises:
    ValueError: a bad config or workdir, before anything is compiled or written.
    loop.Interrupted: SIGTERM/SIGINT; the state was saved, status 'interrupted'.
  """
  return train_members(config, [(workdir, {})], overwrite=overwrite, _plain=True)[0]


def train_members(base: ml_collections.ConfigDict,
                  points: Sequence[tuple[str, Mapping[str, Any]]], *,
                  overwrite: bool = False, _plain: bool = False) -> list[dict]:
  """Trains every (workdir, {swept key: value}) of a sweep as vmapped members.

  Members that resume from different steps train as separate programs (one per
  start step); finished members are skipped. Each member's workdir is locked.

  Returns:
    Per member, in order: what `train_and_evaluate` returns for it.

  Raises:
    SweepError / ValueError: a sweep or config that cannot run, before anything is
      compiled or written.
  """
  keys = sorted({k for _, point in points for k in point})
  if not _plain:
    check_sweepable(base, keys)
  configs = [member_config(base, p) for _, p in points]
  workdirs = [str(w) for w, _ in points]
  if base.distributed:
    distributed.read_environment()  # a malformed variable: one line, before any start-up
  refusal = None
  try:
    # Once per member, before anything starts; the device count, learnt after start-up,
    # adds only `config.check_devices`.
    for c in configs:
      config_lib.validate_config(c)
  except ValueError as e:
    if not base.distributed:
      raise
    refusal = e  # told to the other processes once they are all there
  with _stop_on_signals() as stop_requested:
    try:
      return _train_members(base, configs, workdirs, keys, overwrite=overwrite,
                            plain=_plain, stop_requested=stop_requested, refusal=refusal)
    except jax.errors.JaxRuntimeError as e:
      # Most often another process is gone. 'failed' is recorded and the locks released;
      # Python's exit would wait for the others in JAX's shutdown barrier, then abort.
      if base.distributed and distributed.is_multiprocess():
        distributed.end_after_failed_collective(e)
      raise


def _train_members(base: ml_collections.ConfigDict,
                   configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                   keys: Sequence[str], *, overwrite: bool, plain: bool,
                   stop_requested: Any, refusal: Optional[Exception]) -> list[dict]:
  """`train_members` once the configs are checked, with SIGTERM/SIGINT handled: between
  start-up phases a signal ends the run (`loop.Interrupted`), before any file is written.
  `refusal`: this process's config refusal, told to the other processes first."""
  devices = _devices(base)
  distributed.agree('config checked', refusal)
  _check_start_up(stop_requested, 0)
  with contextlib.ExitStack() as held:
    # Every process learns of a refusal (a locked or foreign workdir) before the first
    # collective: none is left waiting at a barrier for a process that has left.
    try:
      held.enter_context(_locked(workdirs))
      todo, done = _prepare(configs, workdirs, overwrite)
    except ValueError as e:
      refusal = e
    # Also the barrier after which files are written: every process decided from the
    # same files before any is written.
    distributed.agree('workdirs checked', refusal)
    results: list = [done.get(i) for i in range(len(workdirs))]
    if not todo:
      return results
    data = inputs_lib.load_run_data(todo[0][1].config)
    _check_start_up(stop_requested, 0)
    unusable: list = []
    groups = sorted(_restore([m for _, m in todo], keys, data, unusable).items())
    distributed.agree_on('the steps to resume from', ', '.join(
        f'{m.workdir} at step {start}' for start, group in groups for m, _ in group),
        'every process must see the same workdir (a filesystem shared by all)')
    if distributed.is_multiprocess() and jax.process_index() == 0:
      for workdir, step, why in unusable:  # every process has looked: now out of the way
        rundir.set_aside(workdir, step, why)
    _check_start_up(stop_requested, groups[0][0])
    # Each group (members resuming from one step) is its own program, with its own mesh:
    # the batches must split over that mesh's data axis.
    for _, group in groups:
      data_axis = (len(devices) if plain
                   else programs.mesh_shape(len(group), len(devices))['data'])
      for m, _ in group:
        config_lib.check_devices(m.config, data_axis)
    # Members share every key but the swept ones (`state.SWEEPABLE`), so the base's
    # compiler options are every member's: parsed once (validated above).
    compiler_options = config_lib.parse_compiler_options(base.compiler_options)
    config_lib.check_compiler_options(compiler_options)
    index = {id(m): i for i, m in todo}
    for start, group in groups:
      out = _train([m for m, _ in group], [r for _, r in group], keys, overwrite=overwrite,
                   vmapped=not plain, devices=devices, start_step=start, data=data,
                   stop_requested=stop_requested, compiler_options=compiler_options)
      for (m, _), r in zip(group, out):
        results[index[id(m)]] = r
    return results
