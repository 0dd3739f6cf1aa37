"""Optimizer from config: SGD / momentum, exponential decay, the paper's L2 regularisation."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt: Any) -> optax.Schedule:
  """lr_t = learning_rate * decay_rate ** (t / decay_steps) (t // decay_steps if staircase).

  `learning_rate` and `decay_rate` may be traced (a member sweep's per-member values);
  a Python decay_rate of 1 gives a constant schedule. A traced decay_rate of 1 gives
  lr * 1.0 ** x, which is lr exactly, so a member equals its separate run.
  """
  lr, rate, steps = opt.learning_rate, opt.decay_rate, opt.decay_steps
  if isinstance(rate, numbers.Real) and rate == 1.0:
    return optax.constant_schedule(lr)

  def schedule(count):
    exponent = count / steps
    if opt.staircase:
      exponent = jnp.floor(exponent)
    return lr * jnp.power(rate, exponent)
  return schedule


def _key_path(path) -> tuple:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def weight_decay_mask(params: Any, batch_stats: Any, regularize_batch_norm: bool) -> Any:
  """True for the parameters L2 applies to: kernels (ndim > 1), and BN's gamma/beta if asked.

  A parameter belongs to a BN layer when its module also owns `batch_stats`, whatever
  the module is called. Layer biases are not regularised (as in TF-slim's recipe).
  """
  bn_modules = {_key_path(path)[:-1] for path, _ in
                jax.tree_util.tree_flatten_with_path(batch_stats or {})[0]}

  def is_regularised(path, leaf):
    if _key_path(path)[:-1] in bn_modules:
      return regularize_batch_norm
    return leaf.ndim > 1
  return jax.tree_util.tree_map_with_path(is_regularised, params)


def make_optimizer(opt: Any, params: Any,
                   batch_stats: Any = None) -> optax.GradientTransformation:
  """The configured optimizer. L2 enters as wd * W added to the gradient before momentum,

  which is exactly the gradient of wd/2 * ||W||^2 added to the loss (coupled L2, not
  decoupled weight decay).

  Args:
    opt: the `optimizer` part of a config (learning_rate, momentum, weight_decay and
      decay_rate may be traced values: `engine.state.overlay`).
    params, batch_stats: the model's initial variables (they decide the L2 mask).
  """
  schedule = learning_rate_schedule(opt)
  parts = []
  if not (isinstance(opt.weight_decay, numbers.Real) and opt.weight_decay == 0):
    parts.append(optax.add_decayed_weights(
        opt.weight_decay,
        mask=weight_decay_mask(params, batch_stats, opt.regularize_batch_norm)))
  if opt.name == 'momentum':
    parts.append(optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  else:
    parts.append(optax.sgd(schedule))
  return optax.chain(*parts)
