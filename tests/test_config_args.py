"""The one config-argument parser (configs/common.py) and the one config loader."""

from __future__ import annotations

import pytest

from bn_research import config_files
from configs import common


def test_parse_arg_types_defaults_and_the_leading_word():
  args = common.parse_arg('baseline,lr=0.5,steps=7,fast',
                          variant=('bn', ('bn', 'baseline')), lr=(None, float),
                          steps=100, fast=False, source=(None, str))
  assert dict(args) == {'variant': 'baseline', 'lr': 0.5, 'steps': 7, 'fast': True,
                        'source': None}
  assert isinstance(args.steps, int) and isinstance(args.lr, float)
  assert dict(common.parse_arg('', variant=('bn', ('bn', 'baseline')), steps=100)) == {
      'variant': 'bn', 'steps': 100}
  assert common.parse_arg('model=bn_x5', model=('bn_x30', common.INCEPTION_MODELS)
                          ).model == 'bn_x5'


@pytest.mark.parametrize('arg,names', [
    ('bn,lr=abc', ["lr='abc'", 'finite number']),
    ('bn,lr=nan', ["lr='nan'", 'finite number']),
    ('bn,steps=1.5', ["steps='1.5'", 'integer']),
    ('resnet', ["variant='resnet'", 'bn, baseline']),
    ('bn,zz=1', ["'zz'", 'allowed: variant, lr, steps']),
    ('bn,lr=1,lr=2', ["'lr'", 'twice']),
    ('bn,3', ["'3'", 'key=value']),
])
def test_a_bad_config_argument_names_the_key_the_value_and_what_is_allowed(arg, names):
  with pytest.raises(ValueError) as error:
    common.parse_arg(arg, variant=('bn', ('bn', 'baseline')), lr=(None, float),
                     steps=100)
  message = str(error.value)
  assert '\n' not in message
  for name in names:
    assert name in message


@pytest.mark.parametrize('spec,overrides,names', [
    ('configs/mnist_mlp.py:bn,lr=abc', [], ["lr='abc'", 'finite number']),
    ('configs/inception_small.py:model=bn_x99', [], ["model='bn_x99'", 'bn_x30']),
    ('configs/no_such.py', [], ['configs/no_such.py', 'does not exist']),
    ('configs', [], ["'configs' is a directory"]),
    ('configs/mnist_mlp.py', ['--config.optimizer.lr=3'], ['lr', 'no config key']),
    ('configs/mnist_mlp.py', ['--config.seed=x'], ['--config.seed=x']),
])
def test_load_config_errors_are_one_line(spec, overrides, names):
  with pytest.raises(ValueError) as error:
    config_files.load_config(spec, overrides)
  message = str(error.value)
  assert '\n' not in message
  for name in names:
    assert name in message


def test_load_config_applies_the_argument_and_typed_overrides():
  c = config_files.load_config('configs/mnist_mlp.py:baseline,steps=30',
                               ['--config.optimizer.learning_rate=1'])
  assert c.model.normalizer == 'none' and c.num_train_steps == 30
  assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
