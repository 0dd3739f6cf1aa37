"""The model registry: entries that describe themselves, checked against the models.

Each entry's claims (normalized widths, hidden layers, activations) are compared with
what the built network actually holds; a model registered at test time trains through
the engine with no other edit; group_norm works on every model without naming groups.
"""

import math
import re
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bn_research import checks
from bn_research import config as config_lib
from bn_research import models
from bn_research import normalization
from bn_research import optim
from bn_research import train
from tests import helpers

sys.path.insert(0, helpers.REPO)
from configs import inception_small, mnist_mlp, small_cnn  # noqa: E402


# ------------------------------------------------------------------ a model added here


class TinyNet(nn.Module):
  """dense (no bias) -> normalizer -> activation -> logits: the smallest model with a
  normalizer, for the registry tests."""
  width: int
  num_classes: int
  normalizer: str
  activation: str
  norm_kwargs: dict

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = normalization.get_normalizer(self.normalizer, use_running_average=not train,
                                        **self.norm_kwargs)
    x = nn.Dense(self.width, use_bias=norm is None, name='hidden')(x.reshape((x.shape[0], -1)))
    if norm is not None:
      x = norm(name='norm')(x)
    x = {'relu': nn.relu, 'sigmoid': nn.sigmoid}[self.activation](x)
    return nn.Dense(self.num_classes, name='logits')(x)


def build_tiny(m, *, num_classes, norm_kwargs):
  return TinyNet(width=int(m.tiny_width), num_classes=num_classes, normalizer=m.normalizer,
                 activation=m.activation, norm_kwargs=norm_kwargs)


TINY = models.ModelEntry(
    name='tiny', builder=build_tiny,
    keys={'model.tiny_width': (checks.Int(1, note='tiny hidden width'), 12)},
    activations=('relu', 'sigmoid'), normalized_widths=lambda m: [int(m.tiny_width)],
    images=False)


@pytest.fixture
def tiny():
  models.register(TINY)
  yield TINY
  del models.REGISTRY['tiny']


def tiny_config(**overrides):
  c = helpers.tiny_mlp_config()
  c.model.name = 'tiny'
  c.probe.enabled = False  # the tiny model sows no hidden layers
  return helpers.set_keys(c, overrides)


def test_a_registered_model_trains_through_the_engine(tiny, tmp_path):
  c = tiny_config()
  assert c.model.tiny_width == 12  # its key is in the schema, with its default
  result = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert result['status'] == 'done'
  rows = helpers.read_jsonl(str(tmp_path / 'run' / 'metrics.jsonl'))
  losses = [r['train_loss'] for r in rows if 'train_loss' in r]
  assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
  saved = helpers.read_json(str(tmp_path / 'run' / 'config.json'))
  assert saved['model']['name'] == 'tiny' and saved['model']['tiny_width'] == 12
  # Its own key is validated like any other.
  with pytest.raises(ValueError, match=r'model.tiny_width=0 is invalid'):
    config_lib.validate_config(tiny_config(**{'model.tiny_width': 0}))


def test_the_engine_asks_the_entry_not_the_name(tiny):
  # No hidden layers declared: the probe and the hidden-layer measurements are refused
  # in one line each, and a key the model does not read cannot be swept.
  with pytest.raises(ValueError, match=r"^probe.enabled=True: .*model.name='tiny'"):
    config_lib.validate_config(tiny_config(**{'probe.enabled': True}))
  with pytest.raises(ValueError, match=r"^measure.saturation=True .*model.name='tiny'"):
    config_lib.validate_config(tiny_config(**{'measure.every_steps': 5,
                                              'measure.saturation': True}))
  with pytest.raises(train.SweepError, match=r"model.init_stddev is not read by "
                                             r"model.name='tiny'"):
    train.check_sweepable(tiny_config(), ['model.init_stddev'])
  train.check_sweepable(tiny_config(), ['model.bn_momentum'])  # a shared key: fine
  with pytest.raises(ValueError, match=r"model.activation='tanh' is invalid: tiny allows"):
    config_lib.validate_config(tiny_config(**{'model.activation': 'tanh'}))


def test_register_refuses_a_taken_name_and_a_conflicting_key(tiny):
  with pytest.raises(ValueError, match="'tiny' is registered already"):
    models.register(TINY)
  clash = models.ModelEntry(
      name='clash', builder=build_tiny,
      keys={'model.hidden_sizes': (checks.Ints(1), (7,))}, activations=('relu',),
      normalized_widths=lambda m: [7])
  with pytest.raises(ValueError, match=r"model.hidden_sizes is declared by model 'mlp'.*"
                                       r"by model 'clash'"):
    models.register(clash)
  assert 'clash' not in models.REGISTRY


# ------------------------------------------------------------------ entries vs models


def model_configs():
  """Each registered model's config file, as shipped (widths untouched)."""
  return {'mlp': mnist_mlp.get_config('bn,source=synthetic'),
          'small_cnn': small_cnn.get_config('bn,data=synthetic'),
          'inception': inception_small.get_config('model=bn_baseline,data=synthetic')}


def test_every_model_has_a_config_file_here():
  assert set(model_configs()) == set(models.REGISTRY)


def sample_input(c):
  if models.entry_for(c.model).images:
    return np.zeros((2, 28, 28, 1), np.float32)
  return np.zeros((2, 8, 8, 1), np.float32)


