"""Shared test utilities: small configs and running code in a fresh process."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_mlp_config(**overrides):
  """The MNIST MLP config shrunk to run in well under a second."""
  sys.path.insert(0, REPO)
  from configs import mnist_mlp
  c = mnist_mlp.get_config('bn,source=synthetic')
  c.data.image_size = 8
  c.data.num_train = 512
  c.data.num_test = 128
  c.batch_size = 16
  c.num_train_steps = 40
  c.eval_every_steps = 20
  c.log_every_steps = 10
  c.checkpoint_every_steps = 20
  c.steps_per_dispatch = 10
  c.eval_batch_size = 64
  c.model.hidden_sizes = (16, 16)
  c.probe.num_examples = 64
  c.optimizer.learning_rate = 0.1
  # The engine's default (the MNIST config evaluates with population statistics, which
  # tests/test_population_eval.py and the Figure 1 job test cover).
  c.eval.batch_stats = 'moving_average'
  return set_keys(c, overrides)


def set_keys(c, values: dict):
  """Sets {'dotted.key': value} in a ConfigDict; returns it."""
  for key, value in values.items():
    node = c
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return c


# The longest any single wait in a test may take before it fails with a message: a
# ceiling for a hang, far above what a loaded 2-core machine needs (pytest.ini's per-test
# timeout is the ceiling above this one).
CEILING = 600


def free_port() -> int:
  """A TCP port on 127.0.0.1 that no process holds now (for a coordinator address)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def subprocess_env(devices: int | None = None, *, cpu: bool = False,
                   **extra: str) -> dict:
  """The environment of a process a test starts: this repository first on PYTHONPATH,
  and with `devices`, that many forced host devices (XLA_FLAGS replaced, since a flag
  inherited from the caller could ask for another count)."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
  if devices is not None:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  if cpu:
    env['JAX_PLATFORMS'] = 'cpu'
  env.update(extra)
  return env


def run_python(code: str, *, devices: int = 1, env: dict | None = None,
               timeout: int = CEILING) -> subprocess.CompletedProcess:
  """Runs code in a new interpreter (e.g. with several forced CPU devices)."""
  return subprocess.run([sys.executable, '-c', code], env=subprocess_env(devices, **(env or {})),
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_main(args: list[str], *, env: dict | None = None, devices: int = 1,
             timeout: int = CEILING) -> subprocess.CompletedProcess:
  """Runs `python -m bn_research.main args` from the repository root."""
  return run_module('bn_research.main', args, env=env, devices=devices, timeout=timeout)


def run_module(module: str, args: list[str], *, env: dict | None = None,
               devices: int | None = None,
               timeout: int = CEILING) -> subprocess.CompletedProcess:
  """Runs `python -m module args` from the repository root."""
  return subprocess.run([sys.executable, '-m', module, *args],
                        env=subprocess_env(devices, **(env or {})), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def wait_for(condition: Callable[[], bool], what: str, *, timeout: float = CEILING,
             proc: subprocess.Popen | None = None) -> None:
  """Polls `condition` until it holds; fails naming `what` after `timeout` seconds, or
  at once if `proc` has exited meanwhile (it will never make the condition true)."""
  end = time.monotonic() + timeout
  while not condition():
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f'{what}: the process ended first (exit code {proc.returncode})')
    if time.monotonic() > end:
      raise AssertionError(f'{what}: not seen within {timeout:.0f} s')
    time.sleep(0.1)


def read_line(proc: subprocess.Popen, *, timeout: float = CEILING) -> str:
  """The next line of `proc`'s stdout (a text pipe), or a failure after `timeout` s."""
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()),
                            daemon=True)
  reader.start()
  reader.join(timeout)
  if not lines:
    proc.kill()
    raise AssertionError(f'no line from process {proc.pid} within {timeout:.0f} s')
  return lines[0]


