"""SIGINT and SIGTERM during a command's start-up: recorded, then one line and 128 + signum.

A command spends its first seconds importing (JAX, matplotlib, orbax) and parsing. A
signal there would raise KeyboardInterrupt inside an import (a traceback, or, inside
JAX's import, an ImportError) or end the process before it could say why. Every entry
point therefore calls, before its heavy imports,

    signals.record_until_started()

and, once started (its own signal handling about to begin, nothing written yet),

    signals.started('program')

which ends the process in one line with exit status 128 + signum (130 for SIGINT, 143
for SIGTERM, as a shell reports a death by that signal) if a signal arrived meanwhile,
and otherwise puts back the handlers that were there before. A second signal during
start-up ends the process at once, in the same line.

This module imports nothing heavy, so that recording starts within the first
milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_previous: dict[int, Any] = {}
_program = ['bn_research']


def _line(program: str, signum: int) -> str:
  return (f'{program}: stopped by signal {signum} ({signal.Signals(signum).name}) during '
          'start-up; nothing was written.')


def _handler(signum: int, frame: Any) -> None:
  del frame
  if _received:  # a second signal: the user insists; nothing was written yet
    print(_line(_program[0], _received[0]), file=sys.stderr, flush=True)
    os._exit(128 + _received[0])  # pylint: disable=protected-access
  _received.append(signum)


def record_until_started(program: Optional[str] = None) -> None:
  """Records SIGINT/SIGTERM instead of acting on them, until `started`.

  A signal the process was started ignoring (SIGINT in a shell's background job) stays
  ignored. Outside the main thread (where handlers cannot be set) this does nothing.

  Args:
    program: the name that begins the line of a second signal (default: 'bn_research';
      `started` names the program itself).
  """
  if program:
    _program[0] = program
  if _previous or threading.current_thread() is not threading.main_thread():
    return
  for s in _SIGNALS:
    if signal.getsignal(s) is not signal.SIG_IGN:
      _previous[s] = signal.signal(s, _handler)


def received() -> Optional[int]:
  """The first signal recorded since `record_until_started`, or None."""
  return _received[0] if _received else None


def started(program: str, *, restore: bool = True) -> None:
  """Ends start-up: a recorded signal ends the process (one line, exit 128 + signum).

  Args:
    program: the name that begins the line.
    restore: put back the handlers from before `record_until_started`. False when the
      caller installs its own next (no moment without either handler); signals keep
      being recorded until it does.
  """
  if _received:
    print(_line(program, _received[0]), file=sys.stderr, flush=True)
    sys.exit(128 + _received[0])
  if not restore:
    return
  for s, h in _previous.items():
    signal.signal(s, h)
  _previous.clear()


def end_in_one_line(program: str) -> None:
  """For a command that writes its results only at its end (evaluate, compare): from now
  on SIGINT/SIGTERM end it in one line with exit status 128 + signum, instead of a
  KeyboardInterrupt traceback from wherever it was (a long evaluation). The handler
  runs between Python bytecodes, so a compiled computation in flight finishes first:
  the command stops within one batch."""
  def handler(signum: int, frame: Any) -> None:
    del frame
    print(f'{program}: stopped by signal {signum} ({signal.Signals(signum).name}); '
          'no results were written.', file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)

  if threading.current_thread() is not threading.main_thread():
    return
  for s in _SIGNALS:
    if signal.getsignal(s) is not signal.SIG_IGN:
      signal.signal(s, handler)
