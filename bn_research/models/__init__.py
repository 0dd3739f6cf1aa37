"""Models by name: `build_model(config.model, ...)` is all the engine needs."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bn_research import checks
from bn_research import normalization
from bn_research.models import mlp

MODELS = ('mlp', 'inception', 'small_cnn')
DTYPES = ('float32', 'bfloat16', 'float16')

# Every `model.*` key, with what it accepts (see bn_research/checks.py). Inception-only
# keys are checked for every model: a typo is an error even where it is ignored.
MODEL_KEYS = {
    'model.name': checks.Choice(MODELS),
    'model.normalizer': checks.Choice(normalization.NORMALIZERS),
    'model.activation': checks.Choice(tuple(mlp.ACTIVATIONS)),
    'model.hidden_sizes': checks.Ints(1, note='hidden layer widths'),
    'model.init_stddev': checks.Float(0.0, low_open=True),
    'model.dropout_rate': checks.Float(0.0, 1.0, high_open=True),
    'model.bn_momentum': checks.Float(0.0, 1.0),
    'model.bn_epsilon': checks.Float(0.0, low_open=True),
    'model.virtual_batch_size': checks.Int(0, note='0: the whole batch'),
    'model.unbiased_running_var': checks.Bool(),
    'model.bn_cross_replica': checks.Bool(),
    'model.dtype': checks.Choice(DTYPES),
    'model.use_lrn': checks.Bool(),
    'model.width_multiplier': checks.Float(0.0, low_open=True),
    'model.small_inputs': checks.Bool(),
    'model.stem_stride': checks.Int(1, 2),
    'model.conv_features': checks.Ints(1, note='small_cnn conv widths'),
    'model.norm_groups': checks.Int(1, note='group_norm groups'),
    'model.renorm_r_max': checks.Float(1.0),
    'model.renorm_d_max': checks.Float(0.0),
    'model.renorm_start_step': checks.Int(0),
    'model.renorm_ramp_steps': checks.Int(0),
    'model.bn_noise': checks.Float(0.0, low_open=True, note='noisy_batch_norm strength'),
    'model.pre_norm_bias': checks.Bool(),
}


def _validate_normalizer_options(m: ml_collections.ConfigDict, widths: Sequence[int],
                                 where: str) -> None:
  """group_norm's groups must divide every normalized width (`widths`). The keys' own
  types and ranges are MODEL_KEYS' (checked before this)."""
  if m.normalizer != 'group_norm':
    return
  g = m.norm_groups
  bad = sorted({w for w in widths if w % g})
  if bad:
    common = math.gcd(*widths)
    allowed = [d for d in range(1, common + 1) if common % d == 0]
    raise ValueError(f'model.norm_groups={g} does not divide the width {bad[0]} of {where}; '
                     f'allowed: {", ".join(map(str, allowed))}.')


def renorm_schedule(m: ml_collections.ConfigDict
                    ) -> Optional[normalization.RenormSchedule]:
  """Batch renorm's schedule from the model config's renorm_* keys (None unless used)."""
  if m.normalizer != 'batch_renorm':
    return None
  return normalization.RenormSchedule(
      r_max=float(m.renorm_r_max), d_max=float(m.renorm_d_max),
      start_step=int(m.renorm_start_step), ramp_steps=int(m.renorm_ramp_steps))


def validate_model_config(m: ml_collections.ConfigDict) -> None:
  """Checks the `model` part of a config; raises ValueError naming the bad value."""
  checks.check_keys(m, MODEL_KEYS, 'model.')
  from bn_research.models import inception  # pylint: disable=g-import-not-at-top
  if m.name == 'inception' and m.activation not in inception.ACTIVATIONS:
    raise ValueError(f'model.activation={m.activation!r} is invalid: inception allows '
                     f'{", ".join(inception.ACTIVATIONS)}.')
  if m.name == 'mlp':
    _validate_normalizer_options(m, [int(h) for h in m.hidden_sizes], 'a hidden layer')
  elif m.name == 'inception':
    _validate_normalizer_options(m, inception.normalized_widths(m.width_multiplier),
                                 'a convolution (model.width_multiplier='
                                 f'{m.width_multiplier})')


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
                   unbiased_running_var=m.unbiased_running_var,
                   num_groups=m.norm_groups, renorm=renorm_schedule(m), noise=m.bn_noise)
  if m.name == 'mlp':
    from bn_research.models.mlp import MLP
    return MLP(hidden_sizes=tuple(int(h) for h in m.hidden_sizes), num_classes=num_classes,
               activation=m.activation, normalizer=m.normalizer,
               init_stddev=m.init_stddev, bn_kwargs=bn_kwargs,
               dropout_rate=m.dropout_rate, pre_norm_bias=m.pre_norm_bias, dtype=dtype)
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
                     stem_stride=m.stem_stride, norm_groups=m.norm_groups,
                     renorm=renorm_schedule(m), bn_noise=m.bn_noise)
  raise ValueError(f'model.name={m.name!r}; allowed: {", ".join(MODELS)}.')
