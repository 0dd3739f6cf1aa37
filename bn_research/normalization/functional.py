"""Batch Normalization's math as pure functions: Algorithm 1 (training, with the
paper's closed-form backward pass), inference, Algorithm 2's population statistics
and folding BN into the preceding layer. Conventions: see the package docstring."""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


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

