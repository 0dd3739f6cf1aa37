"""Models by name: `build_model(config.model, ...)` is all the engine needs."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

MODELS = ('mlp', 'inception', 'small_cnn')


def validate_model_config(m: ml_collections.ConfigDict) -> None:
  """Model-specific checks; raises ValueError naming the bad value."""
  from bn_research.models import mlp
  if m.name == 'mlp':
    if m.activation not in mlp.ACTIVATIONS:
      raise ValueError(f'model.activation={m.activation!r}; allowed: '
                       f'{", ".join(mlp.ACTIVATIONS)}.')
    if not m.hidden_sizes or any(int(h) <= 0 for h in m.hidden_sizes):
      raise ValueError(f'model.hidden_sizes={tuple(m.hidden_sizes)!r} must be positive widths.')
    if not m.init_stddev > 0:
      raise ValueError(f'model.init_stddev={m.init_stddev!r} must be > 0.')
  elif m.name == 'small_cnn':
    if m.activation not in mlp.ACTIVATIONS:
      raise ValueError(f'model.activation={m.activation!r}; allowed: '
                       f'{", ".join(mlp.ACTIVATIONS)}.')
    for key in ('conv_features', 'hidden_sizes'):
      if any(int(h) <= 0 for h in m[key]):
        raise ValueError(f'model.{key}={tuple(m[key])!r} must be positive widths.')
  elif m.name == 'inception':
    if m.activation not in ('relu', 'sigmoid'):
      raise ValueError(f'model.activation={m.activation!r}; allowed for inception: relu, sigmoid.')
    if m.stem_stride not in (1, 2):
      raise ValueError(f'model.stem_stride={m.stem_stride!r}; allowed: 1, 2.')
    if not m.width_multiplier > 0:
      raise ValueError(f'model.width_multiplier={m.width_multiplier!r} must be > 0.')


def build_model(m: ml_collections.ConfigDict, *, num_classes: int,
                axis_name: Optional[str] = None) -> nn.Module:
  """Builds the configured model.

  Args:
    m: the `model` part of a config.
    num_classes: size of the output layer.
    axis_name: pmap axis that BN pools its statistics over (None under jit, where
      statistics are over the global batch anyway).
  """
  dtype = jnp.dtype(m.dtype)
  bn_kwargs = dict(momentum=m.bn_momentum, epsilon=m.bn_epsilon, axis_name=axis_name,
                   virtual_batch_size=m.virtual_batch_size or None,
                   unbiased_running_var=m.unbiased_running_var)
  if m.name == 'mlp':
    from bn_research.models.mlp import MLP
    return MLP(hidden_sizes=tuple(int(h) for h in m.hidden_sizes), num_classes=num_classes,
               activation=m.activation, normalizer=m.normalizer,
               init_stddev=m.init_stddev, bn_kwargs=bn_kwargs,
               dropout_rate=m.dropout_rate, dtype=dtype)
  if m.name == 'small_cnn':
    from bn_research.models.small_cnn import SmallCNN
    return SmallCNN(conv_features=tuple(int(f) for f in m.conv_features),
                    hidden_sizes=tuple(int(h) for h in m.hidden_sizes),
                    num_classes=num_classes, activation=m.activation,
                    normalizer=m.normalizer, bn_kwargs=bn_kwargs,
                    dropout_rate=m.dropout_rate, dtype=dtype)
  if m.name == 'inception':
    from bn_research.models.inception import Inception
    return Inception(num_classes=num_classes, normalizer=m.normalizer,
                     activation=m.activation, dropout_rate=m.dropout_rate,
                     use_lrn=m.use_lrn, width_multiplier=m.width_multiplier,
                     small_inputs=m.small_inputs, bn_momentum=m.bn_momentum,
                     bn_epsilon=m.bn_epsilon, axis_name=axis_name,
                     virtual_batch_size=m.virtual_batch_size or None, dtype=dtype,
                     unbiased_running_var=m.unbiased_running_var,
                     stem_stride=m.stem_stride)
  raise ValueError(f'model.name={m.name!r}; allowed: {", ".join(MODELS)}.')
