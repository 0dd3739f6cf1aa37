"""Signals outside chunk ends: start-up, compilation, evaluation, population statistics.

Every long phase polls the run's signal flag between its pieces (`Program.check_stop`,
`loop.Stopped`), so SIGTERM/SIGINT ends it after the piece in progress, not after the
phase. Tests here are deterministic: a fake "signal" raised at a chosen poll, and one
command-line run interrupted during start-up.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from bn_research import inputs
from bn_research.engine import loop
from bn_research.engine import programs
from tests import helpers


def _stop_after(polls: int):
  """A check_stop that 'receives' SIGTERM at its `polls`-th call; counts its calls."""
  calls = []

  def check_stop():
    calls.append(1)
    if len(calls) >= polls:
      raise loop.Stopped(signal.SIGTERM)

  return check_stop, calls


def test_a_compilation_is_abandoned_at_the_first_poll_after_a_signal():
  never = threading.Event()
  check_stop, calls = _stop_after(2)
  with pytest.raises(loop.Stopped):
    # A "compilation" that never ends by itself: only the poll can end the wait.
    programs.compile_interruptibly(never.wait, check_stop, poll_seconds=0.01)
  assert len(calls) == 2
  never.set()
  # Without a signal the compiled value comes back, and errors are raised as they are.
  assert programs.compile_interruptibly(lambda: 42, lambda: None) == 42
  with pytest.raises(ZeroDivisionError):
    programs.compile_interruptibly(lambda: 1 / 0, lambda: None)


def test_population_statistics_and_evaluation_stop_between_their_pieces():
  config = helpers.tiny_mlp_config(**{'eval.batch_stats': 'population',
                                      'eval.population_batches': 6,
                                      'steps_per_dispatch': 2})
  program = programs.JitProgram(config, inputs.load_run_data(config), jax.devices()[:1],
                                hparams={}, num_members=1, vmapped=False)
  state = program.init()
  rows = program.evaluate(state)  # compiles (compilations poll too: not counted below)
  assert 0.0 <= rows[0]['eval_accuracy'] <= 1.0
  pieces, batches = [], []
  population, evaluate = program._population, program._eval  # pylint: disable=protected-access
  program._population = lambda *a: pieces.append(1) or population(*a)  # pylint: disable=protected-access
  program._eval = lambda *a: batches.append(1) or evaluate(*a)  # pylint: disable=protected-access
  # 6 population batches go in 3 pieces of 2; a signal at the second poll stops after one.
  program._last_stats = None  # pylint: disable=protected-access
  program.check_stop, _ = _stop_after(2)
  with pytest.raises(loop.Stopped):
    program.evaluate(state)
  assert len(pieces) == 1 and not batches
  # The test set's 2 batches: a signal at the 5th poll (3 population pieces, then
  # before each evaluation batch) stops after the first evaluation batch.
  program._last_stats = None  # pylint: disable=protected-access
  program.check_stop, _ = _stop_after(5)
  with pytest.raises(loop.Stopped):
    program.evaluate(state)
  assert len(pieces) == 4 and len(batches) == 1


def test_sigint_during_start_up_is_one_line_and_exit_130(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, PYTHONPATH=helpers.REPO)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'bn_research.main',
       '--config=configs/mnist_mlp.py:bn,source=synthetic', f'--workdir={workdir}'],
      cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # SIGINT while it starts up (before its first checkpoint can exist).
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  last = [line for line in err.splitlines() if line.startswith('bn_research:')]
  assert len(last) == 1 and ('SIGINT' in last[0] or 'signal 2' in last[0]), err[-3000:]
  # Nothing claims to be running.
  status = workdir / 'status.json'
  assert not status.exists() or helpers.read_json(status)['status'] == 'interrupted'
