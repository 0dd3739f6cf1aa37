"""Launching training processes: one at a time, N side by side, or pinned to CPU cores.

Every job that starts subprocesses (a sweep, the Figure 1 job, the Inception ablation,
the side-by-side benchmark) starts them here, so that what a child gets (its
environment, its cores, where its output goes) is decided in one place.

    results = launch.run_jobs([launch.Job('bn', cmd_bn, log='DIR/bn.log'), ...],
                              parallel=2, pin_cores=True, single_thread=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from absl import logging

from bn_research import cpu_placement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One compute thread per XLA process: for small models run side by side, one thread
# each beats processes sharing threads (set before the child's JAX starts). Only
# `--` options: XLA silently ignores every flag after a bare token (an earlier
# `intra_op_parallelism_threads=1` here hid any flag appended after it).
SINGLE_THREAD_XLA_FLAGS = '--xla_cpu_multi_thread_eigen=false'


def with_single_thread(xla_flags: str) -> str:
  """`xla_flags` with the single-thread options added (once)."""
  if SINGLE_THREAD_XLA_FLAGS in xla_flags:
    return xla_flags
  return f'{xla_flags} {SINGLE_THREAD_XLA_FLAGS}'.strip()


def child_env(*, single_thread: bool = False,
              base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """The environment a launched run gets.

  Args:
    single_thread: add the single-thread XLA options (for processes sharing a CPU).
    base: the environment to start from; default this process's.

  Returns:
    `base` with this repository first on PYTHONPATH (so `python -m bn_research.main`
    works from any directory) and, if asked, XLA limited to one thread.
  """
  env = dict(os.environ if base is None else base)
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  if single_thread:
    env['XLA_FLAGS'] = with_single_thread(env.get('XLA_FLAGS', ''))
  return env


def check_positive_flag(flag: str, value: object, meaning: str = '', *,
                        optional: bool = True) -> None:
  """ValueError naming `--flag=value` unless it is an integer > 0 (or None: not given,
  if optional). A job's own flags are checked before anything starts: 0 is never a
  silent default."""
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'--{flag}={value!r} must be a positive integer'
                     + (f' ({meaning})' if meaning else '') + '.')


# What absl's app.run treats as a request for help (it prints, then exits with 1).
HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull', '--helpxml')


def run_app(main: Callable[[list[str]], Any],
            flags_parser: Optional[Callable[[list[str]], Any]] = None) -> None:
  """absl's `app.run(main)`, except that asking for help exits with 0: it is a success
  (absl exits with 1 after printing the flags)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  args = sys.argv[1:sys.argv.index('--')] if '--' in sys.argv else sys.argv[1:]
  wants_help = any(a in HELP_FLAGS for a in args)
  try:
    if flags_parser is None:
      app.run(main)
    else:
      app.run(main, flags_parser=flags_parser)
  except SystemExit as e:
    if wants_help and e.code == 1:
      sys.exit(0)
    raise


def exit_on_bad_flags(program: str, check: Callable[[], Any]) -> Any:
  """Runs a job's flag check; a ValueError is one line on stderr and exit code 2, as
  `bn_research.main` does for a bad config."""
  try:
    return check()
  except ValueError as e:
    print(f'{program}: error: {e}', file=sys.stderr)
    sys.exit(2)


