"""Batch Normalization as in Ioffe & Szegedy (2015): Algorithms 1 and 2.

The math lives in pure functions (`batch_norm`, `batch_norm_inference`,
`population_statistics`, `fold_batch_norm`); `BatchNorm` is a thin Flax module that
owns the learned `scale` (gamma) and `bias` (beta) in `params` and the moving averages
in the `batch_stats` collection, and calls those functions.

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

import functools
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NORMALIZERS = ('batch_norm', 'virtual_batch_norm', 'none')


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

  @nn.compact
  def __call__(self, x: Array, use_running_average: Optional[bool] = None) -> Array:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    _check_epsilon(self.epsilon)
    # A traced momentum (a member sweep's per-member value) was checked in its config.
    if isinstance(self.momentum, numbers.Real) and not 0.0 <= self.momentum <= 1.0:
      raise ValueError(f'momentum={self.momentum!r} must be in [0, 1].')
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

    if use_running_average:
      y = batch_norm_inference(x, scale, bias, ra_mean.value, ra_var.value,
                               epsilon=self.epsilon)
      return y.astype(out_dtype)

    # Flax's convention: no collectives while initializing, so `init` works outside
    # pmap / shard_map (the statistics computed then are discarded).
    axis_name = None if self.is_initializing() else self.axis_name
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
      y, mean, var = batch_norm(xg, scale, bias, axes=tuple(range(1, xg.ndim - 1)),
                                epsilon=self.epsilon, axis_name=None)
      y = y.reshape(x.shape)
      # Moving averages / population statistics: E_B[mu_B] and E_B[var_B] over all
      # ghost batches, on all devices (which keeps replicas' batch_stats identical).
      mean, var = jnp.mean(mean, axis=0), jnp.mean(var, axis=0)
      if axis_name is not None:
        mean, var = jax.lax.pmean((mean, var), axis_name)
      count = np.prod(xg.shape[1:-1])
    else:
      y, mean, var = batch_norm(x, scale, bias, axes=axes, epsilon=self.epsilon,
                                axis_name=axis_name)
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
    return y.astype(out_dtype)


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
) -> Optional[Callable[..., nn.Module]]:
  """Normalizer by name, so models switch BN on and off by config.

  Args:
    name: 'batch_norm', 'virtual_batch_norm' (needs virtual_batch_size) or 'none'.
    Other arguments: as for `BatchNorm`.

  Returns:
    A `BatchNorm` constructor (call it with `name=...`) or None for 'none', in which
    case the model keeps its layers' biases and applies no normalization.
  """
  if name not in NORMALIZERS:
    raise ValueError(f'unknown normalizer {name!r}; allowed: {", ".join(NORMALIZERS)}.')
  if name == 'none':
    return None
  _check_epsilon(epsilon)
  if name == 'virtual_batch_norm':
    if not virtual_batch_size or virtual_batch_size < 1:
      raise ValueError("normalizer 'virtual_batch_norm' needs virtual_batch_size >= 1, "
                       f'got {virtual_batch_size!r}.')
  elif virtual_batch_size is not None:
    # A batch_norm with ghost batches is a virtual_batch_norm: allowed, and spelled so
    # that configs can set virtual_batch_size on either.
    if virtual_batch_size < 1:
      raise ValueError(f'virtual_batch_size={virtual_batch_size!r} must be >= 1 or None.')
  return functools.partial(
      BatchNorm, use_running_average=use_running_average, momentum=momentum,
      epsilon=epsilon, axis_name=axis_name, virtual_batch_size=virtual_batch_size,
      unbiased_running_var=unbiased_running_var, dtype=dtype)
