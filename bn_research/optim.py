"""Optimizer from config: SGD / momentum, exponential decay, the paper's L2 regularisation."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt: Any) -> optax.Schedule:
  """The decayed rate, times a linear warmup over the first `warmup_steps` steps.

      decayed_t = learning_rate * decay_rate ** (t / decay_steps)   (t // decay_steps
                                                                      if staircase)
      lr_t = decayed_t * (f + (1 - f) * min(t, W) / W),   W = warmup_steps, f = warmup_from

  With W = 0 there is no warmup (lr_t = decayed_t). The warmup is Goyal et al. (2017)'s
  "gradual warmup" for linearly scaled large-batch rates: the rate climbs from
  f * learning_rate at step 0 (f = 32 / B starts at the paper's batch-32 rate) to the
  scaled rate at step W, and the decay runs from step 0 all along, as without warmup.

  `learning_rate` and `decay_rate` may be traced (a member sweep's per-member values);
  a Python decay_rate of 1 and no warmup give a constant schedule. A traced decay_rate
  of 1 gives lr * 1.0 ** x, which is lr exactly, so a member equals its separate run.
  """
  lr, rate, steps = opt.learning_rate, opt.decay_rate, opt.decay_steps
  warmup = getattr(opt, 'warmup_steps', 0)
  if isinstance(rate, numbers.Real) and rate == 1.0 and not warmup:
    return optax.constant_schedule(lr)

  def schedule(count):
    value = lr
    if not (isinstance(rate, numbers.Real) and rate == 1.0):
      exponent = count / steps
      if opt.staircase:
        exponent = jnp.floor(exponent)
      value = lr * jnp.power(rate, exponent)
    if warmup:
      start = opt.warmup_from
      value = value * (start + (1.0 - start) * jnp.minimum(count, warmup) / warmup)
    return value
  return schedule


def _key_path(path) -> tuple:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def normalizer_modules(params: Any, batch_stats: Any = None) -> set:
  """Paths of the modules that are normalizers, whatever they are called.

  A module is a normalizer if it owns `batch_stats` (BN, batch renorm, noisy BN) or
  has parameters but no `kernel` (layer and group norm: only gamma `scale` and beta
  `bias`). Dense and convolution layers always have a kernel.
  """
  owners = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = _key_path(path)
    owners.setdefault(path[:-1], set()).add(path[-1])
  with_stats = {_key_path(path)[:-1] for path, _ in
                jax.tree_util.tree_flatten_with_path(batch_stats or {})[0]}
  return {m for m, names in owners.items() if m in with_stats or 'kernel' not in names}


def normalizer_mask(params: Any, batch_stats: Any = None) -> Any:
  """True for the normalizers' gamma and beta, False for every other parameter."""
  modules = normalizer_modules(params, batch_stats)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _key_path(path)[:-1] in modules, params)


def weight_decay_mask(params: Any, batch_stats: Any, regularize_batch_norm: bool) -> Any:
  """True for the parameters L2 applies to: kernels (ndim > 1), and the normalizers'
  gamma/beta if asked (`normalizer_modules` tells which those are).

  Layer biases are not regularised (as in TF-slim's recipe).
  """
  modules = normalizer_modules(params, batch_stats)

  def is_regularised(path, leaf):
    if _key_path(path)[:-1] in modules:
      return regularize_batch_norm
    return leaf.ndim > 1
  return jax.tree_util.tree_map_with_path(is_regularised, params)


def make_optimizer(opt: Any, params: Any,
                   batch_stats: Any = None) -> optax.GradientTransformation:
  """The configured optimizer. L2 enters as wd * W added to the gradient before momentum,

  which is exactly the gradient of wd/2 * ||W||^2 added to the loss (coupled L2, not
  decoupled weight decay).

  With `opt.trainable == 'batch_norm'` only the normalizers' gamma and beta train
  (Frankle et al. 2021): every other parameter gets a zero update, so it stays bitwise
  at its initial value, and the optimizer's state (momentum, L2) exists only for the
  trained parameters (`optax.multi_transform`).

  Args:
    opt: the `optimizer` part of a config (learning_rate, momentum, weight_decay and
      decay_rate may be traced values: `engine.state.overlay`).
    params, batch_stats: the model's initial variables (they decide the L2 and
      trainable masks; only their structure matters).
  """
  schedule = learning_rate_schedule(opt)
  only_normalizers = opt.trainable == 'batch_norm'
  parts = []
  no_weight_decay = isinstance(opt.weight_decay, numbers.Real) and opt.weight_decay == 0
  if not no_weight_decay and not (only_normalizers and not opt.regularize_batch_norm):
    # Training only normalizers, L2 applies to all of them or none (the inner
    # transformation sees only their parameters).
    mask = (None if only_normalizers
            else weight_decay_mask(params, batch_stats, opt.regularize_batch_norm))
    parts.append(optax.add_decayed_weights(opt.weight_decay, mask=mask))
  if opt.name == 'momentum':
    parts.append(optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  else:
    parts.append(optax.sgd(schedule))
  tx = optax.chain(*parts)
  if not only_normalizers:
    return tx
  labels = jax.tree_util.tree_map(lambda trains: 'trained' if trains else 'frozen',
                                  normalizer_mask(params, batch_stats))
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
