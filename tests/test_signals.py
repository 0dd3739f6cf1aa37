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


def _catches(pid: int, signum: int) -> bool:
  """Whether process `pid` has a handler for `signum` (Linux: /proc/PID/status SigCgt)."""
  try:
    with open(f'/proc/{pid}/status') as f:
      mask = next(l for l in f if l.startswith('SigCgt:')).split()[1]
  except (OSError, StopIteration):
    return False
  return bool(int(mask, 16) >> (signum - 1) & 1)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A tiny finished run, for the commands that read one."""
  from bn_research import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  c = helpers.tiny_mlp_config()
  c.probe.enabled = False
  assert train.train_and_evaluate(c, str(workdir))['status'] == 'done'
  return workdir


def _entry_point(module: str, tmp_path, finished) -> tuple[list[str], object]:
  """A command line's arguments, input it would accept (so that only the signal stops
  it), and the path it must not have written once stopped."""
  config = '--config=configs/mnist_mlp.py:bn,source=synthetic'
  out = tmp_path / 'out'
  return {
      'bn_research.main': [config, f'--workdir={out}'],
      'scripts.sweep': [config, f'--workdir={out}', '--vmap',
                        '--sweep=optimizer.learning_rate=0.1,0.3'],
      'experiments.mnist_lr_sweep': [f'--workdir={out}', '--steps=10',
                                     '--source=synthetic'],
      'scripts.compare': [str(finished), f'--out={out}.png'],
      'bn_research.evaluate': [f'--workdir={finished}', f'--out={out}'],
  }[module], (tmp_path / 'out.png' if module == 'scripts.compare' else out)


ENTRY_POINTS = ['bn_research.main', 'scripts.sweep', 'experiments.mnist_lr_sweep',
                'scripts.compare', 'bn_research.evaluate']


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs /proc')
@pytest.mark.parametrize('module', ENTRY_POINTS)
def test_sigint_during_start_up_is_one_line_and_exit_130(tmp_path, finished, module):
  """SIGINT as soon as the command records signals (its first statements, before its
  heavy imports): it ends at the end of its start-up with exit status 130 and one line,
  no traceback, nothing written. The command's own handler replaces the recorder only
  after start-up, so a SIGTERM handler seen early is the recorder's."""
  args, written = _entry_point(module, tmp_path, finished)
  proc = subprocess.Popen([sys.executable, '-m', module, *args], cwd=helpers.REPO,
                          env=helpers.subprocess_env(1, cpu=True), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  # Polled more often than helpers.wait_for polls: a command's start-up can be short.
  end = time.monotonic() + helpers.CEILING
  while not _catches(proc.pid, signal.SIGTERM):
    assert proc.poll() is None and time.monotonic() < end, 'no signal recorder seen'
    time.sleep(0.002)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=helpers.CEILING)
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  lines = [l for l in err.splitlines() if 'signal 2' in l]
  assert len(lines) == 1 and 'during start-up' in lines[0], err[-3000:]
  assert not written.exists()


@pytest.mark.parametrize('argv0, recorded', [('-m', True), ('script.py', False)])
def test_a_job_records_signals_from_its_packages_import(argv0, recorded):
  """`python -m experiments.<job>` imports the package `experiments` before the job's
  own (heavy) imports: the recorder starts there, and only for `-m`; a library import
  of the package leaves the process's handlers alone."""
  code = f'''
import signal, sys
sys.argv[0] = {argv0!r}
before = signal.getsignal(signal.SIGINT)
import experiments
from bn_research import signals
handler = signal.getsignal(signal.SIGINT)
print(handler is signals._handler, handler is before)
'''
  proc = subprocess.run([sys.executable, '-c', code], cwd=helpers.REPO,
                        env=helpers.subprocess_env(1, cpu=True), capture_output=True,
                        text=True, timeout=helpers.CEILING)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == [str(recorded), str(not recorded)]


def test_a_signal_between_start_up_and_the_runs_own_handler_stops_the_run(tmp_path):
  """`bn_research.main` keeps its start-up recorder until the engine installs its own
  handler (no moment without either); a signal recorded in between ends the run at
  start-up instead of being dropped (the run would then train to its end)."""
  code = f'''
import os, signal
from bn_research import signals
signals.record_until_started('test')
signals.started('test', restore=False)
os.kill(os.getpid(), signal.SIGTERM)  # recorded, not acted on
from bn_research import train
from tests import helpers
try:
  train.train_and_evaluate(helpers.tiny_mlp_config(), {str(tmp_path / 'run')!r})
except train.Interrupted as e:
  print('interrupted', e.signum, e.step)
'''
  proc = helpers.run_python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ['interrupted', str(int(signal.SIGTERM)), '0'], (
      proc.stdout, proc.stderr[-3000:])


@pytest.mark.parametrize('signum, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_read_only_command_stops_in_one_line_after_start_up(signum, code):
  """evaluate and compare write only at their end: after start-up a signal in the
  middle of their work (here a busy loop standing for a long evaluation) ends them in
  one line with 128 + signum, no KeyboardInterrupt traceback."""
  code_text = '''
import sys
from bn_research import signals
signals.end_in_one_line('busy')
print('ready', flush=True)
while True:
  sum(range(10000))
'''
  proc = subprocess.Popen([sys.executable, '-c', code_text], cwd=helpers.REPO,
                          env=helpers.subprocess_env(1, cpu=True), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'ready'  # the process prints it or exits
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=helpers.CEILING)
  assert proc.returncode == code, err
  assert 'Traceback' not in err and err.strip().splitlines() == [
      f'busy: stopped by signal {int(signum)} ({signal.Signals(signum).name}); '
      'no results were written.']

