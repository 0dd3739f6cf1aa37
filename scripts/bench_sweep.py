r"""Throughput of K vmapped settings vs the same K settings trained one after another.

    python -m scripts.bench_sweep [--k=8] [--steps=2000] [--normalizer=batch_norm]
        [--end_to_end]

Both sides train the MNIST MLP of `configs/mnist_mlp.py` (3 x 100 sigmoid, batch 60,
500 steps per dispatch) on synthetic 28x28 data, K learning rates log-spaced in
[0.01, 1], `--steps` steps each, so both do K * steps member-steps:

* sequential: per setting, the engine's own program (`train.make_train_step` with that
  setting's optimizer, `make_chunk_fn`, jit with the state donated), compiled and run
  as `train_and_evaluate` runs it, one setting after the other;
* vmapped: `vmap_sweep.build_program`, one program for all K.

Compile time (jit lowering + XLA compilation of the chunk program, plus the
init program) is timed apart from the training loop; steps/s count member-steps
(K * steps / loop seconds). Evaluation, checkpoints and files are left out: that is
what `--end_to_end` adds, timing `vmap_sweep.train_members` against K calls of
`train.train_and_evaluate` (everything included, wall clock) in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

_K = flags.DEFINE_integer('k', 8, 'Number of settings (learning rates).')
_STEPS = flags.DEFINE_integer('steps', 2000, 'Training steps per setting.')
_NORMALIZER = flags.DEFINE_enum('normalizer', 'batch_norm', ['batch_norm', 'none'],
                                'The MLP with BN (batch_norm) or the baseline (none).')
_END_TO_END = flags.DEFINE_bool(
    'end_to_end', False, 'Also time whole runs (eval, checkpoints, files included).')


def bench_config(steps: int, normalizer: str):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import mnist_mlp
  c = mnist_mlp.get_config(('bn' if normalizer == 'batch_norm' else 'baseline')
                           + f',source=synthetic,steps={steps}')
  c.probe.enabled = False
  return c


def learning_rates(k: int) -> list[float]:
  import numpy as np
  return [float(f'{x:.3g}') for x in np.geomspace(0.01, 1.0, k)]


def _run_chunks(compiled, state, resident, chunks, block):
  for chunk in chunks:
    state, metrics, finite = compiled(state, resident, chunk)
  block(metrics)
  return state


def bench_sequential(config, lrs: Sequence[float], ds) -> dict:
  """The engine's program, compiled and run once per setting."""
  import jax
  from bn_research import inputs as inputs_lib
  from bn_research import models, train
  from bn_research import vmap_sweep

  source = inputs_lib.InMemoryInput(ds.train_images, ds.train_labels,
                                    batch_size=config.batch_size, seed=config.seed)
  resident = jax.device_put(source.resident)
  n = config.steps_per_dispatch
  chunks = [source.chunk(s, n) for s in range(0, config.num_train_steps, n)]
  compile_s = run_s = 0.0
  for lr in lrs:
    c = vmap_sweep.member_config(config, {'optimizer.learning_rate': lr})
    model = models.build_model(c.model, num_classes=ds.num_classes)
    t = time.perf_counter()
    state, tx, schedule = train.create_train_state(model, c, ds.train_images[:2])
    run_chunk = train.make_chunk_fn(train.make_train_step(model, tx, schedule, axis_name=None),
                                    source.materialize)
    compiled = jax.jit(run_chunk, donate_argnums=(0,)).lower(
        state, resident, chunks[0]).compile()
    jax.block_until_ready(state)
    compile_s += time.perf_counter() - t
    t = time.perf_counter()
    _run_chunks(compiled, state, resident, chunks, jax.block_until_ready)
    run_s += time.perf_counter() - t
  return {'compile_s': compile_s, 'run_s': run_s}


