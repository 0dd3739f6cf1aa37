"""The normalizers BN is compared with, as pure functions: batch renorm (Ioffe 2017),
group and layer norm (Wu & He 2018; Ba et al. 2016), noisy BN (Santurkar et al. 2018)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bn_research.normalization.functional import (_canonical_axes, _check_epsilon, _expand,
                                                   _moments, _stat_dtype, batch_moments,
                                                   batch_norm)

Array = jax.Array


# ----------------------------------------------------------------------------------
# Batch Renormalization (Ioffe 2017).


@dataclasses.dataclass(frozen=True)
class RenormSchedule:
  """How batch renorm's clipping limits relax over training.

  r_max(t) = 1 + (r_max - 1) * ramp(t) and d_max(t) = d_max * ramp(t), with
  ramp(t) = clip((t - start_step) / ramp_steps, 0, 1) (a step from 0 to 1 at
  start_step when ramp_steps is 0). Before start_step batch renorm is exactly BN.
  Ioffe (2017) kept r_max = 1, d_max = 0 for 5,000 steps, then relaxed them to reach
  r_max = 3 at 40k steps and d_max = 5 at 25k steps; one ramp serves both here.

  Attributes:
    r_max: final limit on r = sigma_B / sigma, >= 1.
    d_max: final limit on |d| = |mu_B - mu| / sigma, >= 0.
    start_step: training steps of plain BN before the limits start to relax.
    ramp_steps: steps over which they relax linearly to their final values.
  """
  r_max: float = 3.0
  d_max: float = 5.0
  start_step: int = 5000
  ramp_steps: int = 20000

  def __post_init__(self):
    if not self.r_max >= 1.0:
      raise ValueError(f'r_max={self.r_max!r} must be >= 1 (r is clipped to [1/r_max, r_max]).')
    if not self.d_max >= 0.0:
      raise ValueError(f'd_max={self.d_max!r} must be >= 0 (d is clipped to [-d_max, d_max]).')
    if self.start_step < 0 or self.ramp_steps < 0:
      raise ValueError(f'start_step={self.start_step!r} and ramp_steps={self.ramp_steps!r} '
                       'must be >= 0.')

  def limits(self, step: Any) -> Tuple[Array, Array]:
    """(r_max, d_max) in force at training step `step` (an int or a traced scalar)."""
    step = jnp.asarray(step, jnp.float32)
    if self.ramp_steps:
      ramp = jnp.clip((step - self.start_step) / self.ramp_steps, 0.0, 1.0)
    else:
      ramp = (step >= self.start_step).astype(jnp.float32)
    return 1.0 + (self.r_max - 1.0) * ramp, self.d_max * ramp


def renorm_correction(batch_mean: Array, batch_var: Array, mean: Array, var: Array, *,
                      epsilon: float, r_max: Any, d_max: Any) -> Tuple[Array, Array]:
  """Batch renorm's r and d (Ioffe 2017, Algorithm 1), held constant in backprop.

      r = clip(sigma_B / sigma, 1/r_max, r_max)
      d = clip((mu_B - mu) / sigma, -d_max, d_max)

  with sigma_B = sqrt(var_B + eps) and sigma = sqrt(var + eps), mu and var the moving
  averages. Gradients do not flow through r and d (stop_gradient), which is what makes
  the layer's backward pass BN's own, scaled by r.
  """
  inv_sigma = jax.lax.rsqrt(var + epsilon)
  r = jnp.clip(jnp.sqrt(batch_var + epsilon) * inv_sigma, 1.0 / r_max, r_max)
  d = jnp.clip((batch_mean - mean) * inv_sigma, -d_max, d_max)
  return jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)


def batch_renorm(
    x: Array,
    scale: Optional[Array],
    bias: Optional[Array],
    mean: Array,
    var: Array,
    *,
    axes: Sequence[int],
    epsilon: float,
    r_max: Any,
    d_max: Any,
    axis_name: Optional[str] = None,
) -> Tuple[Array, Array, Array]:
  """Batch Renormalization (Ioffe 2017) in training mode.

      xhat_i = (x_i - mu_B) / sigma_B * r + d
      y_i    = gamma * xhat_i + beta

  computed as Algorithm 1 with gamma' = gamma * r and beta' = beta + gamma * d, so that
  r = 1, d = 0 (r_max = 1, d_max = 0) is BN bit for bit, values and gradients.

  Args:
    x, scale, bias, axes, epsilon, axis_name: as for `batch_norm`.
    mean, var: the moving averages mu and sigma^2 (shaped like the statistics, or
      broadcastable to them, e.g. per feature when the statistics are per ghost batch).
    r_max, d_max: the clipping limits now (see `RenormSchedule`).

  Returns:
    (y, mean_B, var_B) as for `batch_norm`.
  """
  axes = _canonical_axes(x.ndim, axes)
  batch_mean, batch_var = batch_moments(x, axes=axes, axis_name=axis_name)
  r, d = renorm_correction(batch_mean, batch_var, mean, var, epsilon=epsilon,
                           r_max=r_max, d_max=d_max)
  gamma = jnp.ones((), r.dtype) if scale is None else scale
  beta = jnp.zeros((), r.dtype) if bias is None else bias
  return batch_norm(x, gamma * r, beta + gamma * d, axes=axes, epsilon=epsilon,
                    axis_name=axis_name)


# ----------------------------------------------------------------------------------
# Group and layer normalization (Wu & He 2018; Ba et al. 2016).


def group_norm(
    x: Array,
    scale: Optional[Array],
    bias: Optional[Array],
    *,
    num_groups: int,
    epsilon: float,
) -> Array:
  """Group Normalization: statistics per example over each group of channels.

  The channels (last axis) are split into `num_groups` groups of consecutive channels;
  each example's group is normalized over its spatial positions and its channels,
  (H, W, C/G) for NHWC activations or the group's C/G units for dense ones. Then
  y = gamma * xhat + beta per channel. One group is layer norm over (H, W, C); one
  group per channel is instance norm. The batch plays no part, so training and
  inference compute the same thing.

  Args:
    x: activations (batch, ..., channels).
    scale, bias: gamma and beta per channel, or None for 1 and 0.
    num_groups: G, a divisor of the channel count.
    epsilon: > 0, added to each group's variance.

  Returns:
    y, x's shape and dtype.
  """
  _check_epsilon(epsilon)
  channels = x.shape[-1]
  if x.ndim < 2:
    raise ValueError(f'group_norm needs (batch, ..., channels) input, got shape {x.shape}.')
  if not (isinstance(num_groups, (int, np.integer)) and num_groups >= 1
          and channels % num_groups == 0):
    raise ValueError(f'num_groups={num_groups!r} must be a positive divisor of the '
                     f'{channels} channels.')
  xg = x.astype(_stat_dtype(x.dtype)).reshape(
      x.shape[:-1] + (num_groups, channels // num_groups))
  axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)  # all but example and group
  mean, var = _moments(xg, axes, None)
  xhat = (xg - _expand(mean, xg, axes)) * _expand(jax.lax.rsqrt(var + epsilon), xg, axes)
  y = xhat.reshape(x.shape)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


def layer_norm(x: Array, scale: Optional[Array], bias: Optional[Array], *,
               epsilon: float) -> Array:
  """Layer Normalization: statistics per example over all its activations (H, W, C).

  Group norm with one group, as Wu & He (2018) define layer norm for convolutions;
  gamma and beta are per channel.
  """
  return group_norm(x, scale, bias, num_groups=1, epsilon=epsilon)


# ----------------------------------------------------------------------------------
# Noisy BN (Santurkar et al. 2018, Section 2.1).


def sample_distortion(key: Array, features: int, strength: float) -> Tuple[Array, Array]:
  """A random per-unit affine distortion (s, b) for one training step.

  s ~ U(1, 1 + strength) and b ~ U(-strength, strength), independently per unit: after
  y -> y * s + b a normalized unit's batch mean is b (non-zero) and its variance s^2
  (above one), and both change with every key, that is every step.
  """
  k_scale, k_shift = jax.random.split(key)
  s = jax.random.uniform(k_scale, (features,), jnp.float32, 1.0, 1.0 + strength)
  b = jax.random.uniform(k_shift, (features,), jnp.float32, -strength, strength)
  return s, b


def noisy_affine(y: Array, key: Array, strength: float) -> Array:
  """y * s + b with (s, b) from `sample_distortion`, per unit (last axis).

  The distortion is noise: it carries no gradient to the key and is not learned.
  strength = 0 is the identity.
  """
  if not strength >= 0:
    raise ValueError(f'noise strength={strength!r} must be >= 0.')
  s, b = sample_distortion(key, y.shape[-1], strength)
  return (y * s.astype(y.dtype) + b.astype(y.dtype)).astype(y.dtype)

