"""The paper's Inception variant (BN-Inception), Experiment 4.2 and the appendix table.

GoogLeNet with each 5x5 convolution replaced by two stacked 3x3 convolutions (the
"double 3x3" branch), stride-2 modules (3c, 4e) that downsample with a pass-through
max pool instead of pooling layers between stages, and a 7x7/2 depthwise-separable
first convolution. TF-slim's `inception_v2` is a public rendering; where the paper's
table and slim differ we follow the table by default (`table='paper'`) and offer slim's
widths as `table='tf_slim'`:

* Modules 4c and 4d: the table gives a 128-wide pool projection, slim 96. The table's
  own output-size column (14x14x576) only adds up with 96 (160+160+160+96 = 576 and
  96+192+192+96 = 576; with 128 both give 608, and 4e then gives 1056, not 1024), so
  slim's choice matches the table's shapes and the table's filter counts do not.
* Naming: the paper calls the modules 3a, 3b, 3c, 4a-4e, 5a, 5b; slim calls them
  Mixed_3b .. Mixed_5c. We use the paper's names.
* Slim's BN learns beta only (`scale=False` in its arg scope) and its logits have 1001
  classes; ours learns gamma and beta (as in Algorithm 1) and has `num_classes` logits.

Layer order in every convolution unit is conv -> BN -> nonlinearity (the paper's
z = g(BN(Wu))); under BN the convolution has no bias (beta replaces it), under
`normalizer='none'` it has one. The 7x7 separable stem convolution is a depthwise
convolution (no bias, no normalization, no nonlinearity) followed by a pointwise 1x1
convolution unit, as in slim's `separable_conv2d` with a normalizer.

Spatial sizes for a 224x224 input (SAME padding throughout):
  stem 112 -> pool 56 -> 3x3 conv 56 -> pool 28 -> 3a, 3b 28 -> 3c 14 -> 4a-4d 14
  -> 4e 7 -> 5a, 5b 7 -> global average pool (7x7) -> dropout -> linear classifier.

`small_inputs=True` swaps the stem for one without downsampling (3x3 stride-1 convs,
no pools), so a 28x28 or 32x32 input reaches the final pool at 7x7 or 8x8 after the
two stride-2 modules.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bn_research.models import layers
# The tables live in a module without JAX (the registry reads them); re-exported here.
from bn_research.models.inception_table import (  # pylint: disable=unused-import
    MIN_WIDTH, PAPER_TABLE, SEPARABLE_DEPTH_MULTIPLIER, STEM_WIDTHS, TABLES, TF_SLIM_TABLE,
    ModuleSpec, module_table, normalized_widths, scaled_width)
from bn_research.normalization import NORMALIZERS, RenormSchedule, get_normalizer

Array = jax.Array

ACTIVATIONS: Dict[str, Callable[[Array], Array]] = {
    'relu': nn.relu,
    'sigmoid': nn.sigmoid,
}


def local_response_normalization(
    x: Array,
    *,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    bias: float = 1.0,
) -> Array:
  """Cross-channel local response normalisation (AlexNet Sec. 3.3, GoogLeNet's stem).

      y_c = x_c / (bias + (alpha / size) * sum_{|c' - c| <= size // 2} x_c'^2) ** beta

  This is Caffe's LRN convention (ACROSS_CHANNELS), used by the BVLC GoogLeNet model:
  local_size 5, alpha 1e-4, beta 0.75, k 1, with alpha divided by the window size. In
  TF's `tf.nn.local_response_normalization` the same layer is depth_radius=2,
  alpha=2e-5, beta=0.75, bias=1. (AlexNet's paper writes k=2, n=5, alpha=1e-4,
  beta=0.75 with alpha not divided by n.) The window is truncated at the first and last
  channel. Channels are on the last axis; computed in float32, returned in x's dtype.

  Args:
    x: activations (..., channels).
    size: window width in channels (odd).
    alpha, beta, bias: as in the formula.

  Returns:
    An array of x's shape and dtype.
  """
  if size < 1 or size % 2 == 0:
    raise ValueError(f'LRN size={size!r} must be a positive odd number of channels.')
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  radius = size // 2
  pad = [(0, 0)] * (x.ndim - 1) + [(radius, radius)]
  window = (1,) * (x.ndim - 1) + (size,)
  sq_sum = jax.lax.reduce_window(
      jnp.square(xf), 0.0, jax.lax.add, window, (1,) * x.ndim, pad)
  y = xf / (bias + (alpha / size) * sq_sum) ** beta
  return y.astype(x.dtype)


def validate_inception_options(
    *,
    num_classes: int = 1000,
    normalizer: str = 'batch_norm',
    activation: str = 'relu',
    dropout_rate: float = 0.0,
    width_multiplier: float = 1.0,
    bn_momentum: float = 0.99,
    bn_epsilon: float = 1e-3,
    virtual_batch_size: Optional[int] = None,
    table: str = 'paper',
    norm_groups: int = 32,
    bn_noise: float = 0.5,
) -> None:
  """Raises ValueError, naming the bad value, for options `Inception` cannot build."""
  if activation not in ACTIVATIONS:
    raise ValueError(f'unknown activation {activation!r}; allowed: '
                     f'{", ".join(ACTIVATIONS)}.')
  if normalizer not in NORMALIZERS:
    raise ValueError(f'unknown normalizer {normalizer!r}; allowed: '
                     f'{", ".join(NORMALIZERS)}.')
  # Traced values (a member sweep's per-member rates) were checked in their configs.
  if isinstance(dropout_rate, numbers.Real) and not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate={dropout_rate!r} must be in [0, 1).')
  if not (isinstance(width_multiplier, numbers.Real) and width_multiplier > 0):
    raise ValueError(f'width_multiplier={width_multiplier!r} must be > 0.')
  if not (isinstance(num_classes, numbers.Integral) and num_classes >= 1):
    raise ValueError(f'num_classes={num_classes!r} must be an integer >= 1.')
  if isinstance(bn_momentum, numbers.Real) and not 0.0 <= bn_momentum <= 1.0:
    raise ValueError(f'bn_momentum={bn_momentum!r} must be in [0, 1].')
  module_table(table)
  # Catches e.g. 'virtual_batch_norm' without virtual_batch_size at construction time.
  get_normalizer(normalizer, momentum=bn_momentum, epsilon=bn_epsilon,
                 virtual_batch_size=virtual_batch_size, num_groups=norm_groups,
                 noise=bn_noise)


class ConvUnit(nn.Module):
  """Convolution -> BN (if any) -> nonlinearity: z = g(BN(W u)), or g(W u + b) without BN."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  norm: Optional[Callable[..., nn.Module]] = None
  activation: str = 'relu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding='SAME',
                use_bias=self.norm is None, dtype=self.dtype, param_dtype=jnp.float32,
                name='conv')(x)
    if self.norm is not None:
      x = self.norm(name='bn')(x)
    return ACTIVATIONS[self.activation](x)


class InceptionModule(nn.Module):
  """One inception module: 1x1, 1x1->3x3, 1x1->3x3->3x3 and pool(->1x1) branches.

  In a stride-2 module (3c, 4e) the last 3x3 of each conv branch and the pool have
  stride 2, there is no 1x1 branch, and the max-pooled input passes through unprojected.
  """
  spec: ModuleSpec
  width_multiplier: float = 1.0
  norm: Optional[Callable[..., nn.Module]] = None
  activation: str = 'relu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    w = lambda d: scaled_width(d, self.width_multiplier)
    unit = lambda feats, k, name, stride=1: ConvUnit(
        w(feats), (k, k), (stride, stride), self.norm, self.activation, self.dtype,
        name=name)
    branches = []
    if s.conv1x1:
      branches.append(unit(s.conv1x1, 1, 'branch1x1')(x))
    b = unit(s.reduce3x3, 1, 'branch3x3_reduce')(x)
    branches.append(unit(s.conv3x3, 3, 'branch3x3', s.stride)(b))
    b = unit(s.reduce_double3x3, 1, 'double3x3_reduce')(x)
    b = unit(s.double3x3, 3, 'double3x3_a')(b)
    branches.append(unit(s.double3x3, 3, 'double3x3_b', s.stride)(b))
    window, strides = (3, 3), (s.stride, s.stride)
    if s.pool == 'avg':
      # TF/slim's SAME average pool divides by the number of real (unpadded) inputs.
      p = nn.avg_pool(x, window, strides, padding='SAME', count_include_pad=False)
    else:
      p = nn.max_pool(x, window, strides, padding='SAME')
    if s.pool_proj:
      p = unit(s.pool_proj, 1, 'pool_proj')(p)
    branches.append(p)
    return jnp.concatenate(branches, axis=-1)


class Inception(nn.Module):
  """BN-Inception (the paper's Experiment 4.2 network) as a Flax linen module.

  Attributes:
    num_classes: width of the linear classifier (softmax is left to the loss).
    normalizer: 'batch_norm', 'virtual_batch_norm' (needs virtual_batch_size),
      'batch_renorm', 'noisy_batch_norm', 'layer_norm', 'group_norm' (see
      `normalization.get_normalizer`) or 'none' (the paper's "Inception" baseline:
      convolutions keep their biases). Under every normalizer the convolutions have
      no bias, since each normalizer's beta takes its role.
    activation: 'relu' or 'sigmoid' (BN-x5-Sigmoid).
    dropout_rate: dropout before the classifier, in [0, 1); needs the 'dropout' rng
      when training. GoogLeNet used 0.4; the paper's BN-x5/x30 remove it.
    use_lrn: local response normalisation in the stem as in GoogLeNet (after the first
      max pool, and after the 3x3 convolution before the second max pool); the paper's
      BN-x5/x30 remove it.
    width_multiplier: scales every convolution's width (rounded, at least 8).
    small_inputs: a stem without downsampling for 28x28-64x64 inputs.
    stem_stride: stride of the small-input stem's first convolution (2 halves every
      later feature map: 4x less compute, for quick CPU ablations on 28x28 data).
    bn_momentum, bn_epsilon: BN's moving-average decay and epsilon.
    axis_name: mapped axis to pool BN statistics over (pmap / shard_map).
    virtual_batch_size: ghost-batch size for BN statistics.
    dtype: computation dtype (parameters stay float32; logits are returned float32).
    table: 'paper' (appendix table) or 'tf_slim' (96-wide pool projections in 4c, 4d).
    unbiased_running_var: BN's moving variance tracks m/(m-1) var_B (Algorithm 2) if
      True, the biased var_B (Flax, TF) if False.
    norm_groups: group_norm's G per convolution (its channels over (H, W, C/G) per
      example); it must divide every width (`normalized_widths`).
    renorm: batch_renorm's schedule (None: its defaults).
    bn_noise: noisy_batch_norm's strength.
  """
  num_classes: int = 1000
  normalizer: str = 'batch_norm'
  activation: str = 'relu'
  dropout_rate: float = 0.0
  use_lrn: bool = False
  width_multiplier: float = 1.0
  small_inputs: bool = False
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  axis_name: Optional[str] = None
  virtual_batch_size: Optional[int] = None
  dtype: Any = jnp.float32
  table: str = 'paper'
  stem_stride: int = 1
  unbiased_running_var: bool = True
  norm_groups: int = 32
  renorm: Optional[RenormSchedule] = None
  bn_noise: float = 0.5

  def __post_init__(self):
    validate_inception_options(
        num_classes=self.num_classes, normalizer=self.normalizer,
        activation=self.activation, dropout_rate=self.dropout_rate,
        width_multiplier=self.width_multiplier, bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon, virtual_batch_size=self.virtual_batch_size,
        table=self.table, norm_groups=self.norm_groups, bn_noise=self.bn_noise)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Logits (batch, num_classes), float32, for NHWC images x."""
    if x.ndim != 4:
      raise ValueError(f'Inception expects NHWC images, got shape {tuple(x.shape)}.')
    norm = get_normalizer(
        self.normalizer, use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon, axis_name=self.axis_name,
        virtual_batch_size=self.virtual_batch_size,
        unbiased_running_var=self.unbiased_running_var, dtype=self.dtype,
        num_groups=self.norm_groups, renorm=self.renorm, noise=self.bn_noise)
    w = lambda d: scaled_width(d, self.width_multiplier)
    unit = lambda feats, k, name, stride=1: ConvUnit(
        w(feats), (k, k), (stride, stride), norm, self.activation, self.dtype,
        name=name)
    lrn = local_response_normalization if self.use_lrn else (lambda t: t)

    x = x.astype(self.dtype)
    in_channels = x.shape[-1]
    stem_width = w(STEM_WIDTHS['conv1'])
    if self.small_inputs:
      x = unit(STEM_WIDTHS['conv1'], 3, 'stem_conv1', self.stem_stride)(x)
      x = lrn(x)
      x = unit(STEM_WIDTHS['conv2_reduce'], 1, 'stem_conv2_reduce')(x)
      x = unit(STEM_WIDTHS['conv2'], 3, 'stem_conv2')(x)
      x = lrn(x)
    else:
      # 7x7/2 depthwise-separable: each input channel gets `multiplier` 7x7 filters,
      # then a 1x1 unit mixes them. Slim caps the multiplier so that
      # in_channels * multiplier <= out_channels (never over-parameterised).
      multiplier = max(1, min(SEPARABLE_DEPTH_MULTIPLIER, stem_width // in_channels))
      x = nn.Conv(in_channels * multiplier, (7, 7), strides=(2, 2), padding='SAME',
                  feature_group_count=in_channels, use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32, name='stem_conv1_depthwise')(x)
      x = unit(STEM_WIDTHS['conv1'], 1, 'stem_conv1_pointwise')(x)
      x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
      x = lrn(x)
      x = unit(STEM_WIDTHS['conv2_reduce'], 1, 'stem_conv2_reduce')(x)
      x = unit(STEM_WIDTHS['conv2'], 3, 'stem_conv2')(x)
      x = lrn(x)
      x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')

    for spec in module_table(self.table):
      x = InceptionModule(spec, self.width_multiplier, norm, self.activation,
                          self.dtype, name=f'inception_{spec.name}')(x)

    # Global average pool: the table's 7x7 average pool for 224x224 inputs.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    x = layers.Dropout(self.dropout_rate, name='dropout')(x, deterministic=not train)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 name='classifier')(x)
    return x.astype(jnp.float32)


def count_params(params_tree: Any) -> int:
  """Number of scalars in a tree of arrays (or ShapeDtypeStructs, e.g. from eval_shape).

  Pass `variables['params']`: `batch_stats` are not parameters.
  """
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params_tree)))


def build(m: Any, *, num_classes: int, norm_kwargs: dict) -> Inception:
  """The Inception of the config's `model` part `m` (the registry's builder)."""
  return Inception(num_classes=num_classes, normalizer=m.normalizer,
                   activation=m.activation, dropout_rate=m.dropout_rate,
                   use_lrn=m.use_lrn, width_multiplier=m.width_multiplier,
                   small_inputs=m.small_inputs, bn_momentum=norm_kwargs['momentum'],
                   bn_epsilon=norm_kwargs['epsilon'], axis_name=norm_kwargs['axis_name'],
                   virtual_batch_size=norm_kwargs['virtual_batch_size'],
                   dtype=jnp.dtype(m.dtype),
                   unbiased_running_var=norm_kwargs['unbiased_running_var'],
                   stem_stride=m.stem_stride, norm_groups=norm_kwargs['num_groups'],
                   renorm=norm_kwargs['renorm'], bn_noise=norm_kwargs['noise'])
