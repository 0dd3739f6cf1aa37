"""`python -m bn_research.evaluate` across processes, on one machine: 2 processes x 1 CPU
device each (`jax.distributed` on 127.0.0.1, gloo collectives, started as training is)
against 1 process x 2 devices and 1 process x 1 device; a run trained by 2 processes
evaluated by 1; refusals agreed by every process before anything is compiled; a peer
lost mid-evaluation."""

import os
import shutil
import subprocess
import sys

import pytest

from tests import helpers
from tests import test_multiprocess as multiprocess

pytestmark = pytest.mark.slow

POPULATION_BATCHES = 4
TRAIN = helpers.tiny_args(**{
    'num_train_steps': 20, 'eval_every_steps': 10, 'log_every_steps': 10,
    'checkpoint_every_steps': 10, 'steps_per_dispatch': 10, 'data.num_train': 256,
    'data.num_test': 64, 'batch_size': 32, 'eval.batch_stats': 'population',
    'eval.population_batches': POPULATION_BATCHES})


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """'two': a run trained by 2 processes x 1 device (its evaluations use Algorithm 2's
  statistics, gathered across the processes); 'other': the same config, seed 1, trained
  by 1 process, to make an ensemble with it."""
  root = tmp_path_factory.mktemp('runs')
  logs = root / 'logs'
  logs.mkdir()
  out = multiprocess._launch('bn_research.main', TRAIN + [f'--workdir={root / "two"}'],
                             processes=2, logs=logs)
  assert [c for c, _ in out] == [0, 0], '\n'.join(e[-3000:] for _, e in out)
  proc = helpers.run_main(TRAIN + [f'--workdir={root / "other"}', '--config.seed=1'],
                          env={'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {'two': root / 'two', 'other': root / 'other'}


def _start(args: list[str], *, processes: int, logs, cwds=None, **env):
  """`python -m bn_research.evaluate args --distributed` as `processes` cooperating
  processes of 1 CPU device each; returns them and their stderr files' paths (stdout
  goes to the same path ending in .stdout)."""
  port = helpers.free_port()
  procs, paths = [], []
  for i in range(processes):
    paths.append(os.path.join(str(logs), f'evaluate{i}.stderr'))
    with open(paths[-1], 'w') as err, open(paths[-1][:-len('stderr')] + 'stdout', 'w') as o:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'bn_research.evaluate', *args, '--distributed'],
          env=helpers.subprocess_env(
              1, cpu=True, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
              BN_RESEARCH_NUM_PROCESSES=str(processes), BN_RESEARCH_PROCESS_ID=str(i),
              **env),
          cwd=cwds[i] if cwds else helpers.REPO, stdout=o, stderr=err, text=True))
  return procs, paths