def bench_vmapped(config, lrs: Sequence[float], ds) -> dict:
  """One program for all K settings."""
  import jax
  from bn_research import inputs as inputs_lib
  from bn_research import vmap_sweep

  source = inputs_lib.InMemoryInput(ds.train_images, ds.train_labels,
                                    batch_size=config.batch_size, seed=config.seed)
  resident = jax.device_put(source.resident)
  n = config.steps_per_dispatch
  chunks = [source.chunk(s, n) for s in range(0, config.num_train_steps, n)]
  k = len(lrs)
  t = time.perf_counter()
  program = vmap_sweep.build_program(config, ds.num_classes, ds.train_images[:2],
                                     shared_data=True)
  state = program.init([config.seed] * k, [config.model.init_stddev] * k, lrs)
  compiled = program.run_chunk.lower(state, resident, chunks[0]).compile()
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  _run_chunks(compiled, state, resident, chunks, jax.block_until_ready)
  return {'compile_s': compile_s, 'run_s': time.perf_counter() - t}


def bench_end_to_end(config, lrs: Sequence[float]) -> dict:
  """Whole runs, files and all: K x train_and_evaluate vs one train_members."""
  from absl import logging
  from bn_research import train, vmap_sweep
  logging.set_verbosity(logging.WARNING)
  root = tempfile.mkdtemp(prefix='bench_sweep_')
  try:
    t = time.perf_counter()
    for i, lr in enumerate(lrs):
      train.train_and_evaluate(vmap_sweep.member_config(config, {'optimizer.learning_rate': lr}),
                               os.path.join(root, f'seq_{i}'))
    sequential = time.perf_counter() - t
    os.makedirs(os.path.join(root, 'vmap'))
    t = time.perf_counter()
    vmap_sweep.train_members(config, [(os.path.join(root, 'vmap', f'{i}'),
                                       {'optimizer.learning_rate': lr})
                                      for i, lr in enumerate(lrs)])
    vmapped = time.perf_counter() - t
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return {'sequential_s': sequential, 'vmapped_s': vmapped}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  import jax
  from bn_research import data as data_lib
  k, steps = _K.value, _STEPS.value
  config = bench_config(steps, _NORMALIZER.value)
  lrs = learning_rates(k)
  ds = data_lib.load_dataset(config.data)
  total = k * steps
  print(f'MNIST MLP {tuple(config.model.hidden_sizes)} {config.model.activation}, '
        f'normalizer={config.model.normalizer}, batch {config.batch_size}, synthetic '
        f'{ds.train_images.shape[1]}x{ds.train_images.shape[2]} data, '
        f'{config.steps_per_dispatch} steps/dispatch; K={k} learning rates {lrs}; '
        f'{steps} steps each ({total} member-steps per side); {jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPUs', flush=True)
  seq = bench_sequential(config, lrs, ds)
  vm = bench_vmapped(config, lrs, ds)
  print(f'{"":12s} {"compile s":>10s} {"train s":>9s} {"member-steps/s":>15s} '
        f'{"total s":>8s}')
  for name, r in (('sequential', seq), ('vmapped', vm)):
    print(f'{name:12s} {r["compile_s"]:10.2f} {r["run_s"]:9.2f} '
          f'{total / r["run_s"]:15.0f} {r["compile_s"] + r["run_s"]:8.2f}')
  print(f'speed-up: {seq["run_s"] / vm["run_s"]:.2f}x training steps/s, '
        f'{seq["compile_s"] / vm["compile_s"]:.2f}x compile, '
        f'{(seq["compile_s"] + seq["run_s"]) / (vm["compile_s"] + vm["run_s"]):.2f}x '
        'compile + train')
  if _END_TO_END.value:
    e2e = bench_end_to_end(config, lrs)
    print(f'end to end (eval every {config.eval_every_steps}, checkpoints, files): '
          f'sequential {e2e["sequential_s"]:.1f} s, vmapped {e2e["vmapped_s"]:.1f} s, '
          f'speed-up {e2e["sequential_s"] / e2e["vmapped_s"]:.2f}x')


if __name__ == '__main__':
  app.run(main)