@contextlib.contextmanager
def lock_holder(workdir) -> Iterator[subprocess.Popen]:
  """Another live process holding `workdir`'s run lock (`rundir.WorkdirLock`) until the
  block ends."""
  code = ('import sys, time\nfrom bn_research import rundir\n'
          'lock = rundir.WorkdirLock(sys.argv[1]).acquire()\n'
          'print("held", flush=True)\ntime.sleep(100000)\n')
  proc = subprocess.Popen([sys.executable, '-c', code, str(workdir)],
                          env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert read_line(proc).strip() == 'held'
    yield proc
  finally:
    proc.kill()
    proc.wait()


def tiny_args(**overrides) -> list[str]:
  """`tiny_mlp_config` as command-line arguments of `bn_research.main` (or a sweep):
  --config=... then one --config.KEY=VALUE per key; `overrides` ({'dotted.key': value},
  written with `**{...}`) replace or add keys, and a value None leaves the key at the
  config file's default (e.g. a key a sweep varies)."""
  c = tiny_mlp_config()
  keys = ('data.image_size', 'data.num_train', 'data.num_test', 'batch_size',
          'num_train_steps', 'eval_every_steps', 'log_every_steps', 'checkpoint_every_steps',
          'steps_per_dispatch', 'eval_batch_size', 'model.hidden_sizes',
          'probe.num_examples', 'optimizer.learning_rate', 'eval.batch_stats')
  values = {k: functools.reduce(lambda node, part: node[part], k.split('.'), c)
            for k in keys}
  values.update(overrides)
  return ['--config=configs/mnist_mlp.py:bn,source=synthetic'] + [
      f'--config.{k}={v}' for k, v in values.items() if v is not None]


def assert_same_run(a, b, *, atol: float, rtol: float = 0.0,
                    ignore: tuple[str, ...] = ('steps_per_second',)) -> None:
  """Two run directories hold the same run: the same metric rows (steps, keys and values
  within the tolerance, `ignore` keys aside), the same final checkpoint (every leaf of
  params, batch stats and optimiser state) and the same final status.

  Args:
    a, b: run directories.
    atol, rtol: as in `np.testing.assert_allclose`; the caller says where they come from.
    ignore: metric keys that differ between equal runs (timings).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bn_research import rundir  # pylint: disable=g-import-not-at-top
  a, b = str(a), str(b)
  rows_a, rows_b = rundir.read_metrics(a), rundir.read_metrics(b)
  assert [r['step'] for r in rows_a] == [r['step'] for r in rows_b]  # no row twice
  for ra, rb in zip(rows_a, rows_b):
    assert sorted(set(ra) - set(ignore)) == sorted(set(rb) - set(ignore)), ra['step']
    for key in set(ra) - set(ignore):
      np.testing.assert_allclose(ra[key], rb[key], atol=atol, rtol=rtol,
                                 err_msg=f'step {ra["step"]} {key}')
  sa, sb = rundir.load_latest(a), rundir.load_latest(b)
  leaves_a = jax.tree_util.tree_leaves_with_path(sa)
  leaves_b = jax.tree_util.tree_leaves_with_path(sb)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))
  status_a, status_b = rundir.read_status(a), rundir.read_status(b)
  assert status_a['status'] == status_b['status'] and status_a['step'] == status_b['step']


def max_difference(a, b, *, ignore: tuple[str, ...] = ('steps_per_second',)) -> float:
  """The largest absolute difference between two run directories of the same run shape:
  over every metric value and every leaf of the final checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bn_research import rundir  # pylint: disable=g-import-not-at-top
  a, b = str(a), str(b)
  diffs = [0.0]
  for ra, rb in zip(rundir.read_metrics(a), rundir.read_metrics(b)):
    diffs += [abs(ra[k] - rb[k]) for k in set(ra) & set(rb) - set(ignore)]
  for x, y in zip(jax.tree_util.tree_leaves(rundir.load_latest(a)),
                  jax.tree_util.tree_leaves(rundir.load_latest(b))):
    diffs.append(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))))
  return max(diffs)


