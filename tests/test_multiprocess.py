"""The multi-host path, exercised on one machine: 2 processes x 1 CPU device each
(`jax.distributed.initialize` on 127.0.0.1, gloo CPU collectives) against 1 process x 2
devices, for a plain run and for a member sweep. Only process 0 writes run files."""

import glob
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers

TINY = ['--config=configs/mnist_mlp.py:bn,source=synthetic', '--config.num_train_steps=20',
        '--config.eval_every_steps=10', '--config.log_every_steps=5',
        '--config.checkpoint_every_steps=10', '--config.steps_per_dispatch=5',
        '--config.data.image_size=8', '--config.data.num_train=256',
        '--config.data.num_test=64', '--config.batch_size=32', '--config.eval_batch_size=64',
        '--config.model.hidden_sizes=(16, 16)', '--config.probe.num_examples=64']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env['PYTHONPATH'] = helpers.REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.update(extra)
  return env


def _launch(module: str, args: list[str], *, processes: int) -> list:
  """Runs `python -m module args` as `processes` cooperating processes (or one process
  with two devices when processes == 1); returns their CompletedProcess-like tuples."""
  if processes == 1:
    proc = subprocess.run([sys.executable, '-m', module, *args], env=_env(2),
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
    return [(proc.returncode, proc.stderr)]
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', module, *args, '--config.distributed=True'],
      env=_env(1, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               BN_RESEARCH_NUM_PROCESSES=str(processes), BN_RESEARCH_PROCESS_ID=str(i)),
      cwd=helpers.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  # If one process fails, the other would wait for it at a barrier: end it too.
  deadline = time.time() + 300
  while time.time() < deadline and any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
  return [(p.wait(), p.stderr.read()) for p in procs]


def _same_run(a: str, b: str) -> None:
  import jax
  from bn_research import rundir
  drop = ('steps_per_second',)
  rows_a = [{k: v for k, v in r.items() if k not in drop} for r in rundir.read_metrics(a)]
  rows_b = [{k: v for k, v in r.items() if k not in drop} for r in rundir.read_metrics(b)]
  assert [r['step'] for r in rows_a] == [r['step'] for r in rows_b]  # no row twice
  for ra, rb in zip(rows_a, rows_b):
    assert ra.keys() == rb.keys()
    for key in ra:
      assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra['step'], key)
  sa, sb = rundir.load_latest(a), rundir.load_latest(b)
  for x, y in zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert rundir.read_status(a)['status'] == rundir.read_status(b)['status'] == 'done'
  # One writer: one TensorBoard event file.
  assert len(glob.glob(os.path.join(a, 'events.out.tfevents.*'))) == 1


@pytest.mark.parametrize('kind', ['plain', 'sweep'])
def test_two_processes_equal_one_process_with_two_devices(tmp_path, kind):
  if kind == 'plain':
    module, extra = 'bn_research.main', []
  else:
    module, extra = 'scripts.sweep', ['--vmap', '--sweep=optimizer.learning_rate=0.1,0.3']
  results = {}
  for processes in (1, 2):
    workdir = str(tmp_path / f'p{processes}')
    out = _launch(module, TINY + extra + [f'--workdir={workdir}'], processes=processes)
    for code, err in out:
      assert code == 0, err[-3000:]
    results[processes] = workdir
    if processes == 2:
      assert "'processes': 2" in open(os.path.join(
          workdir if kind == 'plain' else glob.glob(workdir + '/*=*')[0],
          'data.json')).read().replace('"', "'")
  if kind == 'plain':
    _same_run(results[2], results[1])
  else:
    names = sorted(os.path.basename(p) for p in glob.glob(results[1] + '/*=*'))
    assert len(names) == 2
    for name in names:
      _same_run(os.path.join(results[2], name), os.path.join(results[1], name))
