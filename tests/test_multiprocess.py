"""The multi-host path, exercised on one machine: 2 processes x 1 CPU device each
(`jax.distributed.initialize` on 127.0.0.1, gloo CPU collectives) against 1 process x 2
devices, for a plain run and for a member sweep. Only process 0 writes run files.

Also the start-up and refusals of `bn_research.engine.distributed`, through the command
line: a malformed environment, a process that never arrives, a refusal that every
process learns of before the first collective."""

import glob
import os
import subprocess
import sys
import time

import pytest

from tests import helpers

pytestmark = pytest.mark.slow

TINY = helpers.tiny_args(**{
    'num_train_steps': 20, 'eval_every_steps': 10, 'log_every_steps': 5,
    'checkpoint_every_steps': 10, 'steps_per_dispatch': 5, 'data.num_train': 256,
    'data.num_test': 64, 'batch_size': 32,
    # The config file's own: the sweep varies the first; the second evaluates with
    # population statistics, gathered across the processes.
    'optimizer.learning_rate': None, 'eval.batch_stats': None})


def _launch(module: str, args: list[str], *, processes: int, logs, optimized=False,
            end_others=True, ids=None, **env) -> list[tuple[int, str]]:
  """Runs `python -m module args` as `processes` cooperating processes (or one process
  with two devices when processes == 1); returns each one's (exit code, stderr).

  `ids`: the process ids to start (default all): the others never arrive. With
  `end_others`, a process that fails ends the rest (they would wait for it at a barrier);
  without, each must end by itself. stderr goes to files under `logs` (a pipe nobody
  reads while the processes run could fill up and stop them).
  """
  if not optimized:
    env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
  if processes == 1:
    proc = helpers.run_module(module, args, env=dict(env, JAX_PLATFORMS='cpu'), devices=2)
    return [(proc.returncode, proc.stderr)]
  procs, paths = _start(module, args, processes=processes, logs=logs, ids=ids, **env)
  return _finish(procs, paths, end_others=end_others)


def _start(module: str, args: list[str], *, processes: int, logs, ids=None, cwds=None,
           **env):
  """Starts the processes `ids` (default all) of a `processes`-process run, in the
  directories `cwds` (default all in the repository); returns them and the paths of
  their stderr files."""
  port = helpers.free_port()
  ids = range(processes) if ids is None else ids
  procs, paths = [], []
  for i in ids:
    paths.append(os.path.join(str(logs), f'process{i}.stderr'))
    with open(paths[-1], 'w') as err:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', module, *args, '--config.distributed=True'],
          env=helpers.subprocess_env(
              1, cpu=True, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
              BN_RESEARCH_NUM_PROCESSES=str(processes), BN_RESEARCH_PROCESS_ID=str(i),
              **env),
          cwd=cwds[i] if cwds else helpers.REPO, stdout=subprocess.DEVNULL, stderr=err,
          text=True))
  return procs, paths


def _finish(procs, paths, *, end_others=True) -> list[tuple[int, str]]:
  """Waits for `procs` (at most helpers.CEILING); returns each one's (exit code,
  stderr). With `end_others`, one that fails ends the rest (they would wait for it at a
  barrier); without, each must end by itself."""
  end = time.monotonic() + helpers.CEILING
  while any(p.poll() is None for p in procs):
    if time.monotonic() > end:
      break  # a hang: the caller's assertions show every process's stderr
    if end_others and any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
  return [(p.wait(), open(path).read()) for p, path in zip(procs, paths)]


