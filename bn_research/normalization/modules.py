"""The Flax modules that own the normalizers' parameters and moving averages and call
the pure functions; `get_normalizer` picks one by name (`names.NORMALIZERS`)."""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bn_research.normalization.functional import (_check_epsilon, batch_norm, batch_norm_inference,
                                                   batch_norm_stop_gradient,
                                                   population_statistics, unbiased_variance)
from bn_research.normalization.names import NORMALIZERS
from bn_research.normalization.others import RenormSchedule, batch_renorm, group_norm, noisy_affine

Array = jax.Array


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

