"""Optimizer from config: SGD / momentum, exponential decay, the paper's L2 regularisation."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
  """lr_t = learning_rate * decay_rate ** (t / decay_steps) (floored if staircase)."""
  if opt.decay_rate == 1.0:
    return optax.constant_schedule(opt.learning_rate)
  return optax.exponential_decay(init_value=opt.learning_rate,
                                 transition_steps=opt.decay_steps,
                                 decay_rate=opt.decay_rate, staircase=opt.staircase)


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


def make_optimizer(opt: ml_collections.ConfigDict, params: Any,
                   batch_stats: Any = None) -> optax.GradientTransformation:
  """The configured optimizer. L2 enters as wd * W added to the gradient before momentum,

  which is exactly the gradient of wd/2 * ||W||^2 added to the loss (coupled L2, not
  decoupled weight decay).

  Args:
    opt: the `optimizer` part of a config.
    params, batch_stats: the model's initial variables (they decide the L2 mask).
  """
  schedule = learning_rate_schedule(opt)
  parts = []
  if opt.weight_decay:
    parts.append(optax.add_decayed_weights(
        opt.weight_decay,
        mask=weight_decay_mask(params, batch_stats, opt.regularize_batch_norm)))
  if opt.name == 'momentum':
    parts.append(optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  else:
    parts.append(optax.sgd(schedule))
  return optax.chain(*parts)
