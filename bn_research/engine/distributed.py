"""Multi-process start-up: the environment read like config keys, a bounded wait for every
process, and refusals every process learns of before the first collective.

A run spans several processes with `--config.distributed=true`. On TPU pods, SLURM and
Open MPI, JAX finds the processes itself; elsewhere each process is told by the
environment:

  JAX_COORDINATOR_ADDRESS        host:port of process 0 (the coordinator), the same for all
  BN_RESEARCH_NUM_PROCESSES      how many processes take part (an integer >= 1)
  BN_RESEARCH_PROCESS_ID         this process: 0 .. NUM_PROCESSES - 1
  BN_RESEARCH_START_TIMEOUT      seconds every process waits for the others at start-up
                                 (default 300)
  BN_RESEARCH_PEER_TIMEOUT       seconds of silence after which a process counts as dead
                                 (default 100)

Each is checked before anything starts; a bad value is one line naming the variable, the
value and what is allowed. A process that does not arrive within the start-up wait ends
every waiting process with one line naming it and the coordinator's address (JAX itself
would end them with a C++ stack trace). Refusals found after start-up (a workdir locked
by another run, a workdir of another config) are exchanged through the coordinator's
key-value store, which needs no collective: every process raises the same error instead
of one process leaving while the others wait at a barrier for it.

A process that dies mid-run makes the next collective of every other process fail. Each
survivor records its run `failed` (the training loop does), releases its locks, prints
one line naming the lost process and the reason, and exits with status EXIT_PEER_LOST
(`end_after_failed_collective`), without JAX's shutdown barrier: that barrier waits for
the dead process and ends in an abort with a C++ stack trace.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Mapping, NoReturn, Optional

import jax

COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
NUM_PROCESSES = 'BN_RESEARCH_NUM_PROCESSES'
PROCESS_ID = 'BN_RESEARCH_PROCESS_ID'
START_TIMEOUT = 'BN_RESEARCH_START_TIMEOUT'
PEER_TIMEOUT = 'BN_RESEARCH_PEER_TIMEOUT'

DEFAULT_START_TIMEOUT = 300
DEFAULT_PEER_TIMEOUT = 100
# Exit status of a process that gave up waiting for the others at start-up: nothing was
# compiled or written, as for any refusal of bad input.
EXIT_START_TIMEOUT = 2
# Exit status of a process whose peer was lost mid-run: its run is recorded 'failed' and
# every process resumes when the same command is started again.
EXIT_PEER_LOST = 3


class DistributedError(ValueError):
  """A multi-process setting that cannot work, or a refusal of another process."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """The multi-process environment, validated. None: left to JAX's cluster detection."""
  coordinator: Optional[str]
  num_processes: Optional[int]
  process_id: Optional[int]
  start_timeout: int
  peer_timeout: int


def _integer(environ: Mapping[str, str], name: str, *, minimum: int,
             default: Optional[int], allowed: str) -> Optional[int]:
  text = environ.get(name, '').strip()
  if not text:
    return default
  try:
    value = int(text, 10)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise DistributedError(f'{name}={environ[name]!r}: allowed: {allowed}.')
  return value


def read_environment(environ: Mapping[str, str] = os.environ) -> Settings:
  """The multi-process settings of this process's environment.

  Raises:
    DistributedError: a malformed or inconsistent variable (one line naming it).
  """
  num = _integer(environ, NUM_PROCESSES, minimum=1, default=None,
                 allowed='an integer >= 1, the number of processes')
  pid = _integer(environ, PROCESS_ID, minimum=0, default=None,
                 allowed=f'an integer from 0 to {NUM_PROCESSES} - 1')
  start = _integer(environ, START_TIMEOUT, minimum=1, default=DEFAULT_START_TIMEOUT,
                   allowed='a whole number of seconds >= 1')
  peer = _integer(environ, PEER_TIMEOUT, minimum=1, default=DEFAULT_PEER_TIMEOUT,
                  allowed='a whole number of seconds >= 1')
  if (num is None) != (pid is None):
    given, missing = (NUM_PROCESSES, PROCESS_ID) if pid is None else (PROCESS_ID,
                                                                      NUM_PROCESSES)
    raise DistributedError(f'{given} is set but {missing} is not: set both (or neither, '
                           'to let JAX detect a TPU pod, SLURM or Open MPI job).')
  if num is not None and pid >= num:
    raise DistributedError(f'{PROCESS_ID}={environ[PROCESS_ID]!r}: allowed: an integer '
                           f'from 0 to {num - 1} ({NUM_PROCESSES}={num}).')
  coordinator = environ.get(COORDINATOR, '').strip() or None
  if coordinator is not None:
    host, _, port = coordinator.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedError(f'{COORDINATOR}={environ[COORDINATOR]!r}: allowed: '
                             'HOST:PORT of process 0, e.g. 10.0.0.1:1234.')
  elif num is not None:
    raise DistributedError(f'{NUM_PROCESSES} is set but {COORDINATOR} is not: set it to '
                           'HOST:PORT of process 0 in every process.')
  return Settings(coordinator, num, pid, start, peer)


