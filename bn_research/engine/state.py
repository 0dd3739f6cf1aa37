"""A member's train state, its randomness, and the hyperparameters a member sweep traces.

A run is K members that share one model structure. The values that differ between
members change numbers, not shapes (`SWEEPABLE`); inside a compiled program they are
traced per-member scalars (`hparams`), everywhere else they are the member's config.
`overlay` lets the model and optimizer builders read a config section in which some
values are such traced scalars, so one builder serves plain runs and sweeps.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Keys a member sweep can vmap: they change values, not shapes or code. -> stored type.
SWEEPABLE = {
    'optimizer.learning_rate': float,
    'optimizer.momentum': float,
    'optimizer.weight_decay': float,
    'optimizer.decay_rate': float,
    'model.init_stddev': float,
    'model.dropout_rate': float,
    'model.bn_momentum': float,
    'seed': int,
}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def run_keys(seed) -> tuple[jax.Array, jax.Array]:
  """(init key, state key) of a run: the only place a run's randomness comes from.

  `seed` may be traced (a seed sweep). Initialisers draw from an 'rbg' key: XLA
  compiles its generator far faster than threefry's, which matters for Inception's ~70
  initialisers on CPU. The state key (dropout) is a classic threefry key, stored in
  checkpoints as two uint32s.
  """
  init_key = jax.random.key(seed, impl='rbg')
  state_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  return init_key, state_key


class overlay:  # pylint: disable=invalid-name
  """A read-only view of a config section with some values replaced (e.g. by tracers).

  ConfigDicts type-check assignments, so traced values cannot be stored in one; the
  builders only read attributes, which this view answers from `values` first.
  """

  def __init__(self, node: Any, values: Mapping[str, Any]):
    self._node = node
    self._values = dict(values)

  def __getattr__(self, name: str) -> Any:
    if name.startswith('_'):
      raise AttributeError(name)
    if name in self._values:
      return self._values[name]
    return getattr(self._node, name)

  __getitem__ = __getattr__


def section_values(hparams: Mapping[str, Any], section: str) -> dict:
  """The traced values of one config section: {'optimizer.momentum': m} -> {'momentum': m}."""
  prefix = section + '.'
  return {k[len(prefix):]: v for k, v in hparams.items() if k.startswith(prefix)}


def member_value(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def stack_hparams(configs: Sequence[ml_collections.ConfigDict],
                  keys: Sequence[str]) -> dict[str, np.ndarray]:
  """Per-member values of the swept `keys`, as (K,) arrays (int32 seeds, float32 others)."""
  out = {}
  for key in keys:
    kind = SWEEPABLE[key]
    out[key] = np.asarray([member_value(c, key) for c in configs],
                          np.int32 if kind is int else np.float32)
  return out


def count_params(params: Any, *, leading_axis: bool = False) -> int:
  """Parameters of one member; leading_axis: every leaf has a member (or device) axis."""
  skip = 1 if leading_axis else 0
  return sum(int(math.prod(x.shape[skip:])) for x in jax.tree_util.tree_leaves(params))


def tree_all_finite(tree: Any) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def stack_states(states: Sequence[Any]) -> Any:
  """Per-member host states -> one state with a leading member axis (on the host)."""
  return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                *states)


def unstack_state(state: Any, count: Optional[int] = None) -> list[Any]:
  """A state with a leading member axis -> per-member host states (NumPy leaves).

  Sliced on the host: indexing device arrays would compile one program per leaf shape.
  """
  host = jax.device_get(state)
  if count is None:
    count = len(np.asarray(host.step))
  return [jax.tree_util.tree_map(lambda x, k=k: np.array(x[k]), host) for k in range(count)]