def _run_both(tmp_path, kind: str, **launch) -> dict:
  """The same run (or member sweep) as 1 process x 2 devices and 2 processes x 1."""
  if kind == 'plain':
    module, extra = 'bn_research.main', []
  else:
    module, extra = 'scripts.sweep', ['--vmap', '--sweep=optimizer.learning_rate=0.1,0.3']
  results = {}
  for processes in (1, 2):
    workdir = str(tmp_path / f'p{processes}')
    logs = tmp_path / f'logs{processes}'
    logs.mkdir()
    out = _launch(module, TINY + extra + [f'--workdir={workdir}'], processes=processes,
                  logs=logs, **launch)
    for i, (code, err) in enumerate(out):
      assert code == 0, f'process {i}: exit code {code}\n' + '\n'.join(
          f'--- process {j} stderr:\n{e[-3000:]}' for j, (_, e) in enumerate(out))
    results[processes] = workdir
  return results


def _member_dirs(sweep_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(sweep_dir, '*=*')))


@pytest.mark.parametrize('kind', ['plain', 'sweep'])
def test_two_processes_equal_one_process_with_two_devices(tmp_path, kind):
  results = _run_both(tmp_path, kind)
  pairs = ([(results[2], results[1])] if kind == 'plain' else
           list(zip(_member_dirs(results[2]), _member_dirs(results[1]))))
  assert len(pairs) == (1 if kind == 'plain' else 2)
  for two, one in pairs:
    assert "'processes': 2" in open(os.path.join(two, 'data.json')).read().replace('"', "'")
    if kind == 'sweep':
      assert os.path.basename(two) == os.path.basename(one)
    # Both sides compile the same program the same way; only the cross-device sums
    # travel differently (gloo between processes, in memory within one).
    helpers.assert_same_run(two, one, rtol=1e-5, atol=1e-6)
    from bn_research import rundir
    assert rundir.read_status(two)['status'] == 'done'
    # One writer: one TensorBoard event file; every lock released.
    assert len(glob.glob(os.path.join(two, 'events.out.tfevents.*'))) == 1
    assert not os.path.exists(os.path.join(two, rundir.LOCK_FILE))


