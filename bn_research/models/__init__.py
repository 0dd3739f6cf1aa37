"""Models by name: a registry whose entries describe themselves.

Each model has one `ModelEntry` in `REGISTRY`: how to build it (`builder`, imported on
first use), the `model.*` keys it reads beyond the shared ones (spec and default), its
activations, the widths its normalizers see (group_norm's groups must divide them),
whether it has hidden layers whose nonlinearity inputs can be probed and measured, and
whether its inputs are images. The engine, the config validation, the probe and the
measurements ask the entry, never the model's name.

This module imports no JAX or Flax: the config's key specs (`model_keys`) and its
defaults (`default_model_config`) come from here, and a command validates its config
before it pays for those imports. `build_model` imports the model's file.

Adding a model: write its file (a Flax module and `build(m, *, num_classes,
norm_kwargs)`), and add one entry to `REGISTRY` (or `register(entry)` at run time);
docs/extending.md walks through it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import ml_collections

from bn_research import checks
from bn_research.models import inception_table
from bn_research.normalization import names as normalizer_names

DTYPES = ('float32', 'bfloat16', 'float16')
# group_norm's default number of groups is the largest divisor of the model's widths up
# to this (Wu & He's default G = 32).
MAX_DEFAULT_GROUPS = 32

# (spec, default) of a `model.*` key, e.g. (checks.Int(1), 4).
KeySpec = tuple


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """What the engine and the config need to know about one model.

  Attributes:
    name: the value of `model.name` that selects it.
    builder: `build(m, *, num_classes, norm_kwargs) -> flax module`, or
      'module.path:function' naming it (imported on first build, so that specs stay
      light).
    keys: {'model.key': (spec, default)} for the keys it reads beyond `SHARED_KEYS`. Two
      models may declare the same key only with the same spec and default.
    activations: the values of `model.activation` it accepts.
    normalized_widths: m -> the width of every layer a normalizer follows.
    hidden_widths: m -> the widths of its hidden layers, whose nonlinearity inputs it
      sows as `intermediates['hidden_{i}']` (the probe of Figure 1 and the Jacobian and
      saturation measurements read them); None: it has none.
    images: whether its inputs are NHWC images. Vmapped members then get the shared
      input broadcast to the member axis (`engine.programs.member_vmap`).
  """
  name: str
  builder: Union[str, Callable[..., Any]]
  keys: Mapping[str, KeySpec]
  activations: Sequence[str]
  normalized_widths: Callable[[ml_collections.ConfigDict], Sequence[int]]
  hidden_widths: Optional[Callable[[ml_collections.ConfigDict], Sequence[int]]] = None
  images: bool = True

  def build(self, m: ml_collections.ConfigDict, *, num_classes: int,
            norm_kwargs: Mapping[str, Any]) -> Any:
    """The Flax module for the config's `model` part `m` (importing the builder's
    module on first use)."""
    builder = self.builder
    if isinstance(builder, str):
      module, _, function = builder.partition(':')
      builder = getattr(importlib.import_module(module), function)
    return builder(m, num_classes=num_classes, norm_kwargs=dict(norm_kwargs))


# The keys every model reads (its normalizer's and the network-wide options).
SHARED_KEYS: dict[str, KeySpec] = {
    'model.name': (None, 'mlp'),  # spec: a choice of the registered names (`model_keys`)
    'model.normalizer': (checks.Choice(normalizer_names.NORMALIZERS), 'batch_norm'),
    'model.activation': (None, 'sigmoid'),  # spec: the union of every entry's
    'model.dropout_rate': (checks.Float(0.0, 1.0, high_open=True), 0.0),
    'model.bn_momentum': (checks.Float(0.0, 1.0), 0.99),
    'model.bn_epsilon': (checks.Float(0.0, low_open=True), 1e-5),
    # 0: statistics over the whole (global) batch.
    'model.virtual_batch_size': (checks.Int(0, note='0: the whole batch'), 0),
    'model.unbiased_running_var': (checks.Bool(), True),
    # group_norm's number of groups G; it must divide every normalized width. 0: the
    # model's own default (`default_norm_groups`), which always fits.
    'model.norm_groups': (checks.Int(0, note="group_norm groups; 0: the model's default"), 0),
    # batch_renorm (Ioffe 2017): r_max and d_max are 1 and 0 (plain BN) until
    # renorm_start_step, then relax linearly over renorm_ramp_steps to these values.
    'model.renorm_r_max': (checks.Float(1.0), 3.0),
    'model.renorm_d_max': (checks.Float(0.0), 5.0),
    'model.renorm_start_step': (checks.Int(0), 5000),
    'model.renorm_ramp_steps': (checks.Int(0), 20000),
    # noisy_batch_norm (Santurkar et al. 2018): per-step random y * s + b after BN with
    # s ~ U(1, 1 + bn_noise), b ~ U(-bn_noise, bn_noise) per unit.
    'model.bn_noise': (checks.Float(0.0, low_open=True, note='noisy_batch_norm strength'), 0.5),
    # Under pmap: pool BN statistics across replicas (True), or per replica (False, the
    # same as virtual_batch_size = per-device batch under jit).
    'model.bn_cross_replica': (checks.Bool(), True),
    'model.dtype': (checks.Choice(DTYPES), 'float32'),
}

_HIDDEN_SIZES = (checks.Ints(1, note='hidden layer widths'), (100, 100, 100))


def _ints(values: Sequence[Any]) -> list[int]:
  return [int(v) for v in values]


REGISTRY: dict[str, ModelEntry] = {
    'mlp': ModelEntry(
        name='mlp', builder='bn_research.models.mlp:build',
        keys={'model.hidden_sizes': _HIDDEN_SIZES,
              'model.init_stddev': (checks.Float(0.0, low_open=True), 0.1),
              # Keep each hidden dense layer's bias in front of the normalizer (the
              # paper's Section 2 setting, for `stop_gradient_batch_norm`).
              'model.pre_norm_bias': (checks.Bool(), False)},
        activations=('sigmoid', 'relu', 'tanh'),
        normalized_widths=lambda m: _ints(m.hidden_sizes),
        hidden_widths=lambda m: _ints(m.hidden_sizes), images=False),
    'inception': ModelEntry(
        name='inception', builder='bn_research.models.inception:build',
        keys={'model.use_lrn': (checks.Bool(), False),
              'model.width_multiplier': (checks.Float(0.0, low_open=True), 1.0),
              'model.small_inputs': (checks.Bool(), False),
              'model.stem_stride': (checks.Int(1, 2), 1)},
        activations=('relu', 'sigmoid'),
        normalized_widths=lambda m: inception_table.normalized_widths(m.width_multiplier)),
    'small_cnn': ModelEntry(
        name='small_cnn', builder='bn_research.models.small_cnn:build',
        keys={'model.conv_features': (checks.Ints(1, note='small_cnn conv widths'), (32, 64)),
              'model.hidden_sizes': _HIDDEN_SIZES},
        activations=('relu', 'sigmoid', 'tanh'),
        normalized_widths=lambda m: _ints(m.conv_features) + _ints(m.hidden_sizes)),
}


def register(entry: ModelEntry) -> None:
  """Adds a model to `REGISTRY`; ValueError for a taken name or a conflicting key."""
  if entry.name in REGISTRY:
    raise ValueError(f'model {entry.name!r} is registered already.')
  _merged_keys(list(REGISTRY.values()) + [entry])
  REGISTRY[entry.name] = entry


def entry_for(m: ml_collections.ConfigDict) -> ModelEntry:
  """The registry entry of the model `m` (a config's `model` part) names."""
  try:
    return REGISTRY[m.name]
  except (KeyError, TypeError):
    raise checks.fail('model.name', m.name,
                      'one of ' + ', '.join(map(repr, REGISTRY))) from None


def _merged_keys(entries: Sequence[ModelEntry]) -> dict[str, KeySpec]:
  """SHARED_KEYS and every entry's keys; ValueError naming a key two owners declare
  differently (one default per key: init2winit's rule for merged hyperparameters)."""
  merged = dict(SHARED_KEYS)
  owner = {k: 'the shared keys' for k in merged}
  for e in entries:
    for key, spec in e.keys.items():
      if key in merged and merged[key] != spec:
        raise ValueError(f'{key} is declared by {owner[key]} as {merged[key]!r} and by '
                         f'model {e.name!r} as {spec!r}; allowed: one spec and default.')
      merged[key] = spec
      owner.setdefault(key, f'model {e.name!r}')
  return merged


def model_keys() -> dict[str, checks.Spec]:
  """{'model.key': spec} for every `model.*` key of every registered model. A key one
  model ignores is still checked: a typo is an error even where it is ignored."""
  activations = tuple(dict.fromkeys(a for e in REGISTRY.values() for a in e.activations))
  specs = {key: spec for key, (spec, _) in _merged_keys(list(REGISTRY.values())).items()}
  specs['model.name'] = checks.Choice(tuple(REGISTRY))
  specs['model.activation'] = checks.Choice(activations)
  return specs


def default_model_config() -> ml_collections.ConfigDict:
  """The `model` section of `config.base_config`: every registered key's default."""
  m = ml_collections.ConfigDict()
  for key, (_, default) in _merged_keys(list(REGISTRY.values())).items():
    m[key.split('.', 1)[1]] = default
  return m


def reads(m: ml_collections.ConfigDict, key: str) -> bool:
  """Whether the model `m` names reads the `model.*` key `key`."""
  return key in SHARED_KEYS or key in entry_for(m).keys


def default_norm_groups(widths: Sequence[int]) -> int:
  """The largest divisor of every width up to MAX_DEFAULT_GROUPS (1 if nothing else)."""
  common = math.gcd(*widths) if widths else 1
  return max(d for d in range(1, min(common, MAX_DEFAULT_GROUPS) + 1) if common % d == 0)


def norm_groups(m: ml_collections.ConfigDict) -> int:
  """group_norm's groups: `model.norm_groups`, or the model's default for 0."""
  if m.norm_groups:
    return int(m.norm_groups)
  return default_norm_groups(entry_for(m).normalized_widths(m))


def validate_model_config(m: ml_collections.ConfigDict) -> None:
  """Checks the `model` part of a config; raises ValueError naming the bad value."""
  checks.check_keys(m, model_keys(), 'model.')
  entry = entry_for(m)
  if m.activation not in entry.activations:
    raise ValueError(f'model.activation={m.activation!r} is invalid: {entry.name} allows '
                     f'{", ".join(entry.activations)}.')
  if m.normalizer == 'group_norm' and m.norm_groups:
    widths = entry.normalized_widths(m)
    bad = sorted({w for w in widths if w % m.norm_groups})
    if bad:
      common = math.gcd(*widths)
      allowed = [d for d in range(1, common + 1) if common % d == 0]
      raise ValueError(f'model.norm_groups={m.norm_groups} does not divide the width '
                       f'{bad[0]} of a normalized layer of {entry.name}; allowed: '
                       f'{", ".join(map(str, allowed))} (or 0: the model\'s default, '
                       f'{default_norm_groups(widths)}).')


def renorm_schedule(m: ml_collections.ConfigDict) -> Any:
  """Batch renorm's `normalization.RenormSchedule` from the renorm_* keys (None unless
  `model.normalizer` is 'batch_renorm')."""
  if m.normalizer != 'batch_renorm':
    return None
  from bn_research import normalization  # pylint: disable=g-import-not-at-top
  return normalization.RenormSchedule(
      r_max=float(m.renorm_r_max), d_max=float(m.renorm_d_max),
      start_step=int(m.renorm_start_step), ramp_steps=int(m.renorm_ramp_steps))


def norm_kwargs(m: ml_collections.ConfigDict, axis_name: Optional[str]) -> dict:
  """The keyword arguments of `normalization.get_normalizer` (but the name) that `m`
  gives every normalizer of its model."""
  return dict(momentum=m.bn_momentum, epsilon=m.bn_epsilon, axis_name=axis_name,
              virtual_batch_size=m.virtual_batch_size or None,
              unbiased_running_var=m.unbiased_running_var,
              num_groups=norm_groups(m), renorm=renorm_schedule(m), noise=m.bn_noise)


def build_model(m: ml_collections.ConfigDict, *, num_classes: int,
                axis_name: Optional[str] = None) -> Any:
  """Builds the configured model (a Flax module).

  Args:
    m: the `model` part of a config.
    num_classes: size of the output layer.
    axis_name: pmap axis that BN pools its statistics over (None under jit, where
      statistics are over the global batch anyway).
  """
  return entry_for(m).build(m, num_classes=num_classes,
                            norm_kwargs=norm_kwargs(m, axis_name))
