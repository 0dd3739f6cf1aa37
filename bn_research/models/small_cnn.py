"""A small convolutional network: conv-BN-ReLU-pool blocks and a dense head.

The network readers of the paper use to see BN's regularising effect (BN vs no BN on
a small image classifier, training vs validation curves). Each block is
z = pool(g(BN(W * u))): the convolution has no bias when a normalizer follows it (BN's
beta takes its role), and BN normalises each channel over the batch and all positions
(the paper's Section 3.2 for convolutional layers). The dense hidden layers of the head
are z = g(BN(W u)) in the same way; the logits layer keeps its bias.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_research import normalization
from bn_research.models.mlp import ACTIVATIONS


class SmallCNN(nn.Module):
  """conv(3x3)-[BN]-g-maxpool(2x2) blocks, then dense-[BN]-g hidden layers, then logits.

  Attributes:
    conv_features: output channels of each conv block (each block halves H and W).
    hidden_sizes: widths of the dense hidden layers of the head.
    num_classes: outputs of the final (softmax) layer.
    activation: 'relu', 'sigmoid' or 'tanh'.
    normalizer: 'batch_norm', 'virtual_batch_norm' or 'none' (see
      `normalization.get_normalizer`); BN/no-BN is this one attribute.
    bn_kwargs: passed to `normalization.get_normalizer`.
    dropout_rate: dropout after each dense hidden layer (0: none).
    dtype: computation dtype (logits are returned float32).
  """
  conv_features: Sequence[int] = (32, 64)
  hidden_sizes: Sequence[int] = (128,)
  num_classes: int = 10
  activation: str = 'relu'
  normalizer: str = 'batch_norm'
  bn_kwargs: Optional[dict] = None
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f'SmallCNN expects NHWC images, got shape {tuple(x.shape)}.')
    norm = normalization.get_normalizer(
        self.normalizer, use_running_average=not train, dtype=self.dtype,
        **(self.bn_kwargs or {}))
    g = ACTIVATIONS[self.activation]
    x = x.astype(self.dtype)
    for i, features in enumerate(self.conv_features):
      x = nn.Conv(features, (3, 3), padding='SAME', use_bias=norm is None,
                  dtype=self.dtype, name=f'conv_{i}')(x)
      if norm is not None:
        x = norm(name=f'conv_bn_{i}')(x)
      x = nn.max_pool(g(x), (2, 2), (2, 2), padding='SAME')
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden_sizes):
      x = nn.Dense(width, use_bias=norm is None, dtype=self.dtype, name=f'dense_{i}')(x)
      if norm is not None:
        x = norm(name=f'bn_{i}')(x)
      x = g(x)
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x).astype(jnp.float32)


def build(m: Any, *, num_classes: int, norm_kwargs: dict) -> SmallCNN:
  """The SmallCNN of the config's `model` part `m` (the registry's builder)."""
  return SmallCNN(conv_features=tuple(int(f) for f in m.conv_features),
                  hidden_sizes=tuple(int(h) for h in m.hidden_sizes),
                  num_classes=num_classes, activation=m.activation,
                  normalizer=m.normalizer, bn_kwargs=norm_kwargs,
                  dropout_rate=m.dropout_rate, dtype=jnp.dtype(m.dtype))
