"""Shared test utilities: small configs and running code in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def run_python(code: str, *, devices: int = 1, env: dict | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs code in a new interpreter (e.g. with several forced CPU devices)."""
  full_env = dict(os.environ)
  full_env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  full_env['PYTHONPATH'] = REPO + os.pathsep + full_env.get('PYTHONPATH', '')
  full_env.update(env or {})
  return subprocess.run([sys.executable, '-c', code], env=full_env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def run_main(args: list[str], *, env: dict | None = None, devices: int = 1,
             timeout: int = 300) -> subprocess.CompletedProcess:
  full_env = dict(os.environ)
  full_env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  full_env['PYTHONPATH'] = REPO + os.pathsep + full_env.get('PYTHONPATH', '')
  full_env.update(env or {})
  return subprocess.run([sys.executable, '-m', 'bn_research.main', *args], env=full_env,
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def run_module(module: str, args: list[str], *, env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs `python -m module args` from the repository root."""
  full_env = dict(os.environ)
  full_env['PYTHONPATH'] = REPO + os.pathsep + full_env.get('PYTHONPATH', '')
  full_env.update(env or {})
  return subprocess.run([sys.executable, '-m', module, *args], env=full_env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def flat(config) -> dict:
  """A ConfigDict as {'dotted.key': value}."""
  from bn_research import rundir
  return rundir.flatten(rundir.config_to_dict(config))
