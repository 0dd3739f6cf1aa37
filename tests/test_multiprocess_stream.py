"""Streamed data on several processes: 2 processes x 1 CPU device on TFDS's mock
ImageNet (`tfds.testing.mock_data`, in every process) train the same curve and
evaluate the same whole validation split as 1 process x 2 devices and as 1 process x
1 device, under the jit and the pmap layouts. Each process reads its share of every training and evaluation batch;
the evaluation sums cover every process's share (a sum over this process's share alone
gives another eval_loss)."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests import helpers

RUN = textwrap.dedent('''
    import sys
    sys.path.insert(0, '.')
    import tensorflow_datasets as tfds
    from bn_research import train
    from configs import imagenet_inception
    layout, workdir, data_dir, distributed = sys.argv[1:5]
    c = imagenet_inception.get_config('model=bn_x30,steps=6')
    c.batch_size = 8
    c.model.name = 'mlp'  # the stream is under test, not the network
    c.model.hidden_sizes = (16, 16)
    c.model.virtual_batch_size = 0
    c.data.image_size = 8
    c.data.num_workers = 0
    c.data.prefetch = 0
    c.data.data_dir = data_dir
    c.eval_batch_size = 8
    c.num_eval_examples = 0
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.steps_per_dispatch = 1
    c.parallelism = layout
    c.distributed = distributed == '1'
    c.eval.batch_stats = 'moving_average'
    c.probe.enabled = False
    # 20 validation examples: batches of 8 split over 2 processes, the last one padded.
    with tfds.testing.mock_data(num_examples=20):
      train.train_and_evaluate(c, workdir)
''')


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env['PYTHONPATH'] = helpers.REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.update(extra)
  return env


def _run(layout: str, workdir: str, data_dir: str, processes: int, devices: int) -> None:
  """`processes` processes with `devices` devices each."""
  if processes == 1:
    proc = subprocess.run([sys.executable, '-c', RUN, layout, workdir, data_dir, '0'],
                          env=_env(devices), cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return
  port = helpers.free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-c', RUN, layout, workdir, data_dir, '1'],
      env=_env(devices, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               BN_RESEARCH_NUM_PROCESSES=str(processes), BN_RESEARCH_PROCESS_ID=str(i)),
      cwd=helpers.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  deadline = time.time() + 600
  while time.time() < deadline and any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
      break  # a failed process: the other would wait for it at a collective
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    code, err = p.wait(), p.stderr.read()
    assert code == 0, err[-3000:]


@pytest.mark.parametrize('layout', ['jit', 'pmap'])
def test_two_processes_on_the_stream_equal_one_process_with_two_devices(tmp_path, layout):
  from bn_research import rundir
  data_dir = tmp_path / 'tfds'  # mock_data reads nothing from it; it must exist
  data_dir.mkdir()
  runs = {}
  # (processes, devices each); 1 x 1 is the reference: one device sees every batch whole.
  for processes, devices in ((1, 1), (1, 2), (2, 1)):
    runs[processes, devices] = str(tmp_path / f'p{processes}d{devices}')
    _run(layout, runs[processes, devices], str(data_dir), processes, devices)
  rows = {p: [{k: v for k, v in r.items() if k != 'steps_per_second'}
              for r in rundir.read_metrics(w)] for p, w in runs.items()}
  reference = rows[1, 1]
  assert [r['step'] for r in reference] == [0, 2, 3, 4, 6]
  import jax
  for shape in ((1, 2), (2, 1)):
    assert [r['step'] for r in rows[shape]] == [r['step'] for r in reference]
    for a, b in zip(rows[shape], reference):
      assert a.keys() == b.keys()
      for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (shape, a['step'], key)
    for x, y in zip(jax.tree_util.tree_leaves(rundir.load_latest(runs[shape])),
                    jax.tree_util.tree_leaves(rundir.load_latest(runs[1, 1]))):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert rundir.read_status(runs[shape])['status'] == 'done'