@pytest.mark.parametrize('name', ['mlp', 'small_cnn', 'inception'])
def test_entry_widths_are_the_models_normalized_widths(name):
  # The widths the entry declares (which group_norm's groups must divide) are the
  # widths of the normalizers in the built network, read from its parameters.
  c = model_configs()[name]
  c.model.normalizer = 'group_norm'
  model = models.build_model(c.model, num_classes=10)
  shapes = jax.eval_shape(lambda x: model.init({'params': jax.random.PRNGKey(0)}, x,
                                               train=False), sample_input(c))
  params = shapes['params']
  found = []
  for path in optim.normalizer_modules(params):
    node = params
    for p in path:
      node = node[p]
    found.append(node['scale'].shape[-1])
  assert sorted(found) == sorted(models.entry_for(c.model).normalized_widths(c.model))


@pytest.mark.parametrize('name', ['mlp', 'small_cnn', 'inception'])
def test_entry_hidden_layers_are_what_the_model_sows(name):
  c = model_configs()[name]
  entry = models.entry_for(c.model)
  model = models.build_model(c.model, num_classes=10)
  x = sample_input(c)
  variables = jax.eval_shape(lambda x: model.init({'params': jax.random.PRNGKey(0)}, x,
                                                  train=False), x)
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=False,
                                                     mutable=['intermediates']),
                            variables, x)
  sown = {k: v[0].shape[-1] for k, v in state.get('intermediates', {}).items()
          if re.fullmatch(r'hidden_\d+', k)}
  if entry.hidden_widths is None:
    assert not sown
  else:
    assert sown == {f'hidden_{i}': w for i, w in enumerate(entry.hidden_widths(c.model))}


def test_entry_activations_are_the_models():
  from bn_research.models import inception, mlp  # pylint: disable=g-import-not-at-top
  assert set(models.REGISTRY['mlp'].activations) == set(mlp.ACTIVATIONS)
  assert set(models.REGISTRY['small_cnn'].activations) == set(mlp.ACTIVATIONS)
  assert set(models.REGISTRY['inception'].activations) == set(inception.ACTIVATIONS)


# ------------------------------------------------------------------ group_norm's groups


def divisors(n):
  return {d for d in range(1, n + 1) if n % d == 0}


@pytest.mark.parametrize('name', ['mlp', 'small_cnn', 'inception'])
def test_default_groups_are_the_largest_common_divisor_up_to_32(name):
  c = model_configs()[name]
  c.model.normalizer = 'group_norm'
  widths = models.entry_for(c.model).normalized_widths(c.model)
  common = set.intersection(*(divisors(w) for w in widths))
  assert models.norm_groups(c.model) == max(d for d in common if d <= 32)
  config_lib.validate_config(c)  # the default needs no setting


def test_default_groups_of_the_shipped_models():
  # Worked by hand: the MLP's 100-unit layers (divisors <= 32: 1, 2, 4, 5, 10, 20, 25);
  # the small CNN's 16, 32, 64 channels; Inception at width 1/8, whose widths 8, 12,
  # 20, 28, 44 (among others) share 1, 2, 4.
  got = {name: models.norm_groups(c.model) for name, c in model_configs().items()}
  assert got == {'mlp': 25, 'small_cnn': 16, 'inception': 4}


def test_an_explicit_bad_group_count_names_key_value_and_divisors():
  c = model_configs()['mlp']
  c.model.normalizer = 'group_norm'
  c.model.norm_groups = 8
  with pytest.raises(ValueError) as err:
    config_lib.validate_config(c)
  message = str(err.value)
  assert message.startswith('model.norm_groups=8 ') and '\n' not in message, message
  assert 'allowed: 1, 2, 4, 5, 10, 20, 25, 50, 100' in message, message
  c.model.norm_groups = 20
  config_lib.validate_config(c)  # an explicit divisor is kept
  assert models.norm_groups(c.model) == 20


@pytest.mark.parametrize('name', ['mlp', 'small_cnn', 'inception'])
def test_group_norm_works_out_of_the_box_on_every_model(name, tmp_path):
  # Only the normalizer changes from the config file, plus the run's length and data
  # size (the widths, which decide the groups, are the file's).
  c = model_configs()[name]
  c.model.normalizer = 'group_norm'
  helpers.set_keys(c, {'num_train_steps': 3, 'steps_per_dispatch': 1, 'log_every_steps': 1,
                       'eval_every_steps': 3, 'checkpoint_every_steps': 3,
                       'batch_size': 8, 'eval_batch_size': 32, 'num_eval_examples': 32,
                       'data.num_train': 64, 'data.num_test': 32,
                       'eval.batch_stats': 'moving_average'})
  if c.probe.enabled:
    c.probe.num_examples = 32
  result = train.train_and_evaluate(c, str(tmp_path / name))
  assert result['status'] == 'done', result
  rows = helpers.read_jsonl(str(tmp_path / name / 'metrics.jsonl'))
  assert all(math.isfinite(r['train_loss']) for r in rows if 'train_loss' in r)


# ------------------------------------------------------------------ light specs


def test_config_validation_imports_neither_jax_nor_flax():
  done = helpers.run_python(
      'import sys\n'
      'from bn_research import config\n'
      'c = config.base_config(); config.validate_config(c); config.key_specs(c)\n'
      'print(sorted(m for m in ("jax", "flax") if m in sys.modules))\n')
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == '[]', done.stdout
