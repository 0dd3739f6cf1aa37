"""The MNIST network of the paper's Section 4.1: fully connected layers, sigmoid.

With a normalizer, each hidden layer is z = g(BN(W u)): the dense layer has no bias
(BN's beta takes its role) and BN sits between the matmul and the nonlinearity. The
same holds for every normalizer of `normalization.NORMALIZERS` (each has a beta).
For a dense layer, `layer_norm` normalizes each example over the layer's units and
`group_norm` over each group of units / G consecutive units (G = `num_groups` in
bn_kwargs); G = units would normalize single values and is useless here.
`pre_norm_bias=True` keeps the dense layer's bias b in front of the normalizer,
z = g(N(W u + b)): the setting of the paper's Section 2 argument, where BN makes b
redundant (its gradient is zero) and a normalizer whose statistics bypass the gradient
(`stop_gradient_batch_norm`) lets b drift without changing the output.
The input to every nonlinearity is sown into the `intermediates` collection as
`hidden_{i}` so the activation tracker (Figure 1) can read it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_research import normalization
from bn_research.models import layers

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'sigmoid': nn.sigmoid,
    'relu': nn.relu,
    'tanh': jnp.tanh,
}


class MLP(nn.Module):
  """Multi-layer perceptron with an optional normalizer before each nonlinearity.

  Attributes:
    hidden_sizes: width of each hidden layer (the paper: 100, 100, 100).
    num_classes: outputs of the final (softmax) layer.
    activation: 'sigmoid' (the paper), 'relu' or 'tanh'.
    normalizer: a name from `normalization.NORMALIZERS` ('batch_norm',
      'virtual_batch_norm', 'batch_renorm', 'noisy_batch_norm', 'layer_norm',
      'group_norm') or 'none'.
    init_stddev: stddev of the Gaussian initialisation of every dense kernel
      ("small random Gaussian values").
    bn_kwargs: passed to `normalization.get_normalizer`.
    dropout_rate: dropout after each hidden nonlinearity (0: none).
    pre_norm_bias: keep each hidden dense layer's bias in front of the normalizer
      (always kept without one).
    dtype: computation dtype.
  """
  hidden_sizes: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  activation: str = 'sigmoid'
  normalizer: str = 'batch_norm'
  init_stddev: float = 0.1
  bn_kwargs: Optional[dict] = None
  dropout_rate: float = 0.0
  pre_norm_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    norm = normalization.get_normalizer(
        self.normalizer, use_running_average=not train, dtype=self.dtype,
        **(self.bn_kwargs or {}))
    g = ACTIVATIONS[self.activation]
    init = nn.initializers.normal(self.init_stddev)
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.Dense(width, use_bias=norm is None or self.pre_norm_bias,
                   kernel_init=init, dtype=self.dtype,
                   name=f'dense_{i}')(x)
      if norm is not None:
        x = norm(name=f'bn_{i}')(x)
      self.sow('intermediates', f'hidden_{i}', x)
      x = g(x)
      if not layers.is_static_zero(self.dropout_rate):
        x = layers.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype,
                    name='logits')(x).astype(jnp.float32)


def build(m: Any, *, num_classes: int, norm_kwargs: dict) -> MLP:
  """The MLP of the config's `model` part `m` (the registry's builder)."""
  return MLP(hidden_sizes=tuple(int(h) for h in m.hidden_sizes), num_classes=num_classes,
             activation=m.activation, normalizer=m.normalizer,
             init_stddev=m.init_stddev, bn_kwargs=norm_kwargs,
             dropout_rate=m.dropout_rate, pre_norm_bias=m.pre_norm_bias,
             dtype=jnp.dtype(m.dtype))