def _coordinator_reachable(address: str) -> bool:
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
      return True
  except OSError:
    return False


def _coordinator_stays_up(address: str, seconds: float = 2.0) -> bool:
  """Whether the coordinator answers throughout `seconds`: a process that was just
  killed may still hold its port for a moment after its peers saw it go."""
  end = time.monotonic() + seconds
  while time.monotonic() < end:
    if not _coordinator_reachable(address):
      return False
    time.sleep(0.2)
  return True


def _missing_message(settings: Settings) -> str:
  """One line: who did not arrive, where this process waited, and what to change."""
  n, i, address = settings.num_processes, settings.process_id, settings.coordinator
  if i is None or n is None:
    who = 'not every process of the job'
  elif i != 0 and address and not _coordinator_reachable(address):
    who = 'process 0 (the coordinator) did not answer'
  else:
    others = [p for p in range(n) if p != i and (i == 0 or p != 0)]
    if len(others) == 1:
      who = f'process {others[0]} did not arrive'
    else:
      who = f'not every one of processes {", ".join(map(str, others))} arrived'
  return (f'distributed start-up: process {i} of {n}: {who} at the coordinator '
          f'{address} within {settings.start_timeout} s ({START_TIMEOUT}); start every '
          'process with the same address, or raise the wait.')


def start(settings: Settings) -> None:
  """Starts this process's part of a multi-process job (`initialize`), with CPU
  collectives across processes when no accelerator is there: the one start-up of every
  program that spans processes (training, sweeps, evaluation). Call before any JAX
  computation."""
  if not _has_accelerator():
    # CPU collectives across processes need an implementation (gloo ships with jaxlib).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  initialize(settings)


