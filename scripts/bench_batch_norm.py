"""Times a training step of our BatchNorm against flax.linen.BatchNorm.

One timed step is the jitted forward + backward pass of a training-mode BatchNorm:
`jax.grad` of sum(y * cotangent) with respect to the input x and the params (scale,
bias), plus the moving-average update of `batch_stats` that each module makes in
training mode. Both modules use the same momentum and epsilon; ours keeps its default
unbiased running variance (one extra multiply per channel).

The two implementations are timed alternately (ours, flax, ours, flax, ...) so that
load from other processes hits both alike, and the median over `--repeats` samples is
reported. Each sample runs the step `n` times back to back, with `n` chosen during
warm-up so a sample lasts at least `--min_sample_ms`.

Usage:
  python scripts/bench_batch_norm.py --repeats 30
  python scripts/bench_batch_norm.py --shapes dense_60x100,conv_32x28x28x192
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

# Runnable as `python scripts/bench_batch_norm.py` from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_research.normalization import BatchNorm

SHAPES: Dict[str, Tuple[int, ...]] = {
    'dense_60x100': (60, 100),
    'dense_256x4096': (256, 4096),
    'conv_32x28x28x192': (32, 28, 28, 192),
    'conv_128x14x14x576': (128, 14, 14, 576),
}

MOMENTUM = 0.99
EPSILON = 1e-5


def make_step(module: nn.Module, x: jax.Array) -> Tuple[Callable, tuple]:
  """Returns a jitted training step and its arguments for `module` on input `x`."""
  variables = module.init(jax.random.PRNGKey(0), x, use_running_average=True)
  params, batch_stats = variables['params'], variables['batch_stats']
  cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)

  def step(params, batch_stats, x, cotangent):
    def loss(x, params):
      y, updates = module.apply(
          {'params': params, 'batch_stats': batch_stats}, x,
          use_running_average=False, mutable=['batch_stats'])
      return jnp.sum(y * cotangent), updates['batch_stats']

    grads, new_stats = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return grads, new_stats

  return jax.jit(step), (params, batch_stats, x, cotangent)


def run_once(step: Callable, args: tuple, n: int) -> float:
  """Seconds per step, averaged over n back-to-back calls."""
  start = time.perf_counter()
  out = None
  for _ in range(n):
    out = step(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / n


def bench_shape(shape: Tuple[int, ...], repeats: int, min_sample_ms: float
                ) -> Tuple[float, float]:
  x = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32) * 2.0 + 0.5
  ours = make_step(BatchNorm(momentum=MOMENTUM, epsilon=EPSILON), x)
  flax_bn = make_step(nn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON), x)
  impls = [ours, flax_bn]

  # Warm-up: compile, then pick n so that one sample lasts >= min_sample_ms.
  for step, args in impls:
    jax.block_until_ready(step(*args))
  per_step = max(min(run_once(step, args, 3) for _ in range(2)) for step, args in impls)
  n = max(1, int(min_sample_ms / 1e3 / max(per_step, 1e-7)) + 1)
  for step, args in impls:
    run_once(step, args, n)

  samples: List[List[float]] = [[], []]
  for r in range(repeats):
    order = (0, 1) if r % 2 == 0 else (1, 0)
    for i in order:
      step, args = impls[i]
      samples[i].append(run_once(step, args, n))
  return statistics.median(samples[0]), statistics.median(samples[1])


def main(argv: List[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=20,
                      help='timed samples per implementation and shape')
  parser.add_argument('--shapes', default=','.join(SHAPES),
                      help=f'comma-separated subset of: {", ".join(SHAPES)}')
  parser.add_argument('--min_sample_ms', type=float, default=20.0,
                      help='minimum duration of one timed sample')
  parser.add_argument('--max_ratio', type=float, default=None,
                      help='exit with status 1 if any ours/flax ratio exceeds this')
  args = parser.parse_args(argv)

  names = [s.strip() for s in args.shapes.split(',') if s.strip()]
  unknown = [s for s in names if s not in SHAPES]
  if unknown:
    parser.error(f'unknown shape(s) {unknown}; choose from {list(SHAPES)}')
  if args.repeats < 1:
    parser.error(f'--repeats={args.repeats} must be >= 1')

  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'float32, repeats={args.repeats}, median per step')
  header = f'{"shape":<22} {"ours (ms)":>10} {"flax (ms)":>10} {"ours/flax":>10}'
  print(header)
  print('-' * len(header))
  worst = 0.0
  for name in names:
    ours, theirs = bench_shape(SHAPES[name], args.repeats, args.min_sample_ms)
    ratio = ours / theirs
    worst = max(worst, ratio)
    print(f'{name:<22} {ours * 1e3:>10.3f} {theirs * 1e3:>10.3f} {ratio:>10.3f}',
          flush=True)
  if args.max_ratio is not None and worst > args.max_ratio:
    print(f'FAIL: worst ratio {worst:.3f} > {args.max_ratio}')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
