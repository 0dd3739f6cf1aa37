"""Batch Normalization as in Ioffe & Szegedy (2015): Algorithms 1 and 2.

The math lives in pure functions (`batch_norm`, `batch_norm_inference`,
`population_statistics`, `fold_batch_norm`); `BatchNorm` is a thin Flax module that
owns the learned `scale` (gamma) and `bias` (beta) in `params` and the moving averages
in the `batch_stats` collection, and calls those functions.

The normalizers BN is compared with follow the same pattern, each selectable by name
through `get_normalizer` (`NORMALIZERS`):

* `batch_renorm` (Ioffe 2017): `batch_renorm` / `BatchRenorm`, BN corrected towards
  the moving averages by r and d, clipped to limits that a `RenormSchedule` relaxes
  over training (the module counts its training steps in `batch_stats`);
* `layer_norm`, `group_norm` (Wu & He 2018): `layer_norm`, `group_norm` /
  `LayerNorm`, `GroupNorm`, statistics per example, the same in training and inference;
* `noisy_batch_norm` (Santurkar et al. 2018): `noisy_affine` / `NoisyBatchNorm`, BN
  followed by a random per-unit affine distortion drawn afresh every training step;
* `stop_gradient_batch_norm` (the paper's Section 2 counter-example):
  `batch_norm_stop_gradient` / `StopGradientBatchNorm`, BN's forward pass with mu_B and
  var_B treated as constants by the gradient.

Conventions
-----------
* Features are on the last axis. Dense activations `(batch, features)` reduce over
  `axes=(0,)`; NHWC convolution activations reduce over `axes=(0, 1, 2)`, so the
  effective mini-batch per channel is m' = m * p * q, as in the paper's Section 3.2.
* `momentum` follows Flax/TF: `new = momentum * old + (1 - momentum) * batch_value`.
  PyTorch's `momentum` is the weight of the *new* value: `torch_momentum = 1 - momentum`
  (PyTorch's default 0.1 is our 0.9). TF-slim's `decay` is our `momentum` unchanged
  (slim's inception_v2 arg scope uses decay 0.9997).
* Moving variances average the *unbiased* batch variance m/(m-1) * var_B by default
  (`unbiased_running_var=True`), because that is what Algorithm 2 estimates
  (Var[x] = m/(m-1) E_B[var_B]) and what PyTorch tracks; Flax's `nn.BatchNorm` averages
  the biased variance. The difference is a factor m/(m-1): 1.017 for the MNIST batch of
  60, negligible for convolutions where m' = m*p*q is large.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NORMALIZERS = ('batch_norm', 'virtual_batch_norm', 'batch_renorm', 'layer_norm',
               'group_norm', 'noisy_batch_norm', 'stop_gradient_batch_norm', 'none')
# The ones that keep moving averages for inference (Algorithm 2's population statistics
# can replace them); layer and group norm normalise each example by itself.
MOVING_AVERAGE_NORMALIZERS = ('batch_norm', 'virtual_batch_norm', 'batch_renorm',
                              'noisy_batch_norm', 'stop_gradient_batch_norm')


def _canonical_axes(ndim: int, axes: Sequence[int]) -> Tuple[int, ...]:
  """Returns sorted non-negative axes, or raises ValueError naming the bad value."""
  if isinstance(axes, int):
    axes = (axes,)
  axes = tuple(axes)
  if not axes:
    raise ValueError('axes must name at least one axis to reduce over, got ().')
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
      raise ValueError(
          f'axes={axes!r}: axis {a!r} is out of range for an input of rank {ndim} '
          f'(allowed: {-ndim}..{ndim - 1}).')
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f'axes={axes!r} names the same axis twice.')
  return tuple(sorted(out))


def _check_epsilon(epsilon: float) -> None:
  if not (isinstance(epsilon, (int, float, np.floating)) and epsilon > 0):
    raise ValueError(f'epsilon={epsilon!r} must be a number > 0 (it keeps '
                     'sqrt(var + epsilon) away from zero for constant inputs).')


def _stat_dtype(dtype: Any) -> Any:
  """Statistics are accumulated in float32, or wider when x is wider."""
  return jnp.promote_types(dtype, jnp.float32)


def _expand(v: Array, x: Array, axes: Tuple[int, ...]) -> Array:
  """Broadcasts per-statistic v (x's shape without `axes`) back to x's shape.

  An explicit broadcast_in_dim of the reduced array (rather than keepdims arrays with
  size-1 axes) keeps the HLO simple for XLA to fuse into the consuming loops.
  """
  kept = tuple(d for d in range(x.ndim) if d not in axes)
  return jax.lax.broadcast_in_dim(v, x.shape, kept)


def _moments(x: Array, axes: Tuple[int, ...], axis_name: Optional[str]
             ) -> Tuple[Array, Array]:
  """Two-pass (mean, biased var) over sorted non-negative `axes`, axes removed.

  var = mean((x - mean)^2), never E[x^2] - E[x]^2: it cannot come out negative and
  keeps its precision when |mean| >> std. (On CPU each moment is one read of x either
  way; XLA does not merge sibling reductions there.)
  """
  mean = jnp.mean(x, axis=axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(x - _expand(mean, x, axes)), axis=axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return mean, var


def batch_moments(
    x: Array,
    *,
    axes: Sequence[int],
    axis_name: Optional[str] = None,
) -> Tuple[Array, Array]:
  """Mini-batch mean mu_B and biased variance var_B over `axes` (Algorithm 1, lines 1-2).

  The variance is computed in two passes, mean((x - mu_B)^2), never as
  E[x^2] - E[x]^2, so it cannot come out negative and does not lose precision when
  |mean| >> std. Statistics are accumulated in float32 (or wider) whatever x's dtype.

  Args:
    x: activations.
    axes: axes to reduce over.
    axis_name: if given, a mapped axis (pmap / shard_map) whose devices' batches are
      pooled, so statistics are over the concatenated batch (equal per-device sizes).

  Returns:
    (mean, var), each of x's shape with `axes` removed.
  """
  axes = _canonical_axes(x.ndim, axes)
  return _moments(x.astype(_stat_dtype(x.dtype)), axes, axis_name)


def _normalize(x: Array, mean: Array, var: Array, scale: Optional[Array],
               bias: Optional[Array], epsilon: float, axes: Tuple[int, ...]) -> Array:
  """y = gamma * (x - mean) / sqrt(var + eps) + beta, as one multiply-add per element."""
  inv_std = jax.lax.rsqrt(var + epsilon)
  mul = inv_std if scale is None else inv_std * scale
  shift = -mean * mul if bias is None else bias - mean * mul
  keep = [d for d in range(x.ndim) if d not in axes]
  shape = [x.shape[d] if d in keep else 1 for d in range(x.ndim)]
  mul = jnp.reshape(mul, shape)
  shift = jnp.reshape(shift, shape)
  y = x.astype(mul.dtype) * mul + shift
  return y.astype(x.dtype)


def _train_output(xf, mean, inv_std, scale, bias, axes):
  """y = gamma * (x - mu) / sqrt(var + eps) + beta as one multiply-add per element.

  x * m + (beta - mu * m) with m = gamma / sqrt(var + eps) is Algorithm 2's form. Its
  rounding error is about float_eps * |mu| / sqrt(var + eps) in units of gamma,
  negligible unless |mean| >> std; it is used (rather than (x - mu) * m + beta) so that
  no x - mu array is shared with the variance reduction, see the JVP rule.
  """
  mul = inv_std * scale
  return xf * _expand(mul, xf, axes) + _expand(bias - mean * mul, xf, axes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _batch_norm_train(x, scale, bias, axes, epsilon, axis_name):
  """Algorithm 1; scale and bias are shaped like the statistics. Returns (y, mean, var)."""
  xf = x.astype(_stat_dtype(x.dtype))
  mean, var = _moments(xf, axes, axis_name)
  y = _train_output(xf, mean, jax.lax.rsqrt(var + epsilon), scale, bias, axes)
  return y.astype(x.dtype), mean, var


@_batch_norm_train.defjvp
def _batch_norm_train_jvp(axes, epsilon, axis_name, primals, tangents):
  """The paper's closed-form derivatives (Section 3), as a JVP.

  With xhat = (x - mu) / sqrt(var + eps), a = mean(dx) and c = mean(xhat * dx),
  Algorithm 1 differentiates to

      d mu   = a
      d var  = 2 mean((x - mu) dx) = 2 sqrt(var + eps) c
      d xhat = (dx - a - xhat c) / sqrt(var + eps)
      d y    = gamma d xhat + d gamma xhat + d beta.

  d y is written as m * dx + (x - mu) * (per-statistic) + (per-statistic), with
  m = gamma / sqrt(var + eps), so that its transpose (the backward pass of jax.grad) is
  the paper's chain rule for dl/dx with two reductions, sum(dl/dy) and
  sum(dl/dy * (x - mu)), which also give dl/dbeta and dl/dgamma. Being a JVP, the rule
  serves forward and reverse mode, at any order.

  Performance note (XLA CPU): a reduction fuses the elementwise work that feeds it
  only if no other consumer shares that work. The variance reduces (x - mu)^2 with
  x - mu spelled x - bcast(mu) (in _moments); the backward reduces
  dl/dy * (x + bcast(-mu)), a different spelling of the same values; the elementwise
  passes use x * bcast(.) + bcast(.). So no full-size temporary is written: x and
  dl/dy are each read once per reduction and once by the final dl/dx pass.
  """
  x, scale, bias = primals
  dx, dscale, dbias = tangents
  dtype = _stat_dtype(x.dtype)
  xf = x.astype(dtype)
  mean, var = _moments(xf, axes, axis_name)
  inv_std = jax.lax.rsqrt(var + epsilon)
  mul = inv_std * scale
  y = _train_output(xf, mean, inv_std, scale, bias, axes)

  dxf = dx.astype(dtype)
  a = jnp.mean(dxf, axis=axes)
  # xhat as x * (1/std) - mu/std: only elementwise consumers after transposition.
  xhat = xf * _expand(inv_std, xf, axes) + _expand(-mean * inv_std, xf, axes)
  c = jnp.mean(xhat * dxf, axis=axes)
  if axis_name is not None:
    a, c = jax.lax.pmean((a, c), axis_name)
  centered = xf + _expand(-mean, xf, axes)
  dy = (_expand(mul, xf, axes) * dxf
        + centered * _expand(inv_std * (dscale - mul * c), xf, axes)
        + _expand(dbias - mul * a, xf, axes))
  dvar = 2.0 * c / inv_std
  return (y.astype(x.dtype), mean, var), (dy.astype(x.dtype), a, dvar)


def batch_norm(
    x: Array,
    scale: Optional[Array],
    bias: Optional[Array],
    *,
    axes: Sequence[int],
    epsilon: float,
    axis_name: Optional[str] = None,
) -> Tuple[Array, Array, Array]:
  """Algorithm 1: the Batch Normalizing Transform, applied over a mini-batch.

      mu_B   = mean_i x_i
      var_B  = mean_i (x_i - mu_B)^2            (biased)
      xhat_i = (x_i - mu_B) / sqrt(var_B + eps)
      y_i    = gamma * xhat_i + beta

  Gradients flow through mu_B and var_B, which the paper's Section 2 shows is
  necessary. They are the paper's closed-form chain rule (Section 3), supplied as a
  custom JVP so that the backward pass needs only two reductions per statistic;
  forward and reverse mode work, at any order.

  Args:
    x: activations, e.g. (batch, features) or (batch, height, width, channels).
    scale: gamma, shaped like x without `axes` (or None for gamma = 1).
    bias: beta, shaped like x without `axes` (or None for beta = 0).
    axes: axes to reduce over: (0,) for dense, (0, 1, 2) for NHWC convolutions.
    epsilon: > 0, added to the variance for numerical stability.
    axis_name: optional mapped axis to pool statistics over (pmap / shard_map).

  Returns:
    (y, mean, var): the normalized output and the batch statistics (biased variance).

  Raises:
    ValueError: axes out of range, epsilon <= 0, or a single element per statistic.
  """
  axes = _canonical_axes(x.ndim, axes)
  _check_epsilon(epsilon)
  count = int(np.prod([x.shape[a] for a in axes]))
  if count < 2 and axis_name is None:
    raise ValueError(
        f'batch_norm needs at least 2 values per statistic in training mode, got '
        f'{count} (input shape {tuple(x.shape)}, axes {axes}): a batch of one '
        'example has zero variance. Use a larger batch or inference mode.')
  kept = tuple(x.shape[d] for d in range(x.ndim) if d not in axes)
  dtype = _stat_dtype(x.dtype)
  # gamma / beta broadcast to the statistics' shape (e.g. over ghost-batch groups).
  scale = jnp.ones(kept, dtype) if scale is None else jnp.broadcast_to(scale, kept)
  bias = jnp.zeros(kept, dtype) if bias is None else jnp.broadcast_to(bias, kept)
  return _batch_norm_train(x, scale, bias, axes, float(epsilon), axis_name)


def batch_norm_stop_gradient(
    x: Array,
    scale: Optional[Array],
    bias: Optional[Array],
    *,
    axes: Sequence[int],
    epsilon: float,
    axis_name: Optional[str] = None,
) -> Tuple[Array, Array, Array]:
  """Algorithm 1's forward pass with the statistics outside the gradient step.

  The output equals `batch_norm`'s, but mu_B and var_B are constants for the gradient
  (`jax.lax.stop_gradient`): dl/dx = gamma / sqrt(var_B + eps) * dl/dy, as if the
  normalization were a fixed affine map computed apart from the optimization. The
  paper's Section 2 argues that this is what makes training blow up: a bias b added
  before the normalization gets a gradient that never changes the output, since
  (u + b + db) - E[u + b + db] = u + b - E[u + b], so b can grow while the loss stays
  put. Same arguments and returns as `batch_norm`.
  """
  axes = _canonical_axes(x.ndim, axes)
  _check_epsilon(epsilon)
  mean, var = batch_moments(x, axes=axes, axis_name=axis_name)
  mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
  return _normalize(x, mean, var, scale, bias, epsilon, axes), mean, var


def batch_norm_inference(
    x: Array,
    scale: Optional[Array],
    bias: Optional[Array],
    mean: Array,
    var: Array,
    *,
    epsilon: float,
) -> Array:
  """Algorithm 2, line 11: y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma E[x] / sqrt(Var[x] + eps)).

  The output depends on the input alone: `mean` and `var` are population statistics
  (or their moving averages), broadcast along the last axis of x.
  """
  _check_epsilon(epsilon)
  axes = tuple(range(x.ndim - mean.ndim))
  return _normalize(x, mean, var, scale, bias, epsilon, axes)


def unbiased_variance(var: Array, count: Any) -> Array:
  """m/(m-1) * var: the unbiased estimate from a biased variance over m values."""
  return var * (count / (count - 1.0))


def population_statistics(moments: Iterable[Mapping[str, Any]]) -> dict:
  """Algorithm 2, step 10: population statistics from many training mini-batches.

      E[x]   = E_B[mu_B]
      Var[x] = m/(m-1) * E_B[var_B]

  Args:
    moments: one tree per mini-batch, as collected in the `batch_moments` collection
      by `BatchNorm` in training mode: every BN layer's leaf is a dict with `mean`,
      `var` (biased) and `count` (m, values per statistic). Flax's `sow` wraps values in
      a tuple; both wrapped and bare dicts are accepted.

  Returns:
    A tree shaped like `batch_stats` (`{'mean', 'var'}` per BN layer) that replaces the
    moving averages for inference.
  """
  moments = list(moments)
  if not moments:
    raise ValueError('population_statistics needs at least one mini-batch, got 0.')

  def is_leaf(t):
    return isinstance(t, Mapping) and ('count' in t or set(t) == {'moments'})

  def unwrap(t):
    # BatchNorm sows {'moments': ({'mean', 'var', 'count'},)}: one tuple entry per call.
    if 'moments' in t:
      t = t['moments']
      if isinstance(t, tuple):
        if len(t) != 1:
          raise ValueError('expected one set of moments per layer per batch, got '
                           f'{len(t)} (was the layer applied twice in one call?)')
        t = t[0]
    return t

  def combine(*leaves):
    leaves = [unwrap(t) for t in leaves]
    means = jnp.stack([jnp.asarray(t['mean']) for t in leaves])
    variances = jnp.stack([jnp.asarray(t['var']) for t in leaves])
    count = jnp.asarray(leaves[0]['count'], dtype=variances.dtype)
    return {'mean': jnp.mean(means, axis=0),
            'var': unbiased_variance(jnp.mean(variances, axis=0), count)}

  return _strip(jax.tree_util.tree_map(combine, *moments, is_leaf=is_leaf))


def _strip(tree):
  """Turns FrozenDicts into plain dicts so the result drops into any variables tree."""
  if isinstance(tree, Mapping):
    return {k: _strip(v) for k, v in tree.items()}
  return tree


def fold_batch_norm(
    kernel: Array,
    bias: Optional[Array],
    scale: Optional[Array],
    beta: Optional[Array],
    mean: Array,
    var: Array,
    *,
    epsilon: float,
) -> Tuple[Array, Array]:
  """Folds inference-mode BN into the preceding dense or convolution layer.

  BN(W u + b) = s * (W u + b - E) + beta with s = gamma / sqrt(Var + eps), so
  W' = W * s (per output feature, the kernel's last axis) and b' = s * (b - E) + beta.

  Args:
    kernel: (in, out) dense or (kh, kw, in, out) convolution kernel.
    bias: the layer's bias (out,), or None (a layer followed by BN has none).
    scale, beta: BN's gamma and beta (out,), or None for 1 and 0.
    mean, var: population statistics (out,).
    epsilon: BN's epsilon.

  Returns:
    (kernel', bias') of one affine layer equal to layer-then-BN at inference.
  """
  _check_epsilon(epsilon)
  if kernel.shape[-1] != mean.shape[-1]:
    raise ValueError(f'kernel has {kernel.shape[-1]} output features but the BN '
                     f'statistics have {mean.shape[-1]}.')
  s = jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    s = s * scale
  b = jnp.zeros_like(mean) if bias is None else bias
  new_bias = s * (b - mean)
  if beta is not None:
    new_bias = new_bias + beta
  return kernel * s, new_bias


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



class BatchNorm(nn.Module):
  """Batch Normalization layer over all axes but the last (features / channels).

  Training mode (`use_running_average=False`) applies Algorithm 1 with the batch's
  statistics and updates the moving averages in `batch_stats`; inference mode uses
  those averages (or population statistics written over them, see
  `population_statistics`).

  Attributes:
    use_running_average: inference mode if True; may also be given at call time.
    momentum: moving-average decay, `new = momentum * old + (1 - momentum) * batch`
      (PyTorch's momentum is 1 - this; TF-slim's decay is this).
    epsilon: added to the variance, > 0.
    axis_name: mapped axis (pmap / shard_map) to pool statistics over.
    virtual_batch_size: ghost batch norm: statistics per group of this many
      consecutive examples (per device), so e.g. the paper's batch-32 statistics hold
      at any global batch size. With axis_name, groups are not pooled across devices;
      only the moving averages average over all groups of all devices.
      None: the whole (per-axis_name) batch.
    unbiased_running_var: track m/(m-1) * var_B (Algorithm 2's estimator) rather than
      the biased var_B (Flax's choice).
    use_scale, use_bias: learn gamma / beta.
    dtype: output dtype (statistics are always at least float32).
    param_dtype: dtype of gamma and beta.
    renorm: batch renorm's schedule (`BatchRenorm`); None: plain BN. With it, the
      module also counts its training steps in `batch_stats` as `step` (float32,
      exact to 2^24 steps, and unchanged by the pmean that replicas' batch_stats get).
    noise: strength of noisy BN's per-step random affine distortion after the
      normalization (`NoisyBatchNorm`), drawn from the 'dropout' rng in training mode
      (without that rng, as in population passes, none is applied); 0: none.
      Inference mode is unaffected.
    stop_statistics_gradient: normalize with `batch_norm_stop_gradient` (the
      statistics are constants for the gradient; `StopGradientBatchNorm`).
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  virtual_batch_size: Optional[int] = None
  unbiased_running_var: bool = True
  use_scale: bool = True
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  renorm: Optional[RenormSchedule] = None
  noise: float = 0.0
  stop_statistics_gradient: bool = False

  @nn.compact
  def __call__(self, x: Array, use_running_average: Optional[bool] = None) -> Array:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    _check_epsilon(self.epsilon)
    # A traced momentum (a member sweep's per-member value) was checked in its config.
    if isinstance(self.momentum, numbers.Real) and not 0.0 <= self.momentum <= 1.0:
      raise ValueError(f'momentum={self.momentum!r} must be in [0, 1].')
    if not self.noise >= 0.0:
      raise ValueError(f'noise={self.noise!r} must be >= 0.')
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    if not axes:
      raise ValueError(f'BatchNorm needs a batch axis; got input of shape {x.shape}.')

    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    scale = (self.param('scale', self.scale_init, (features,), self.param_dtype)
             if self.use_scale else None)
    bias = (self.param('bias', self.bias_init, (features,), self.param_dtype)
            if self.use_bias else None)
    out_dtype = self.dtype or x.dtype
    step = None
    if self.renorm is not None and (not use_running_average or self.is_initializing()):
      # Not declared at inference, so population statistics (mean, var only) can
      # replace batch_stats there.
      step = self.variable('batch_stats', 'step', lambda: jnp.zeros((), jnp.float32))

    if use_running_average:
      y = batch_norm_inference(x, scale, bias, ra_mean.value, ra_var.value,
                               epsilon=self.epsilon)
      return y.astype(out_dtype)

    # Flax's convention: no collectives while initializing, so `init` works outside
    # pmap / shard_map (the statistics computed then are discarded).
    axis_name = None if self.is_initializing() else self.axis_name

    def normalize(xb, axes, axis_name):
      if self.renorm is None:
        transform = (batch_norm_stop_gradient if self.stop_statistics_gradient
                     else batch_norm)
        return transform(xb, scale, bias, axes=axes, epsilon=self.epsilon,
                         axis_name=axis_name)
      r_max, d_max = self.renorm.limits(step.value)
      return batch_renorm(xb, scale, bias, ra_mean.value, ra_var.value, axes=axes,
                          epsilon=self.epsilon, r_max=r_max, d_max=d_max,
                          axis_name=axis_name)

    vbs = self.virtual_batch_size
    if vbs is not None:
      batch = x.shape[0]
      if not isinstance(vbs, (int, np.integer)) or vbs < 1 or batch % vbs:
        raise ValueError(
            f'virtual_batch_size={vbs!r} must be a positive divisor of the (per-device) '
            f'batch size {batch}.')
      groups = batch // vbs
      xg = x.reshape((groups, vbs) + x.shape[1:])
      # Statistics per ghost batch of vbs consecutive examples on this device (never
      # pooled across devices, so the ghost batch size does not depend on the device
      # count): reduce over every axis but the group and feature axes; gamma/beta
      # broadcast over groups.
      y, mean, var = normalize(xg, tuple(range(1, xg.ndim - 1)), None)
      y = y.reshape(x.shape)
      # Moving averages / population statistics: E_B[mu_B] and E_B[var_B] over all
      # ghost batches, on all devices (which keeps replicas' batch_stats identical).
      mean, var = jnp.mean(mean, axis=0), jnp.mean(var, axis=0)
      if axis_name is not None:
        mean, var = jax.lax.pmean((mean, var), axis_name)
      count = np.prod(xg.shape[1:-1])
    else:
      y, mean, var = normalize(x, axes, axis_name)
      count = np.prod(x.shape[:-1])
      if axis_name is not None:
        count = count * jax.lax.psum(1, axis_name)

    if not self.is_initializing():
      # Only stored when the caller makes 'batch_moments' mutable, for
      # population_statistics (Algorithm 2, step 10).
      self.sow('batch_moments', 'moments',
               {'mean': mean, 'var': var, 'count': jnp.asarray(count, jnp.float32)})
      tracked_var = unbiased_variance(var, count) if self.unbiased_running_var else var
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * tracked_var
      if step is not None:
        step.value = step.value + 1.0
      if self.noise and self.has_rng('dropout'):
        # A fresh distortion every step: the engine folds the step into its rng.
        # Without the rng (Algorithm 2's population passes) the layer is BN, as at
        # inference, so the statistics estimated are those of the inference network.
        y = noisy_affine(y, self.make_rng('dropout'), self.noise)
    return y.astype(out_dtype)


class BatchRenorm(BatchNorm):
  """Batch Renormalization (Ioffe 2017): `BatchNorm` with r/d correction.

  Training mode normalizes with `batch_renorm` under the clipping limits that
  `renorm` gives at the module's own step count (`batch_stats['step']`); the moving
  averages are BN's (so r_max = 1, d_max = 0 is BN exactly, moving averages included);
  inference mode is BN's Algorithm 2 with those moving averages.
  """
  renorm: Optional[RenormSchedule] = RenormSchedule()


class NoisyBatchNorm(BatchNorm):
  """Noisy BN (Santurkar et al. 2018): BN, then in training mode y * s + b per unit
  with (s, b) drawn afresh every step (`sample_distortion`) from the 'dropout' rng, so
  the layer's output distribution has a non-zero mean and non-unit variance that
  shift from step to step. The identity at inference.

  The distortion is one per unit, shared by the mini-batch (no per-example noise), so
  it shifts the whole distribution that the next layer sees, which is the property
  their experiment is about; their Appendix A has their exact noise model.
  """
  noise: float = 0.5


class StopGradientBatchNorm(BatchNorm):
  """BN whose batch mean and variance are constants for the gradient
  (`batch_norm_stop_gradient`): the paper's Section 2 example of normalization kept
  outside the gradient step. Forward pass, moving averages and inference are BN's."""
  stop_statistics_gradient: bool = True


class GroupNorm(nn.Module):
  """Group Normalization (Wu & He 2018) over the last axis' channels: `group_norm`.

  Params `scale` and `bias` per channel, no `batch_stats`: the statistics are per
  example, the same in training and inference. For dense (batch, units) activations a
  group is `units / num_groups` consecutive units of one example.

  Attributes:
    num_groups: G; 1 is layer norm, one per channel instance norm.
    epsilon: added to each group's variance, > 0.
    dtype: output dtype (statistics are at least float32).
    param_dtype: dtype of gamma and beta.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    y = group_norm(x, scale, bias, num_groups=self.num_groups, epsilon=self.epsilon)
    return y.astype(self.dtype or x.dtype)


class LayerNorm(GroupNorm):
  """Layer Normalization: `GroupNorm` with one group (per example over H, W, C)."""
  num_groups: int = 1


def estimate_population_statistics(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    **apply_kwargs: Any,
) -> dict:
  """Runs training-mode forward passes over `batches` and returns population batch_stats.

  Args:
    apply_fn: the model's `apply`, called as `apply_fn(variables, batch, mutable=...,
      **apply_kwargs)`; apply_kwargs must put every BatchNorm in training mode (e.g.
      `train=True`).
    variables: the trained variables (params and batch_stats).
    batches: training mini-batches of the size used in training (size m).

  Returns:
    A `batch_stats` tree to replace `variables['batch_stats']` (Algorithm 2, step 10).
  """
  variables = {k: v for k, v in variables.items() if k != 'batch_moments'}

  @jax.jit
  def moments_of(batch):
    _, updates = apply_fn(variables, batch, mutable=['batch_stats', 'batch_moments'],
                          **apply_kwargs)
    return updates['batch_moments']

  return population_statistics(moments_of(b) for b in batches)


def get_normalizer(
    name: str,
    *,
    use_running_average: Optional[bool] = None,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis_name: Optional[str] = None,
    virtual_batch_size: Optional[int] = None,
    unbiased_running_var: bool = True,
    dtype: Optional[Any] = None,
    num_groups: int = 32,
    renorm: Optional[RenormSchedule] = None,
    noise: float = 0.5,
) -> Optional[Callable[..., nn.Module]]:
  """Normalizer by name, so models switch BN and its alternatives by config.

  Args:
    name: one of `NORMALIZERS`: 'batch_norm', 'virtual_batch_norm' (needs
      virtual_batch_size), 'batch_renorm', 'noisy_batch_norm',
      'stop_gradient_batch_norm', 'layer_norm', 'group_norm' or 'none'.
    use_running_average, momentum, axis_name, virtual_batch_size,
      unbiased_running_var: as for `BatchNorm`; used by the batch normalizers
      (all but layer/group norm, for which virtual_batch_size must be None).
    epsilon, dtype: every normalizer's.
    num_groups: group_norm's G.
    renorm: batch_renorm's schedule (None: `RenormSchedule()`'s defaults).
    noise: noisy_batch_norm's strength, > 0.

  Returns:
    A module constructor (call it with `name=...`, then on the activations) or None for
    'none', in which case the model keeps its layers' biases and normalizes nothing.
  """
  if name not in NORMALIZERS:
    raise ValueError(f'unknown normalizer {name!r}; allowed: {", ".join(NORMALIZERS)}.')
  if name == 'none':
    return None
  _check_epsilon(epsilon)
  if name in ('layer_norm', 'group_norm'):
    if virtual_batch_size:
      raise ValueError(f'virtual_batch_size={virtual_batch_size!r} does not apply to '
                       f'{name!r}, whose statistics are per example; allowed: None.')
    if name == 'layer_norm':
      return functools.partial(LayerNorm, epsilon=epsilon, dtype=dtype)
    if not (isinstance(num_groups, (int, np.integer)) and num_groups >= 1):
      raise ValueError(f'num_groups={num_groups!r} must be an integer >= 1.')
    return functools.partial(GroupNorm, num_groups=num_groups, epsilon=epsilon, dtype=dtype)
  if name == 'virtual_batch_norm':
    if not virtual_batch_size or virtual_batch_size < 1:
      raise ValueError("normalizer 'virtual_batch_norm' needs virtual_batch_size >= 1, "
                       f'got {virtual_batch_size!r}.')
  elif virtual_batch_size is not None:
    # Any batch normalizer takes ghost batches: a batch_norm with them is a
    # virtual_batch_norm, spelled so that configs can set virtual_batch_size on either.
    if virtual_batch_size < 1:
      raise ValueError(f'virtual_batch_size={virtual_batch_size!r} must be >= 1 or None.')
  module, extra = BatchNorm, {}
  if name == 'batch_renorm':
    module, extra = BatchRenorm, {'renorm': renorm or RenormSchedule()}
  elif name == 'noisy_batch_norm':
    if not noise > 0:
      raise ValueError(f'noise={noise!r} must be > 0 for noisy_batch_norm (0 is batch_norm).')
    module, extra = NoisyBatchNorm, {'noise': float(noise)}
  elif name == 'stop_gradient_batch_norm':
    module = StopGradientBatchNorm
  return functools.partial(
      module, use_running_average=use_running_average, momentum=momentum,
      epsilon=epsilon, axis_name=axis_name, virtual_batch_size=virtual_batch_size,
      unbiased_running_var=unbiased_running_var, dtype=dtype, **extra)
