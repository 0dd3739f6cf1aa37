"""Layers whose hyperparameters may be traced values, so that a member sweep can vmap them.

`flax.linen.Dropout` branches in Python on its rate (`if rate == 0`), which a traced,
per-member rate cannot do. `Dropout` here draws the same Bernoulli keep-mask from the
'dropout' rng and only skips work when the rate is a Python zero.
"""

from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def is_static_zero(value: Any) -> bool:
  """True for a Python number equal to 0 (never for a traced value)."""
  return isinstance(value, numbers.Real) and value == 0


class Dropout(nn.Module):
  """Inverted dropout: keeps each unit with probability 1 - rate and scales it by 1/(1 - rate).

  Attributes:
    rate: the drop probability in [0, 1); a Python float or a traced scalar.
  """
  rate: Any = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or is_static_zero(self.rate):
      return x
    keep = 1.0 - jnp.asarray(self.rate, jnp.float32)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, x.shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))