def test_two_processes_equal_one_process_with_the_optimising_compiler(tmp_path):
  """As above, compiled as users run it (XLA's default, optimising pipeline), against a
  tolerance derived from the spread between two reassociation-equivalent references:
  the same run on 1 device and on 2 devices of one process (the 2-device run sums each
  batch's halves separately)."""
  results = _run_both(tmp_path, 'plain', optimized=True)
  one_device = str(tmp_path / 'one_device')
  proc = helpers.run_module('bn_research.main', TINY + [f'--workdir={one_device}'],
                            env={'JAX_PLATFORMS': 'cpu'}, devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tol = helpers.reassociation_tolerance(results[1], one_device)
  assert tol < 1e-3, tol  # the references themselves agree: the bound is meaningful
  helpers.assert_same_run(results[2], results[1], atol=tol)


# ---------------------------------------------------------------- start-up and refusals


def _one_line(stderr: str) -> str:
  """The error line of a refused run: its last line, with no traceback before it."""
  assert 'Traceback' not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize('variable, value, allowed', [
    ('BN_RESEARCH_NUM_PROCESSES', 'two', 'an integer >= 1'),
    ('BN_RESEARCH_NUM_PROCESSES', '0', 'an integer >= 1'),
    ('BN_RESEARCH_PROCESS_ID', '2', 'from 0 to 1'),
    ('JAX_COORDINATOR_ADDRESS', 'localhost', 'HOST:PORT'),
    ('BN_RESEARCH_START_TIMEOUT', '-5', 'seconds >= 1'),
])
def test_a_malformed_environment_is_one_line_before_anything(tmp_path, variable, value,
                                                             allowed):
  workdir = tmp_path / 'run'
  env = {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1', 'BN_RESEARCH_NUM_PROCESSES': '2',
         'BN_RESEARCH_PROCESS_ID': '0', variable: value}
  proc = helpers.run_main(TINY + [f'--workdir={workdir}', '--config.distributed=True'],
                          env=env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _one_line(proc.stderr)
  assert f'{variable}={value!r}' in line and allowed in line, line
  assert not workdir.exists()


@pytest.mark.parametrize('present, missing', [(0, 'process 1 did not arrive'),
                                              (1, 'process 0 (the coordinator)')])
def test_a_process_that_never_arrives_ends_the_others_in_one_line(tmp_path, present,
                                                                  missing):
  """Only one of two processes starts: after BN_RESEARCH_START_TIMEOUT it ends with one
  line naming the missing process and the coordinator's address, having written nothing."""
  workdir = tmp_path / 'run'
  (code, stderr), = _launch('bn_research.main', TINY + [f'--workdir={workdir}'],
                            processes=2, ids=[present], logs=tmp_path,
                            BN_RESEARCH_START_TIMEOUT='3')
  assert code == 2, stderr[-3000:]
  line = _one_line(stderr)
  assert missing in line and '127.0.0.1:' in line and 'BN_RESEARCH_START_TIMEOUT' in line, line
  assert not workdir.exists()


def test_a_locked_workdir_is_refused_by_every_process_before_any_collective(tmp_path):
  """Process 0 finds the workdir locked by another run: both processes end by themselves
  (none waits at a barrier for the other), in one line each, and the run is untouched."""
  workdir = tmp_path / 'run'
  with helpers.lock_holder(workdir) as holder:
    before = sorted(os.listdir(workdir))
    out = _launch('bn_research.main', TINY + [f'--workdir={workdir}'], processes=2,
                  logs=tmp_path, end_others=False)
    assert sorted(os.listdir(workdir)) == before
  (code0, err0), (code1, err1) = out
  assert code0 == 2 and code1 == 2, (err0[-3000:], err1[-3000:])
  assert f'in use by process {holder.pid}' in _one_line(err0)
  line1 = _one_line(err1)
  assert 'process 0 refused' in line1 and f'in use by process {holder.pid}' in line1, line1


PEER_TIMEOUT = 120  # seconds: the survivor must end well before JAX would end it


def kill_and_read_the_survivor(procs, paths, killed: int, survivor: int,
                               timeout: float) -> str:
  """SIGKILLs process `killed`; process `survivor` must end by itself within `timeout`
  seconds with exit status EXIT_PEER_LOST and one `bn_research:` line, without a
  traceback or an abort. Returns that line."""
  from bn_research.engine import distributed
  procs[killed].kill()
  try:
    procs[survivor].wait(timeout=timeout)  # a bound, not a measurement
  except subprocess.TimeoutExpired:
    pass
  ended_by_itself = procs[survivor].poll() is not None
  code, stderr = _finish(procs, paths, end_others=False)[survivor]
  assert ended_by_itself, f'still running after {timeout} s:\n{stderr[-3000:]}'
  assert code == distributed.EXIT_PEER_LOST, f'exit code {code}\n{stderr[-3000:]}'
  for sign in ('Traceback', 'Check failure', 'Fatal Python error', 'Aborted'):
    assert sign not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith('bn_research:')]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_a_peer_killed_mid_run_ends_the_survivor_in_one_line(tmp_path):
  """Process 1 is SIGKILLed while training: process 0 ends by itself (its next
  collective fails at once) before the peer timeout, with exit status EXIT_PEER_LOST and
  one line naming the lost process, with no traceback or abort (JAX's shutdown barrier
  is skipped); the run is 'failed' with the reason and the workdir's lock is released.

  (Not process 0: the coordinator's service dies with it, and JAX's own agent in every
  other process ends that process with an abort within milliseconds, racing the
  survivor's clean exit; see docs/reliability.md.)"""
  from bn_research import rundir
  workdir = tmp_path / 'run'
  args = helpers.tiny_args(**{'num_train_steps': 1_000_000, 'eval_every_steps': 500_000,
                              'log_every_steps': 100, 'checkpoint_every_steps': 500_000,
                              'steps_per_dispatch': 100})
  procs, paths = _start('bn_research.main', args + [f'--workdir={workdir}'], processes=2,
                        logs=tmp_path, JAX_DISABLE_MOST_OPTIMIZATIONS='1',
                        BN_RESEARCH_PEER_TIMEOUT=str(PEER_TIMEOUT))
  metrics = workdir / 'metrics.jsonl'
  helpers.wait_for(lambda: metrics.exists() and 'train_loss' in metrics.read_text(),
                   'a training row', proc=procs[0])
  killed, survivor = 1, 0
  line = kill_and_read_the_survivor(procs, paths, killed, survivor, PEER_TIMEOUT)
  assert f'process {survivor} of 2: process {killed}' in line, line
  assert 'Connection' in line, line  # the reason, as the collective reported it
  status = rundir.read_status(str(workdir))
  assert status['status'] == 'failed', status
  assert 'Connection' in status['message'], status
  assert not (workdir / rundir.LOCK_FILE).exists()


def test_a_damaged_checkpoint_is_skipped_by_every_process_and_moved_aside_once(tmp_path):
  """Two processes are killed after their checkpoints at steps 10 and 20; the one at 20
  is damaged. Resumed with two processes, both restore step 10 (only process 0 reads
  and writes checkpoints' files, every process checks them), process 0 moves the damaged
  one to checkpoints.damaged/ once and names it in one line, and the run ends equal,
  bitwise, to an uninterrupted two-process run."""
  from bn_research import rundir
  from tests import test_checkpoint_integrity as integrity
  args = helpers.tiny_args(**{'num_train_steps': 30, 'checkpoint_every_steps': 10,
                              'eval_every_steps': 10, 'log_every_steps': 5,
                              'steps_per_dispatch': 5})
  whole, workdir = tmp_path / 'whole', tmp_path / 'run'
  for name in ('whole', 'killed', 'resumed'):
    (tmp_path / f'logs_{name}').mkdir()
  out = _launch('bn_research.main', args + [f'--workdir={whole}'], processes=2,
                logs=tmp_path / 'logs_whole')
  assert [c for c, _ in out] == [0, 0], '\n'.join(e[-3000:] for _, e in out)

  out = _launch('bn_research.main', args + [f'--workdir={workdir}'], processes=2,
                logs=tmp_path / 'logs_killed', end_others=False,
                BN_RESEARCH_KILL_AT_STEP='25')
  assert all(c != 0 for c, _ in out), [c for c, _ in out]
  assert rundir.checkpoint_steps(str(workdir)) == [10, 20]
  newest = workdir / rundir.CHECKPOINT_DIR / '20'
  assert rundir.verify(str(newest)) is None  # sealed before the kill
  integrity.flip_bytes(newest)

  out = _launch('bn_research.main', args + [f'--workdir={workdir}'], processes=2,
                logs=tmp_path / 'logs_resumed')
  (code0, err0), (code1, err1) = out
  assert code0 == 0 and code1 == 0, (err0[-3000:], err1[-3000:])
  named = [l for l in (err0 + err1).splitlines() if str(newest) in l]
  assert len(named) == 1 and 'sha256' in named[0] and 'moved to' in named[0], named
  for err in (err0, err1):
    assert 'Resumed from the checkpoint at step 10' in err, err[-3000:]
  aside = os.listdir(workdir / rundir.DAMAGED_CHECKPOINT_DIR)
  assert len(aside) == 1 and aside[0].startswith('20-'), aside
  helpers.assert_same_run(workdir, whole, atol=0)
  assert rundir.read_status(str(workdir))['status'] == 'done'


def test_processes_that_see_different_checkpoints_refuse_to_resume_in_one_line(tmp_path):
  """Each process reads the checkpoints itself, so a workdir that is not on a filesystem
  every process sees (a host's local disk) would resume them from different steps:
  different programs, waiting for each other at a collective. Simulated with a relative
  --workdir and a working directory per process: process 0 finds the checkpoint at step
  10, process 1 none. Both refuse in one line naming both steps, exit 2, before writing."""
  from bn_research import rundir
  args = helpers.tiny_args(**{'num_train_steps': 30, 'checkpoint_every_steps': 10,
                              'eval_every_steps': 10, 'log_every_steps': 5,
                              'steps_per_dispatch': 5})
  args = [args[0].replace('configs/', os.path.join(helpers.REPO, 'configs') + '/')] + args[1:]
  hosts = [tmp_path / 'host0', tmp_path / 'host1']
  for d in hosts + [tmp_path / 'logs_killed', tmp_path / 'logs_resumed']:
    d.mkdir()
  procs, paths = _start('bn_research.main', args + ['--workdir=run'], processes=2,
                        logs=tmp_path / 'logs_killed', cwds=[hosts[0], hosts[0]],
                        JAX_DISABLE_MOST_OPTIMIZATIONS='1', BN_RESEARCH_KILL_AT_STEP='15')
  out = _finish(procs, paths, end_others=False)
  workdir = hosts[0] / 'run'
  assert all(c != 0 for c, _ in out) and rundir.checkpoint_steps(str(workdir)) == [0, 10], (
      [c for c, _ in out], rundir.checkpoint_steps(str(workdir)))
  before = {name: (workdir / name).read_bytes()
            for name in (rundir.METRICS_FILE, rundir.STATUS_FILE, rundir.CONFIG_FILE)}

  procs, paths = _start('bn_research.main', args + ['--workdir=run'], processes=2,
                        logs=tmp_path / 'logs_resumed', cwds=hosts,
                        JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  out = _finish(procs, paths, end_others=False)
  for me, (code, err) in enumerate(out):
    assert code == 2, f'process {me}: exit code {code}\n{err[-3000:]}'
    line = _one_line(err)
    mine, theirs = (10, 0) if me == 0 else (0, 10)
    assert 'the steps to resume from' in line and 'shared' in line, line
    assert f'process {me} found run at step {mine}' in line, line
    assert f'process {1 - me} found run at step {theirs}' in line, line
  assert not (hosts[1] / 'run').exists()
  assert {name: (workdir / name).read_bytes() for name in before} == before


@pytest.mark.parametrize('me, reason, coordinator_up, expected', [
    (0, 'Gloo all-reduce failed: Connection reset by peer', True,
     "process 0 of 2: process 1 is gone (JaxRuntimeError: Gloo all-reduce failed: "
     "Connection reset by peer); the run is recorded 'failed'"),
    (1, 'Gloo all-reduce failed: Connection reset by peer', False,
     'process 1 of 2: process 0 (the coordinator) is gone (JaxRuntimeError: Gloo '
     'all-reduce failed: Connection reset by peer); the run stays as process 0 left it'),
    (1, 'UNAVAILABLE: Socket closed', True,
     "process 1 of 2: process 0 is gone (JaxRuntimeError: UNAVAILABLE: Socket closed); "
     "process 0 records the run 'failed'"),
    # Not a lost connection: this process's own failure, not another's.
    (0, 'RESOURCE_EXHAUSTED: Out of memory allocating 4096 bytes', True,
     'process 0 of 2: failed (JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory '
     "allocating 4096 bytes); the run is recorded 'failed'"),
])
def test_the_line_of_a_failed_collective_names_who_is_gone(monkeypatch, me, reason,
                                                           coordinator_up, expected):
  """The words of `lost_peer_message`, for each thing a survivor can see (the error and
  whether the coordinator still answers), in a 2-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  from bn_research.engine import distributed
  monkeypatch.setattr(jax, 'process_index', lambda: me)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(distributed, '_coordinator_stays_up', lambda address: coordinator_up)
  env = {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1', 'BN_RESEARCH_NUM_PROCESSES': '2',
         'BN_RESEARCH_PROCESS_ID': str(me)}
  error = jax.errors.JaxRuntimeError(reason)
  line = distributed.lost_peer_message(error, env)
  assert line == (f'bn_research: {expected}; start every process again with the same '
                  'command to resume.'), line
