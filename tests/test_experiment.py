"""The experiment driver (`bn_research.experiment`): the minimal job of its docstring runs
end to end, and every kind of bad input is one line and exit code 2 before anything is
created."""

import os
import pathlib
import re

import pytest

from tests import helpers


@pytest.fixture
def docstring_job(tmp_path) -> dict:
  """The docstring's example, written out as the module `lr_pair` (as a user would)."""
  from bn_research import experiment
  code = re.search(r"\n    '''(.*?)experiment.main\(__name__\)\n", experiment.__doc__,
                   re.DOTALL)
  assert code, 'the docstring lost its example'
  lines = ("    '''" + code.group(1) + 'experiment.main(__name__)').splitlines()
  (tmp_path / 'lr_pair.py').write_text('\n'.join(line[4:] for line in lines) + '\n')
  return {'PYTHONPATH': f'{tmp_path}{os.pathsep}{helpers.REPO}'}


TINY = ['--steps=20', '--set=data.name=synthetic', '--set=data.source=synthetic', '--set=data.num_train=300',
        '--set=data.num_test=100', '--set=eval_every_steps=10', '--set=log_every_steps=10',
        '--set=steps_per_dispatch=10', '--set=probe.enabled=false']


def test_the_docstring_job_trains_reads_and_writes_its_outputs(tmp_path, docstring_job):
  workdir = tmp_path / 'job'
  proc = helpers.run_module('lr_pair', [f'--workdir={workdir}', *TINY],
                            env=docstring_job)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = helpers.read_json(workdir / 'lr_pair.json')
  for lr in (0.1, 0.5):
    rows = helpers.read_jsonl(workdir / f'lr={lr}' / 'metrics.jsonl')
    accuracy = [r['eval_accuracy'] for r in rows if 'eval_accuracy' in r]
    assert summary[f'lr={lr}'] == accuracy[-1]  # read back from the run's own files
    assert helpers.read_json(workdir / f'lr={lr}' / 'config.json')['optimizer'][
        'learning_rate'] == lr
  md = (workdir / 'lr_pair.md').read_text()
  assert '| run | final test accuracy |' in md
  assert 'Command: `python -m lr_pair --workdir=' in md and 'Machine: ' in md
  assert os.path.getsize(workdir / 'lr_pair.png') > 1000
  assert '| lr=0.1 |' in proc.stdout


@pytest.mark.parametrize('args, fragment', [
    (['stray'], 'unexpected arguments: stray'),
    (['--steps=0'], '--steps=0'),
    (['--steps=many'], "--steps='many'"),
    (['--set=optimizer.lr=1'], 'optimizer.lr=1: no such config key'),
    (['--set=novalue'], "--set='novalue'"),
    (['--set=optimizer.learning_rate=inf'], 'optimizer.learning_rate=inf'),
    (['--set=seed=1', '--set=seed=2'], 'seed is set twice'),
    (['--parallel=0'], '--parallel=0'),
    (['--how=queue'], '--how'),
    (['--nosuchflag'], 'nosuchflag'),
])
def test_bad_input_is_one_line_and_exit_2_before_anything(tmp_path, docstring_job, args,
                                                          fragment):
  workdir = tmp_path / 'job'
  proc = helpers.run_module('lr_pair', [f'--workdir={workdir}', *args], env=docstring_job,
                            timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], proc.stderr
  assert not workdir.exists()


def test_a_workdir_that_cannot_be_one_is_refused(tmp_path, docstring_job):
  a_file = tmp_path / 'file'
  a_file.write_text('')
  for workdir, fragment in ((a_file, 'is a file'), (tmp_path / 'no' / 'job', 'no')):
    proc = helpers.run_module('lr_pair', [f'--workdir={workdir}'], env=docstring_job,
                              timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert fragment in proc.stderr
  assert not (tmp_path / 'no').exists()


# Modules of experiments/ that share code between jobs and are not jobs themselves.
_NOT_JOBS = ('__init__', 'normalizer_runs')


@pytest.mark.parametrize('module', [
    f'{path.parent.name}.{path.stem}'
    for folder in ('experiments', 'scripts')
    for path in sorted(pathlib.Path(helpers.REPO, folder).glob('*.py'))
    if path.stem not in _NOT_JOBS])
def test_help_of_every_job_and_script_exits_0_with_a_usage_line(module):
  proc = helpers.run_module(module, ['--help'], timeout=120)
  assert proc.returncode == 0, (module, proc.returncode, proc.stderr[-2000:])
  # A usage line: the command itself as its docstring shows it, or argparse's usage.
  assert (f'python -m {module}' in proc.stdout
          or proc.stdout.lower().startswith('usage:')), (module, proc.stdout[:500])
  assert 'Traceback' not in proc.stderr


def test_sigterm_stops_every_run_of_a_job_and_exits_143_in_one_line(tmp_path, docstring_job):
  import signal
  import subprocess
  import sys
  import time
  workdir = tmp_path / 'job'
  args = [f'--workdir={workdir}', '--steps=400000', '--set=checkpoint_every_steps=100000',
          *[a for a in TINY if not a.startswith('--steps')]]
  env = dict(os.environ, **docstring_job)
  proc = subprocess.Popen([sys.executable, '-m', 'lr_pair', *args], cwd=helpers.REPO,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  metrics = [workdir / f'lr={lr}' / 'metrics.jsonl' for lr in (0.1, 0.5)]
  deadline = time.time() + 300
  while time.time() < deadline and not all(
      m.exists() and 'train_loss' in m.read_text() for m in metrics):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 143, stderr[-3000:]
  assert 'Traceback' not in stderr
  assert stderr.strip().splitlines()[-1].startswith('lr_pair: interrupted by signal 15')
  for lr in (0.1, 0.5):
    status = helpers.read_json(workdir / f'lr={lr}' / 'status.json')
    assert status['status'] == 'interrupted' and status['signal'] == signal.SIGTERM