def reassociation_tolerance(ref_a, ref_b) -> float:
  """An absolute tolerance for comparing runs whose programs differ only in how floating
  point sums are associated (kernels picked by the optimising compiler, how a cross-device
  sum travels), derived instead of guessed: 4 x the largest difference between two
  reference runs that differ in exactly such an association (e.g. one device and two
  devices summing halves of each batch), plus 4 float32 ulps of 1 for references that
  happen to agree bitwise. The factor 4 leaves room for the compared pair's own rounding
  path to differ from the references' by as much again, twice over."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return 4 * max_difference(ref_a, ref_b) + 4 * float(np.finfo(np.float32).eps)


def np_batch_norm(x, gamma, beta, axes, eps):
  """The paper's Algorithm 1 in float64 NumPy: (y, mu_B, var_B (biased), xhat)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float64)
  mu = x.mean(axis=axes, keepdims=True)
  var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
  xhat = (x - mu) / np.sqrt(var + eps)
  y = np.asarray(gamma, np.float64) * xhat + np.asarray(beta, np.float64)
  return y, mu.squeeze(axes), var.squeeze(axes), xhat


def train_few_steps(model, x, labels, *, steps: int = 3, learning_rate: float = 0.05,
                    variables=None, **apply_kwargs):
  """Trains a Flax classifier on one fixed batch for a few plain gradient steps (train
  mode, batch statistics updated, dropout rng given); returns (losses before each step,
  final variables). On a fixed batch with a small step the loss must fall: a network
  that only builds, or whose gradients are wrong, does not pass that.

  `variables` (e.g. filled in with NumPy) replaces `model.init`, whose random
  initialisers can cost more to compile than the training step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  if variables is None:
    variables = model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
                           x, train=False, **apply_kwargs)
  params, state = variables['params'], {k: v for k, v in variables.items() if k != 'params'}

  @jax.jit
  def step(params, state):
    def loss_fn(params):
      logits, new_state = model.apply({'params': params, **state}, x, train=True,
                                      mutable=list(state), rngs={'dropout': jax.random.PRNGKey(2)},
                                      **apply_kwargs)
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels).mean()
      return loss, new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads)
    return params, dict(new_state), loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses, {'params': params, **state}


def normalizer_train_steps(module, xs, *, variables=None, cotangent_seed=None):
  """Applies a normalization layer in training mode to each batch of `xs` in turn,
  carrying its batch statistics from one batch to the next, in one compiled step.

  Args:
    module: a Flax normalization layer taking `use_running_average`.
    xs: the batches (arrays of one shape).
    variables: its starting variables; default `module.init` with key 0.
    cotangent_seed: with a seed, each step also differentiates sum(y * w) for a fixed
      N(0, 1) array w of the batches' shape (NumPy, that seed).

  Returns:
    (params, outputs, final batch_stats): outputs holds each step's y, or with
    `cotangent_seed` each step's (y, (gradient wrt params, gradient wrt x)).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if variables is None:
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(xs[0]), use_running_average=True)
  params, stats = variables['params'], variables['batch_stats']

  def apply(params, stats, x):
    y, updates = module.apply({'params': params, 'batch_stats': stats}, x,
                              use_running_average=False, mutable=['batch_stats'])
    return y, updates['batch_stats']

  if cotangent_seed is None:
    step = jax.jit(apply)
  else:
    w = jnp.asarray(np.random.default_rng(cotangent_seed).normal(size=np.shape(xs[0])),
                    jnp.float32)

    @jax.jit
    def step(params, stats, x):
      def loss(params, x):
        y, new_stats = apply(params, stats, x)
        return jnp.sum(y * w), (y, new_stats)
      (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
          params, x)
      return (y, grads), new_stats

  outputs = []
  for x in xs:
    out, stats = step(params, stats, jnp.asarray(x))
    outputs.append(out)
  return params, outputs, stats


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
  """Within the block, the names of the functions JAX hands to XLA to compile (one entry
  per executable requested, whether XLA builds it or the persistent cache supplies it);
  the list is filled in as the block runs."""
  import jax  # pylint: disable=g-import-not-at-top
  names: list[str] = []

  def listener(event: str, duration: float, **kwargs) -> None:
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(str(kwargs.get('fun_name', '?')))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def write_run(path, rows: list[dict], status: str = 'done') -> None:
  """A hand-made finished run directory: metrics.jsonl from `rows` and a status."""
  os.makedirs(path)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  with open(os.path.join(path, 'status.json'), 'w') as f:
    json.dump({'status': status}, f)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def flat(config) -> dict:
  """A ConfigDict as {'dotted.key': value}."""
  from bn_research import rundir
  return rundir.flatten(rundir.config_to_dict(config))