def _has_accelerator() -> bool:
  """Whether JAX_PLATFORMS names an accelerator, or one is installed (without
  initialising a backend: that must come after jax.distributed.initialize)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return any(p in platforms for p in ('gpu', 'cuda', 'rocm', 'tpu'))
  return any(importlib.util.find_spec(m) is not None
             for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu', 'jax_rocm_plugin'))


def initialize(settings: Settings) -> None:
  """`jax.distributed.initialize`, waiting at most `settings.start_timeout` seconds.

  A process that gives up prints one line (see `_missing_message`) and exits with status
  EXIT_START_TIMEOUT: JAX would otherwise abort it with a stack trace, and only after its
  own, longer, timeout.
  """
  if jax.distributed.is_initialized():
    return

  def give_up() -> None:
    print(_missing_message(settings), file=sys.stderr, flush=True)
    os._exit(EXIT_START_TIMEOUT)  # the main thread is blocked inside JAX's C++ client

  timer = threading.Timer(settings.start_timeout, give_up)
  timer.daemon = True
  timer.start()
  try:
    # JAX's own wait is longer than ours, so that the line above is what a user sees.
    jax.distributed.initialize(
        coordinator_address=settings.coordinator, num_processes=settings.num_processes,
        process_id=settings.process_id, initialization_timeout=settings.start_timeout + 60,
        heartbeat_timeout_seconds=settings.peer_timeout,
        shutdown_timeout_seconds=settings.peer_timeout)
  finally:
    timer.cancel()


_agreements = [0]  # how many exchanges this process made: part of each key


def _exchange(value: str, timeout: Optional[int]) -> dict[int, Optional[str]]:
  """Publishes `value` and returns every other process's, from the coordinator's
  key-value store (None: no answer within `timeout` seconds, default the peer timeout).
  Every process must make the same exchanges in the same order."""
  client = _jax_state().client
  _agreements[0] += 1
  key = f'bn_research/agree/{_agreements[0]}'
  me = jax.process_index()
  client.key_value_set(f'{key}/{me}', value)
  timeout = timeout or read_environment().peer_timeout
  answers: dict[int, Optional[str]] = {}
  for p in range(jax.process_count()):
    if p != me:
      try:
        answers[p] = client.blocking_key_value_get(f'{key}/{p}', timeout * 1000)
      except Exception:  # pylint: disable=broad-except  (JAX raises its runtime error)
        answers[p] = None
  return answers


def agree(what: str, error: Optional[BaseException],
          timeout: Optional[int] = None) -> None:
  """Every process reports whether it may go on; all raise if any one may not.

  Uses the coordinator's key-value store (no collective, so a process that stops here
  never leaves another waiting at a device barrier). In a single process, raises `error`
  if there is one.

  Args:
    what: what was checked (in the error message).
    error: this process's refusal, or None.
    timeout: seconds to wait for each other process's answer (default: the peer
      timeout of the environment).

  Raises:
    `error` itself in the process that refused; in the others, DistributedError naming
    the refusing process and its message.
  """
  if not is_multiprocess():
    if error is not None:
      raise error
    return
  message = '' if error is None else (str(error).strip().splitlines() or ['refused'])[0]
  answers = _exchange('ok' if error is None else 'refused: ' + message, timeout)
  if error is not None:
    raise error
  for p, answer in sorted(answers.items()):
    if answer != 'ok':
      reason = (answer.removeprefix('refused: ') if answer is not None else
                f'no answer within {timeout or read_environment().peer_timeout} s '
                f'({PEER_TIMEOUT})')
      raise DistributedError(f'{what}: process {p} refused: {reason}')


def agree_on(what: str, value: str, hint: str = '',
             timeout: Optional[int] = None) -> None:
  """Every process must have found the same `value`; all raise if one did not.

  For what each process decides alone from files (e.g. the checkpoint a run resumes
  from) and all must decide alike: processes that went on from different values would
  run different programs, and wait for each other at a collective.

  Raises:
    DistributedError: one line naming this process's value and another's, and `hint`.
  """
  if not is_multiprocess():
    return
  for p, answer in sorted(_exchange(value, timeout).items()):
    if answer != value:
      theirs = (answer if answer is not None else
                f'nothing within {timeout or read_environment().peer_timeout} s')
      raise DistributedError(f'{what}: process {jax.process_index()} found {value}, '
                             f'process {p} found {theirs}{"; " + hint if hint else ""}.')


def is_multiprocess() -> bool:
  """Whether this process is one of several in a `jax.distributed` run."""
  return jax.distributed.is_initialized() and jax.process_count() > 1


# Words of a collective's error when the other side went away (gloo's TCP pairs, gRPC's
# UNAVAILABLE, NCCL's remote errors), as opposed to this process's own failure.
_LOST_CONNECTION = ('connection', 'gloo', 'unavailable', 'socket', 'peer', 'remote')


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [''])[0]


def _reads_as_lost_peer(error: BaseException) -> bool:
  return any(word in _first_line(error).lower() for word in _LOST_CONNECTION)


def lost_peer_message(error: BaseException,
                      environ: Mapping[str, str] = os.environ,
                      aftermath: Optional[str] = None) -> str:
  """One line: which process was lost, the error that showed it, and what to do.

  A survivor cannot ask the coordinator which process died (the coordinator learns of
  it only at the peer timeout, when JAX ends every process), so the process is named
  from what this one can see: the other one of two, or process 0 when the coordinator
  no longer answers. An error that does not read as a lost connection (e.g. memory
  exhausted) is this process's own failure, and the line says so. `aftermath`: what
  became of the job and what to do, instead of a training run's (recorded 'failed',
  resumed by the same command).
  """
  settings = read_environment(environ)
  me, n = jax.process_index(), jax.process_count()
  reason = _first_line(error)
  lost = _reads_as_lost_peer(error)
  address = settings.coordinator or _jax_state().coordinator_address
  coordinator_gone = (lost and me != 0 and bool(address)
                      and not _coordinator_stays_up(address))
  if not lost:
    who = 'failed'
  elif coordinator_gone:
    who = 'process 0 (the coordinator) is gone'
  elif n == 2:
    who = f'process {1 - me} is gone'
  else:
    who = 'a peer process is gone'
  if aftermath is not None:
    return (f'bn_research: process {me} of {n}: {who} ({type(error).__name__}: '
            f'{reason}); {aftermath}.')
  if me == 0:
    recorded = "the run is recorded 'failed'"
  elif coordinator_gone:
    recorded = 'the run stays as process 0 left it'
  else:
    recorded = "process 0 records the run 'failed'"
  return (f'bn_research: process {me} of {n}: {who} ({type(error).__name__}: {reason}); '
          f'{recorded}; start every process again with the same command to resume.')


def _jax_state():
  """JAX's distributed state: the coordinator's address and the key-value client."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state


def end_after_failed_collective(error: BaseException,
                                aftermath: Optional[str] = None) -> NoReturn:
  """Ends this process after a failed collective: one line (`lost_peer_message`), exit
  status EXIT_PEER_LOST if the error reads as a lost peer, else 1.

  Call once the failure is recorded and locks are released; `aftermath` as in
  `lost_peer_message`. Python's exit would run
  `jax.distributed.shutdown`, whose barrier waits for the dead process until the peer
  timeout and then aborts (SIGABRT, a C++ stack trace), so the process ends here with
  `os._exit`, after flushing what it printed and logged.
  """
  line = lost_peer_message(error, aftermath=aftermath)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  print(line, file=sys.stderr, flush=True)
  os._exit(EXIT_PEER_LOST if _reads_as_lost_peer(error) else 1)  # pylint: disable=protected-access