def _evaluate(args: list[str], *, processes: int, devices: int, out, logs) -> dict:
  """The evaluation's JSON record, from `processes` processes of `devices` each."""
  args = args + [f'--out={out}']
  if processes == 1:
    proc = helpers.run_module('bn_research.evaluate', args, env={'JAX_PLATFORMS': 'cpu'},
                              devices=devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
  else:
    assert devices == 1
    result = multiprocess._finish(*_start(args, processes=processes, logs=logs))
    assert [c for c, _ in result] == [0] * processes, '\n'.join(
        e[-3000:] for _, e in result)
    # Process 0 alone writes the files and prints their paths and the rows (gloo
    # prints its connection line in every process).
    printed = [(logs / f'evaluate{i}.stdout').read_text() for i in range(processes)]
    assert str(out / 'evaluation.json') in printed[0] and 'top-1' in printed[0], printed
    assert not any(str(out) in p or 'top-1' in p for p in printed[1:]), printed
  return helpers.read_json(out / 'evaluation.json')


def _last_eval(workdir) -> dict:
  return [r for r in helpers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'eval_accuracy' in r][-1]


def test_a_run_trained_by_two_processes_evaluates_in_one_process(runs):
  """The checkpoint written by a 2-process run restores in 1 process, and the command
  gives the accuracy and loss the run logged at its final evaluation (Algorithm 2's
  statistics, estimated across the 2 processes then, on 1 device here)."""
  from bn_research import evaluate as ev
  two = str(runs['two'])
  logged = _last_eval(two)
  assert logged['step'] == 20
  record = ev.evaluate(ev.make_plan([two], crops=['center']))
  (row,) = record['rows']
  assert record['runs'][0]['batch_stats'] == 'population'
  assert record['runs'][0]['step'] == 20
  assert row['count'] == 64
  assert row['top1_accuracy'] == pytest.approx(logged['eval_accuracy'], abs=1e-9)
  assert row['top5_accuracy'] == pytest.approx(logged['eval_top5_accuracy'], abs=1e-9)
  # float32 sums over 2 devices there, 1 here: reassociation only.
  assert row['nll'] == pytest.approx(logged['eval_loss'], rel=1e-5)


def test_two_processes_give_the_one_process_rows(runs, tmp_path):
  """2 processes x 1 device, each evaluating its share of every held-out batch (every
  view, every member) and of Algorithm 2's training batches, give the rows of 1 process
  x 2 devices and of 1 process x 1 device: for the centre view, a multi-crop scheme and
  the ensemble, with Algorithm 2's statistics (which the moving averages' path is a part
  of: the same placement and evaluation, without the estimate). Only process 0 writes.

  Counts and top-k hits are compared exactly (the same predictions); the NLL within the
  spread between the two 1-process references (the same computation with its float32
  sums split differently), or exactly where they agree bit for bit."""
  args = [f'--workdir={runs["two"]}', f'--workdir={runs["other"]}',
          '--crops=center,multi:3', '--ensemble', '--batch_stats=population',
          f'--population_batches={POPULATION_BATCHES}']
  records = {}
  for processes, devices in ((1, 1), (1, 2), (2, 1)):
    key = f'{processes}x{devices}'
    (tmp_path / key).mkdir()
    records[key] = _evaluate(args, processes=processes, devices=devices,
                             out=tmp_path / key / 'out', logs=tmp_path / key)
  assert [r['processes'] for r in records['2x1']['runs']] == [2, 2]
  assert [r['devices'] for r in records['2x1']['runs']] == [2, 2]
  assert {r['batch_stats'] for r in records['2x1']['runs']} == {'population'}
  assert sorted(os.listdir(tmp_path / '2x1' / 'out')) == ['evaluation.json', 'evaluation.md']
  rows = {k: r['rows'] for k, r in records.items()}
  assert len(rows['1x1']) == 6 and rows['1x1'][-1]['name'] == 'ensemble'
  spread = max(abs(a['nll'] - b['nll']) for a, b in zip(rows['1x1'], rows['1x2']))
  for ref in ('1x1', '1x2'):
    for one, two in zip(rows[ref], rows['2x1']):
      for key in ('name', 'crops', 'views', 'count', 'top1_accuracy', 'top5_accuracy'):
        assert two[key] == one[key], (ref, one['name'], one['crops'], key)
      assert abs(two['nll'] - one['nll']) <= spread, (ref, one['name'], one['crops'])


# ---------------------------------------------------------------- refusals, a lost peer


def _one_line(stderr: str) -> str:
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = [l for l in stderr.strip().splitlines() if not l.startswith(('I1', 'W1'))]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_a_refusal_of_one_process_ends_every_process_in_one_line(runs, tmp_path):
  """Process 1 cannot see the run (a relative --workdir from another directory, as a
  host's local disk would be): it refuses in one line, process 0 names process 1's
  refusal in one line, both exit 2 before anything is compiled, nothing is written."""
  hosts = [tmp_path / 'host0', tmp_path / 'host1']
  for h in hosts:
    h.mkdir()
  shutil.copytree(runs['two'], hosts[0] / 'run')
  procs, paths = _start(['--workdir=run', '--out=out'], processes=2, logs=tmp_path,
                        cwds=hosts)
  (code0, err0), (code1, err1) = multiprocess._finish(procs, paths, end_others=False)
  assert (code0, code1) == (2, 2), (err0[-3000:], err1[-3000:])
  line1 = _one_line(err1)
  assert "--workdir='run' is not a directory" in line1, line1
  line0 = _one_line(err0)
  assert 'evaluation checked: process 1 refused' in line0 and 'not a directory' in line0
  assert not (hosts[0] / 'out').exists() and not (hosts[1] / 'out').exists()


def test_a_refusal_after_start_up_is_one_line_in_every_process(runs, tmp_path):
  """A held-out batch the 2 devices (one per process) cannot split is found once the
  processes have started (the device count needs them): every process refuses in one
  line, exit code 2, before compiling; nothing is written. A malformed environment is
  refused before start-up."""
  from bn_research import rundir
  run = tmp_path / 'odd'
  shutil.copytree(runs['two'], run)
  config = helpers.read_json(run / 'config.json')
  config['eval_batch_size'] = 63
  rundir.write_json(str(run / 'config.json'), config)
  out = tmp_path / 'out'
  result = multiprocess._finish(*_start([f'--workdir={run}', f'--out={out}'], processes=2,
                                        logs=tmp_path), end_others=False)
  for code, err in result:
    assert code == 2, err[-3000:]
    line = _one_line(err)
    assert 'eval_batch_size=63' in line and '2 devices' in line, line
  assert not out.exists()
  proc = helpers.run_module('bn_research.evaluate', [f'--workdir={run}', f'--out={out}',
                                                     '--distributed'],
                            env={'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1',
                                 'BN_RESEARCH_NUM_PROCESSES': 'two',
                                 'BN_RESEARCH_PROCESS_ID': '0'})
  assert proc.returncode == 2
  assert "BN_RESEARCH_NUM_PROCESSES='two'" in _one_line(proc.stderr)
  assert not out.exists()


PEER_TIMEOUT = 120  # seconds: the survivor must end well before JAX would end it


def test_a_peer_killed_mid_evaluation_ends_the_survivor_in_one_line(runs, tmp_path):
  """Process 1 is SIGKILLed once the evaluation has begun: process 0 ends by itself, with
  exit status EXIT_PEER_LOST and one line naming process 1, no traceback or abort, and
  writes nothing. (A test set of 20,000 synthetic images and 32 views keeps the
  evaluation going long after the kill.)"""
  from bn_research import rundir
  run = tmp_path / 'big'
  shutil.copytree(runs['two'], run)
  config = helpers.read_json(run / 'config.json')
  config['data']['num_test'] = 20_000
  rundir.write_json(str(run / 'config.json'), config)
  out = tmp_path / 'out'
  procs, paths = _start([f'--workdir={run}', f'--out={out}', '--crops=multi:16'],
                        processes=2, logs=tmp_path,
                        BN_RESEARCH_PEER_TIMEOUT=str(PEER_TIMEOUT))
  helpers.wait_for(lambda: 'Evaluating 1 run(s)' in open(paths[1]).read(),
                   'the evaluation to begin', proc=procs[1])
  line = multiprocess.kill_and_read_the_survivor(procs, paths, 1, 0, PEER_TIMEOUT)
  assert 'process 0 of 2: process 1 is gone' in line, line
  assert 'nothing is written' in line, line
  assert not out.exists()


# ---------------------------------------------------------------- streamed data

EVALUATE_ON_MOCK_IMAGENET = '''
import sys
sys.path.insert(0, '.')
import tensorflow_datasets as tfds
from absl import app
from bn_research import evaluate
evaluate._define_flags()
with tfds.testing.mock_data(num_examples=20):
  app.run(evaluate.main, argv=['bn_research.evaluate'] + sys.argv[1:])
'''


def test_streamed_imagenet_on_two_processes_gives_the_one_process_rows(tmp_path):
  """A run on TFDS's mock ImageNet (the stream: each process reads its own share of the
  files), evaluated by 2 processes x 1 device, 1 x 2 and 1 x 1, with the centre view and
  flips and with Algorithm 2's statistics from the stream's first 2 training batches:
  the same rows (counts and top-k hits exactly, the NLL within the spread of the two
  1-process references). The 20 validation images come in batches of 8, the last one
  padded: each process's share of it is part padding."""
  from tests import test_multiprocess_stream as stream
  data_dir = tmp_path / 'tfds'  # mock_data reads nothing from it; it must exist
  data_dir.mkdir()
  workdir = str(tmp_path / 'run')
  stream._run('jit', workdir, str(data_dir), 1, 1)
  args = [f'--workdir={workdir}', '--crops=center,flip', '--batch_stats=population',
          '--population_batches=2']
  records = {}
  for processes, devices in ((1, 1), (1, 2), (2, 1)):
    out = tmp_path / f'{processes}x{devices}'
    command = [sys.executable, '-c', EVALUATE_ON_MOCK_IMAGENET, *args, f'--out={out}']
    if processes == 1:
      proc = subprocess.run(command, env=stream._env(devices), cwd=helpers.REPO,
                            capture_output=True, text=True, timeout=helpers.CEILING)
      assert proc.returncode == 0, proc.stderr[-3000:]
    else:
      port = helpers.free_port()
      paths = [str(tmp_path / f'evaluate{i}.stderr') for i in range(processes)]
      procs = []
      for i, path in enumerate(paths):
        with open(path, 'w') as err:
          procs.append(subprocess.Popen(
              command + ['--distributed'], cwd=helpers.REPO, stdout=subprocess.DEVNULL,
              stderr=err, text=True, env=stream._env(
                  1, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                  BN_RESEARCH_NUM_PROCESSES=str(processes), BN_RESEARCH_PROCESS_ID=str(i))))
      result = multiprocess._finish(procs, paths)
      assert [c for c, _ in result] == [0] * processes, '\n'.join(e[-3000:] for _, e in result)
    records[processes, devices] = helpers.read_json(out / 'evaluation.json')
  assert records[2, 1]['runs'][0]['processes'] == 2
  assert {r['runs'][0]['batch_stats'] for r in records.values()} == {'population'}
  rows = {k: r['rows'] for k, r in records.items()}
  assert [r['count'] for r in rows[1, 1]] == [20, 20]
  spread = max(abs(a['nll'] - b['nll']) for a, b in zip(rows[1, 1], rows[1, 2]))
  for ref in ((1, 1), (1, 2)):
    for one, two in zip(rows[ref], rows[2, 1]):
      for key in ('crops', 'views', 'count', 'top1_accuracy', 'top5_accuracy'):
        assert two[key] == one[key], (ref, one['crops'], key)
      assert abs(two['nll'] - one['nll']) <= spread, (ref, one['crops'], spread)


_PER_BATCH_PROGRAM = '''
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from bn_research import evaluate
mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
split = NamedSharding(mesh, P('data'))
rng = np.random.default_rng(0)
probs = rng.dirichlet(np.ones(10), size=8).astype(np.float32)
labels, mask = rng.integers(0, 10, size=8), (np.arange(8) < 7).astype(np.float32)
fn = evaluate._shard_metrics_fn(2)
placed = [jax.device_put(x, split) for x in (probs, labels, mask)]
text = fn.lower(*placed).compile().as_text()
print([w for w in ('all-reduce', 'all-gather', 'collective-permute', 'all-to-all',
                   'reduce-scatter') if w in text])
sums = jax.device_get(evaluate._sum_shards({'k': fn(*placed)})['k'])
print({k: float(v) for k, v in sums.items()})
'''


def test_a_batch_is_evaluated_without_crossing_devices(tmp_path):
  """The per-batch sums stay on each device (the compiled per-batch program holds no
  collective), so processes never wait for each other between batches; the shards'
  sums then add up to the whole batch's, checked against NumPy on a batch with a
  padded example."""
  import ast
  import numpy as np
  proc = helpers.run_python(_PER_BATCH_PROGRAM, devices=2, env={'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  collectives, sums = (ast.literal_eval(l) for l in proc.stdout.strip().splitlines()[-2:])
  assert collectives == [], collectives
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(10), size=8).astype(np.float32).astype(np.float64)
  labels, mask = rng.integers(0, 10, size=8), np.arange(8) < 7
  own = probs[np.arange(8), labels]
  ranks = (probs > own[:, None]).sum(1)  # classes above the label (ties count for it)
  assert sums['count'] == 7
  assert sums['correct'] == np.sum((ranks == 0) & mask)
  assert sums['correct_top5'] == np.sum((ranks < 5) & mask)
  assert sums['nll_sum'] == pytest.approx(-np.sum(np.log(own)[mask]), rel=1e-6)
