"""Launching runs (`bn_research.launch`) and the jobs' own flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bn_research import cpu_placement
from bn_research import launch
from tests import helpers

# A child that reports what it was given, and can wait for a sibling's file.
_CHILD = '''
import json, os, sys, time
name, wait_for = sys.argv[1], sys.argv[2]
at_start = wait_for != "-" and os.path.exists(wait_for)
start = time.time()
while wait_for != "-" and not os.path.exists(wait_for) and time.time() - start < 20:
  time.sleep(0.01)
time.sleep(0.2)  # the parent pins right after the start
affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
json.dump({"xla_flags": os.environ.get("XLA_FLAGS", ""),
           "pythonpath": os.environ.get("PYTHONPATH", ""), "affinity": affinity,
           "saw_sibling": wait_for == "-" or os.path.exists(wait_for),
           "sibling_done_at_start": at_start},
          open(name + ".json", "w"))
'''


def _jobs(tmp_path, names, wait_for):
  return [launch.Job(n, [sys.executable, '-c', _CHILD, str(tmp_path / n), w],
                     log=str(tmp_path / f'{n}.log'))
          for n, w in zip(names, wait_for)]


def _report(tmp_path, name):
  return json.loads((tmp_path / f'{name}.json').read_text())


def test_sequential_jobs_run_one_after_another_with_the_run_environment(tmp_path):
  # a writes its report 0.2 s after it starts: it exists when b starts only if b
  # started after a had finished (a launcher running both at once fails here).
  jobs = _jobs(tmp_path, ['a', 'b'], ['-', str(tmp_path / 'a.json')])
  jobs.append(launch.Job('fails', [sys.executable, '-c', 'raise SystemExit(3)']))
  results = launch.run_jobs(jobs, parallel=1, single_thread=False)
  assert [(r.name, r.returncode) for r in results] == [('a', 0), ('b', 0), ('fails', 3)]
  b = _report(tmp_path, 'b')
  assert b['sibling_done_at_start']
  assert b['pythonpath'].split(os.pathsep)[0] == launch.REPO
  assert launch.SINGLE_THREAD_XLA_FLAGS not in b['xla_flags']


def test_parallel_jobs_run_side_by_side_single_threaded_and_pinned(tmp_path):
  # Each waits for the other's marker file: both finish only if they ran at once.
  jobs = [launch.Job(n, [sys.executable, '-c',
                         f'import os, time, sys\nopen({str(tmp_path / n)!r}, "w")\n' + _CHILD,
                         str(tmp_path / n), str(tmp_path / other)])
          for n, other in (('x', 'y'), ('y', 'x'))]
  cores = cpu_placement.available_cores()
  results = launch.run_jobs(jobs, parallel=2, pin_cores=True, single_thread=True)
  assert [r.returncode for r in results] == [0, 0]
  x, y = _report(tmp_path, 'x'), _report(tmp_path, 'y')
  assert x['saw_sibling'] and y['saw_sibling']
  assert launch.SINGLE_THREAD_XLA_FLAGS in x['xla_flags']
  shares = cpu_placement.core_shares(cores, 2)
  if shares is None:
    assert results[0].cores is None  # one core: left to the scheduler
  else:
    assert [set(x['affinity']), set(y['affinity'])] == shares
    assert [r.cores for r in results] == shares


@pytest.mark.parametrize('parallel', [0, -1, None, 1.5, True])
def test_a_non_positive_parallelism_is_refused_before_anything_starts(tmp_path, parallel):
  marker = tmp_path / 'started'
  job = launch.Job('j', [sys.executable, '-c', f'open({str(marker)!r}, "w")'])
  with pytest.raises(ValueError, match='--parallel=.* must be') as error:
    launch.run_jobs([job], parallel=parallel)
  assert '\n' not in str(error.value)
  assert not marker.exists()


@pytest.mark.parametrize('module,flag', [
    ('experiments.mnist_figure1', '--steps=0'),
    ('experiments.mnist_figure1', '--eval_every=-5'),
    ('experiments.inception_ablation', '--steps=0'),
    ('experiments.inception_ablation', '--parallel=0'),
    ('experiments.inception_ablation', '--seeds=0'),
    ('experiments.inception_lr_calibration', '--steps=0'),
    ('experiments.inception_lr_calibration', '--lrs=0.1'),
    ('experiments.inception_lr_calibration', '--lrs=1,1.0'),
    ('experiments.inception_lr_calibration', '--parallel=0'),
    ('experiments.mnist_lr_sweep', '--steps=0'),
    ('experiments.mnist_lr_sweep', '--lrs=1,1.0'),
    # A stray positional argument is refused by every job, not ignored.
    ('experiments.mnist_figure1', 'stray'),
    ('experiments.mnist_lr_sweep', 'stray'),
    ('experiments.inception_ablation', 'stray'),
    ('experiments.inception_lr_calibration', 'stray'),
    ('experiments.why_bn', 'stray'),
    ('experiments.conv_bn_regularization', 'stray'),
    ('experiments.input_normalization', 'stray'),
    ('experiments.bn_only', 'stray'),
    ('experiments.bn_batch_size', 'stray'),
])
def test_the_jobs_flags_are_one_line_errors_with_exit_code_2(tmp_path, module, flag):
  workdir = tmp_path / 'job'
  proc = helpers.run_module(module, [f'--workdir={workdir}', flag], timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and flag.split('=')[0] in lines[0], proc.stderr
  assert not workdir.exists()


def test_single_thread_flags_do_not_hide_flags_given_after_them():
  """XLA ignores every flag after a bare token; the single-thread options must not be one."""
  flags = launch.with_single_thread('') + ' --xla_force_host_platform_device_count=2'
  proc = subprocess.run([sys.executable, '-c', 'import jax; print(jax.device_count())'],
                        env=dict(os.environ, XLA_FLAGS=flags), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-1] == '2'


def test_library_info_lines_are_off_unless_verbosity_asks_for_them():
  import logging as std_logging
  from absl import logging
  from bn_research import log_filter
  log_filter.quiet_library_logs()
  handler = logging.get_absl_handler()

  def shown(path, level=std_logging.INFO):
    return bool(handler.filter(std_logging.LogRecord('x', level, path, 1, 'm', (), None)))

  before = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.INFO)
    assert not shown('/site-packages/jax/_src/xla_bridge.py')  # the TPU probe line
    assert not shown('/site-packages/orbax/checkpoint/checkpointer.py')
    assert shown('/site-packages/orbax/x.py', std_logging.WARNING)
    assert shown(os.path.join(launch.REPO, 'bn_research', 'engine', 'loop.py'))
    logging.set_verbosity(logging.DEBUG)  # --verbosity=1
    assert shown('/site-packages/orbax/checkpoint/checkpointer.py')
  finally:
    logging.set_verbosity(before)