def check_parallel(value: object, flag: str = 'parallel') -> int:
  """The number of processes to run at once; ValueError unless a positive integer."""
  check_positive_flag(flag, value, 'processes run at once; 1: one after another',
                      optional=False)
  return value


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped the work; every child started had saved and exited.

  `signum` says which signal: a command exits with 128 + signum (130, 143), as a shell
  reports a death by that signal.
  """

  def __init__(self, signum: int, message: str = ''):
    super().__init__(message or f'interrupted by signal {signum}')
    self.signum = signum


@contextlib.contextmanager
def signals_recorded() -> Iterator[list[int]]:
  """Within: SIGTERM/SIGINT are recorded in the yielded list instead of killing this
  process, so that a parent can pass them on to its children and wait for them."""
  received: list[int] = []

  def handler(signum, frame):
    del frame
    received.append(signum)

  try:
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  except ValueError:  # not the main thread: signals stay with their owner
    yield received
    return
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@dataclasses.dataclass
class Job:
  """One process to launch.

  Attributes:
    name: names it in logs and results.
    command: argv.
    log: file that receives its stdout and stderr (appended); None: this process's.
  """

  name: str
  command: Sequence[str]
  log: Optional[str] = None


@dataclasses.dataclass
class JobResult:
  """How a job ended: its name, exit code and cores (None: not pinned)."""

  name: str
  returncode: int
  cores: Optional[set[int]] = None


def run_command(command: Sequence[str]) -> int:
  """Runs one command in the foreground with `child_env()`; returns its exit code."""
  return run_jobs([Job('run', command)])[0].returncode


def run_jobs(jobs: Sequence[Job], *, parallel: int = 1, pin_cores: bool = False,
             single_thread: bool = False, cores: Optional[Sequence[int]] = None,
             cwd: Optional[str] = None,
             on_finish: Optional[Callable[[JobResult, int], None]] = None,
             on_poll: Optional[Callable[[list[str]], None]] = None,
             poll_seconds: float = 0.05, report_seconds: float = 5.0) -> list[JobResult]:
  """Runs jobs, `parallel` at a time, in order; a failing job does not stop the others.

  Each child is the leader of its own process group. SIGTERM or SIGINT to this process
  is passed on to every running child's group (each saves and records `interrupted`),
  no further job starts, and once all have exited `Interrupted` is raised.

  Args:
    jobs: what to run.
    parallel: processes at once (1: one after another).
    pin_cores: give each of the `parallel` slots its own equal share of `cores`
      (Linux; see cpu_placement for why). Not pinned when there are fewer cores than
      slots, or where affinity is not supported.
    single_thread: limit each child's XLA to one thread (see SINGLE_THREAD_XLA_FLAGS).
    cores: the cores to share out; default the cores this process may use.
    cwd: the children's working directory; default this process's (relative paths in
      the commands mean what the user meant). The repository is on their PYTHONPATH.
    on_finish: called as on_finish(result, still_running) when a job ends.
    on_poll: called with the names of the running jobs every `report_seconds` (live
      progress).
    poll_seconds: how often running jobs are checked.
    report_seconds: how often `on_poll` is called.

  Returns:
    One result per job, in the order of `jobs`.

  Raises:
    ValueError: `parallel` is not a positive integer (before anything starts).
    Interrupted: a signal stopped the jobs (after every started child exited).
  """
  check_parallel(parallel)
  slots = min(parallel, len(jobs)) or 1
  shares = None
  if pin_cores and hasattr(os, 'sched_setaffinity'):
    shares = cpu_placement.core_shares(
        list(cores) if cores is not None else cpu_placement.available_cores(), slots)
  env = child_env(single_thread=single_thread)
  with signals_recorded() as received:
    return _run(jobs, slots, shares, env, cwd, on_finish, on_poll, poll_seconds,
                report_seconds, received)


def _run(jobs, slots, shares, env, cwd, on_finish, on_poll, poll_seconds, report_seconds,
         received: list[int]) -> list[JobResult]:
  """run_jobs' loop; `received` fills with the signals this process gets."""
  free_slots = list(range(slots))
  pending = list(enumerate(jobs))
  running: list[tuple[int, int, subprocess.Popen, object]] = []
  results: dict[int, JobResult] = {}
  passed_on = 0
  next_report = time.monotonic() + report_seconds
  while running or (pending and not received):
    while pending and free_slots and not received:
      index, job = pending.pop(0)
      slot = free_slots.pop(0)
      log = open(job.log, 'a') if job.log else None  # pylint: disable=consider-using-with
      logging.info('launching %s: %s', job.name, ' '.join(map(str, job.command)))
      # Its own process group: a signal reaches the child (and anything it starts)
      # only through this parent, which then waits for it to save. Not its own session:
      # with the kernel's session autogroups, a new session per child is scheduled as a
      # separate group and loses CPU share on a loaded machine.
      proc = subprocess.Popen(list(job.command), cwd=cwd, env=env, stdout=log,
                              stderr=subprocess.STDOUT if log else None,
                              process_group=0)
      if shares:
        # Set right after the start, before the child's interpreter starts threads
        # (threads inherit it); a preexec_fn is unsafe in a parent running threads.
        os.sched_setaffinity(proc.pid, shares[slot])
        logging.info('%s runs on CPU core(s) %s', job.name, sorted(shares[slot]))
      running.append((index, slot, proc, log))
    while passed_on < len(received):
      for _, _, proc, _ in running:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, received[passed_on])
      passed_on += 1
    time.sleep(poll_seconds if running else 0)
    if on_poll is not None and running and time.monotonic() >= next_report:
      next_report = time.monotonic() + report_seconds
      on_poll([jobs[index].name for index, _, _, _ in running])
    for item in list(running):
      index, slot, proc, log = item
      if proc.poll() is None:
        continue
      running.remove(item)
      free_slots.append(slot)
      if log is not None:
        log.close()
      result = JobResult(jobs[index].name, proc.returncode,
                         set(shares[slot]) if shares else None)
      results[index] = result
      if proc.returncode and not received:
        logging.warning('%s exited with code %d.', result.name, proc.returncode)
      if on_finish is not None:
        on_finish(result, len(running))
  if received:
    raise Interrupted(received[0], f'interrupted by signal {received[0]}: every started '
                      f'run saved and stopped, {len(jobs) - len(results)} not started; '
                      'the same command resumes')
  return [results[i] for i in range(len(jobs))]
