"""Training-step throughput of the BN-Inception model (Experiment 4.2) on one device.

One step is the jitted forward and backward pass of the full model on a batch of random
images, softmax cross-entropy against random labels, and an SGD-with-momentum update
(plus the moving-average update of `batch_stats` under BN), with the training state
donated. Parameters are float32; `--dtype=bfloat16` computes convolutions, BN outputs
and the classifier in bfloat16 (BN statistics stay float32).

Compilation is timed on its own (`jit(...).lower(...).compile()`); the step time is the
median over `--steps` timed steps after `--warmup` untimed ones, each step waited on
with `block_until_ready`. The same script runs on CPU, GPU or TPU unchanged.

Usage:
  python scripts/bench_inception.py --batch_size=4 --steps=3            # CPU smoke run
  python scripts/bench_inception.py --batch_size=128 --dtype=bfloat16   # accelerator
  python scripts/bench_inception.py --normalizer=none --batch_size=32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, Tuple

# Runnable as `python scripts/bench_inception.py` from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_research.models.inception import Inception, count_params

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch_size', type=int, default=32,
                 help='images per step (the paper trains with 32).')
  p.add_argument('--steps', type=int, default=20, help='timed steps (median reported).')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling.')
  p.add_argument('--dtype', choices=sorted(DTYPES), default='float32',
                 help='computation dtype; parameters are always float32.')
  p.add_argument('--normalizer', default='batch_norm',
                 choices=['batch_norm', 'virtual_batch_norm', 'none'])
  p.add_argument('--virtual_batch_size', type=int, default=None)
  p.add_argument('--activation', default='relu', choices=['relu', 'sigmoid'])
  p.add_argument('--dropout_rate', type=float, default=0.0)
  p.add_argument('--use_lrn', action='store_true')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--width_multiplier', type=float, default=1.0)
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--learning_rate', type=float, default=0.045,
                 help="BN-x30's initial rate; irrelevant to the timing.")
  p.add_argument('--momentum', type=float, default=0.9)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  for name in ('batch_size', 'steps'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1, got {getattr(args, name)}.')
  if args.warmup < 0:
    p.error(f'--warmup must be >= 0, got {args.warmup}.')
  return args


def build(args: argparse.Namespace) -> Tuple[Inception, Any, Any, optax.GradientTransformation]:
  """The model, its initial variables, a random batch, and the optimizer."""
  model = Inception(
      num_classes=args.num_classes, normalizer=args.normalizer,
      activation=args.activation, dropout_rate=args.dropout_rate,
      use_lrn=args.use_lrn, width_multiplier=args.width_multiplier,
      virtual_batch_size=args.virtual_batch_size, dtype=DTYPES[args.dtype])
  rng = np.random.default_rng(args.seed)
  images = jnp.asarray(
      rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)),
      jnp.float32)
  labels = jnp.asarray(rng.integers(0, args.num_classes, size=args.batch_size), jnp.int32)
  # Start-up on CPU is dominated by compiling the initialisers, so: an 'rbg' key
  # (threefry's bit generator compiles slowly on CPU; initial values do not matter to a
  # throughput measurement) and a small dummy image (parameter shapes do not depend on
  # the image size: the classifier follows a global average pool).
  init_key = jax.random.key(args.seed, impl='rbg')
  dummy = jnp.zeros((1, min(args.image_size, 32), min(args.image_size, 32), 3))
  variables = jax.jit(lambda k: model.init(k, dummy, train=False))(init_key)
  tx = optax.sgd(args.learning_rate, momentum=args.momentum)
  return model, variables, (images, labels), tx


def make_train_step(model: Inception, tx: optax.GradientTransformation):
  """A pure (state, images, labels) -> (state, loss) step; state = (params, stats, opt, step)."""
  dropout_key = jax.random.key(1, impl='rbg')

  def train_step(state, images, labels):
    params, batch_stats, opt_state, step = state

    def loss_fn(params):
      variables = {'params': params}
      if batch_stats is not None:
        variables['batch_stats'] = batch_stats
      logits, updates = model.apply(
          variables, images, train=True, mutable=['batch_stats'],
          rngs={'dropout': jax.random.fold_in(dropout_key, step)})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates.get('batch_stats')

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, new_stats, opt_state, step + 1), loss

  return train_step


def run(args: argparse.Namespace) -> Dict[str, Any]:
  device = jax.devices()[0]
  t0 = time.perf_counter()
  model, variables, (images, labels), tx = build(args)
  params = variables['params']
  state = (params, variables.get('batch_stats'), tx.init(params), jnp.zeros((), jnp.int32))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0

  step_fn = jax.jit(make_train_step(model, tx), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, images, labels).compile()
  compile_s = time.perf_counter() - t0

  times = []
  loss = None
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, loss = compiled(state, images, labels)
    jax.block_until_ready((state, loss))
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  loss = float(loss)
  if not np.isfinite(loss):
    raise FloatingPointError(f'loss is {loss} after {args.warmup + args.steps} steps.')

  step_s = statistics.median(times)
  return {
      'device_kind': device.device_kind,
      'platform': device.platform,
      'jax': jax.__version__,
      'batch_size': args.batch_size,
      'image_size': args.image_size,
      'dtype': args.dtype,
      'normalizer': args.normalizer,
      'activation': args.activation,
      'width_multiplier': args.width_multiplier,
      'params': count_params(params),
      'init_s': round(init_s, 3),
      'compile_s': round(compile_s, 3),
      'steps': args.steps,
      'step_s_median': round(step_s, 5),
      'step_s_min': round(min(times), 5),
      'step_s_max': round(max(times), 5),
      'images_per_s': round(args.batch_size / step_s, 2),
      'final_loss': round(loss, 4),
  }


def main(argv=None) -> None:
  args = parse_args(argv)
  r = run(args)
  print(f"device: {r['device_kind']} ({r['platform']}), jax {r['jax']}")
  print(f"model: BN-Inception {r['image_size']}x{r['image_size']}, normalizer="
        f"{r['normalizer']}, {r['activation']}, width x{r['width_multiplier']}, "
        f"{r['params']:,} params, compute {r['dtype']}")
  print(f"init {r['init_s']:.2f} s, compile {r['compile_s']:.2f} s")
  print(f"step (median of {r['steps']}): {r['step_s_median'] * 1e3:.1f} ms "
        f"[min {r['step_s_min'] * 1e3:.1f}, max {r['step_s_max'] * 1e3:.1f}] at batch "
        f"{r['batch_size']}: {r['images_per_s']:.1f} images/s; loss {r['final_loss']}")
  print(json.dumps(r))


if __name__ == '__main__':
  main()
