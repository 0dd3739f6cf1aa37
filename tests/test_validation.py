"""Config validation: every key of every shipped config refuses its bad values in one line,
before anything is written (issue 14, item 2)."""

import hashlib
import math
import os
import re

import ml_collections
import pytest

from bn_research import checks
from bn_research import config as config_lib
from tests import helpers


def _shipped_configs(tmp_path):
  """(label, config) for base_config and the configs in configs/ that need no data on
  this machine beyond what the test makes."""
  helpers.tiny_mlp_config()  # puts the repository on sys.path for `configs`
  from configs import imagenet_inception, inception_small, mnist_mlp
  imagenet = imagenet_inception.get_config('')
  imagenet.data.data_dir = str(tmp_path)  # validation only checks that it exists
  return [
      ('base_config', config_lib.base_config()),
      ('mnist_mlp:bn', mnist_mlp.get_config('bn')),
      ('mnist_mlp:baseline', mnist_mlp.get_config('baseline')),
      ('inception_small', inception_small.get_config('model=bn_x5,data=synthetic')),
      ('imagenet_inception', imagenet),
  ]


def _with(config, key, value):
  """A copy of `config` with `key` set to `value`, any type (as a config file could).

  Built from a plain dict: assigning into a ConfigDict converts some values
  (True into 1.0 for a float key), so the bad value would never reach validation.
  """
  tree = config.to_dict()
  node = tree
  *path, last = key.split('.')
  for part in path:
    node = node[part]
  node[last] = value
  copy = ml_collections.ConfigDict(tree)
  assert checks.flat_keys(copy)[key] is value or checks.flat_keys(copy)[key] == value
  return copy


def _refused(config, key, num_devices=1) -> str:
  with pytest.raises(ValueError) as info:
    config_lib.validate_config(config, num_devices=num_devices)
  message = str(info.value)
  assert '\n' not in message, message
  return message


def _names_key(message, key):
  # 'seed=' must not match inside 'data.split_seed='.
  return re.search(rf'(^|[^\w.]){re.escape(key)}\b', message) is not None


def test_every_key_refuses_its_bad_values(tmp_path):
  """Property test over every key: each value its spec calls bad (negative, zero, nan,
  inf, wrong type, out of range...) is refused with one line naming the key. The good
  config validates first, so the refusal is the bad value's doing."""
  checked = 0
  for label, config in _shipped_configs(tmp_path):
    config_lib.validate_config(config, num_devices=1)
    specs = config_lib.key_specs(config)
    flat = checks.flat_keys(config)
    undeclared = sorted(set(flat) - set(specs))
    assert not undeclared, (
        f'{label}: keys without a spec {undeclared}; declare each next to the code that '
        'reads it (config.CORE_KEYS, a models.REGISTRY entry, data.DATA_KEYS, '
        'imagenet.IMAGENET_KEYS)')
    for key, spec in sorted(specs.items()):
      if key not in flat:
        continue
      bad_values = spec.bad_values()
      assert bad_values, key
      for bad in bad_values:
        message = _refused(_with(config, key, bad), key)
        assert _names_key(message, key), (label, key, bad, message)
        checked += 1
  # Also a real count of the cases covered, in case a refactor empties the tables.
  assert checked > 300


def test_spec_bad_values_cover_the_classes_the_issue_names():
  """Each kind of spec offers what issue 14 lists: negative/zero, nan, inf, wrong type."""
  def kinds(values):
    out = set()
    for v in values:
      if isinstance(v, bool) or isinstance(v, str) or v is None:
        out.add('type')
      elif isinstance(v, float) and math.isnan(v):
        out.add('nan')
      elif isinstance(v, float) and math.isinf(v):
        out.add('inf')
      elif isinstance(v, (int, float)) and v <= 0:
        out.add('nonpositive')
    return out
  assert {'type', 'nonpositive'} <= kinds(checks.Int(1).bad_values())
  assert {'type', 'nan', 'inf', 'nonpositive'} <= kinds(
      checks.Float(0.0, low_open=True).bad_values())
  # And the specs accept what they should: ints for floats, the bounds where closed.
  checks.Float(0.0, 1.0).check('k', 1)
  checks.Float(0.0, 1.0, high_open=True).check('k', 0.0)
  checks.Int(0, 3).check('k', 3)
  checks.Ints(1).check('k', [100, 1])
  checks.Range(0.0, 1.0).check('k', (0.5, 1.0))
  checks.Floats(0.0, 100.0).check('k', (0, 100))
  with pytest.raises(ValueError, match=r'^k='):
    checks.Floats(0.0, low_open=True).check('k', (0.1, 0.0))
  for spec, value in ((checks.Float(0.0, 1.0, high_open=True), 1.0),
                      (checks.Int(0, 3), 4), (checks.Float(0.0, low_open=True), 0.0)):
    with pytest.raises(ValueError, match=r'^k='):
      spec.check('k', value)


@pytest.mark.parametrize('overrides, key, num_devices', [
    # Indices past the model wrap around in Python: probe 500 of 100 units records unit 99.
    ({'probe.unit': 100}, 'probe.unit', 1),
    ({'probe.layer': 3}, 'probe.layer', 1),
    ({'probe.layer': -4}, 'probe.layer', 1),
    ({'model.hidden_sizes': (100, 7), 'probe.layer': 1, 'probe.unit': 7}, 'probe.unit', 1),
    ({'model.name': 'inception', 'model.activation': 'relu'}, 'probe.enabled', 1),
    # Batches must split over the devices for training AND evaluation.
    ({'eval_batch_size': 999}, 'eval_batch_size', 2),
    ({'batch_size': 61}, 'batch_size', 2),
    ({'data.source': 'auto', 'data.download_url': 'ftp://mirror/'}, 'data.download_url', 1),
    ({'data.name': 'mnist', 'data.source': 'download', 'data.download_url': 'none'},
     'data.download_url', 1),
    ({'compiler_options': 'not an option'}, 'compiler_options', 1),
])
def test_keys_checked_against_each_other(overrides, key, num_devices):
  config = helpers.tiny_mlp_config(**{'model.hidden_sizes': (100, 100, 100)})
  for k, v in overrides.items():
    config = _with(config, k, v)
  message = _refused(config, key, num_devices)
  assert _names_key(message, key), message


def test_probe_indices_inside_the_model_pass():
  for layer, unit in ((-3, 0), (2, 15), (-1, 15), (0, 0)):
    config = helpers.tiny_mlp_config(**{'model.hidden_sizes': (16, 16, 16), 'probe.layer': layer,
                                        'probe.unit': unit})
    config_lib.validate_config(config, num_devices=1)


def test_check_config_path(tmp_path):
  config_file = tmp_path / 'c.py'
  config_file.write_text('')
  config_lib.check_config_path(f'{config_file}:bn')
  for arg, needle in ((str(tmp_path), 'is a directory'),
                      (f'{tmp_path}/missing.py:bn', 'no such file'), ('', 'no file')):
    with pytest.raises(ValueError, match=needle) as info:
      config_lib.check_config_path(arg)
    assert '\n' not in str(info.value)


# ---------------------------------------------------------------- through the launcher


def _tree_digest(root) -> dict:
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_bad_input_exits_2_in_one_line_and_leaves_the_workdir_alone(tmp_path, fast_compiles):
  """`bn_research.main` with --overwrite on a finished run: a bad value or a bad data
  file is one stderr line and exit code 2, and the run's files stay byte for byte."""
  from bn_research import data as data_lib
  from bn_research import train
  workdir = tmp_path / 'run'
  train.train_and_evaluate(
      helpers.tiny_mlp_config(num_train_steps=10, eval_every_steps=10,
                              checkpoint_every_steps=10, log_every_steps=10), str(workdir))
  before = _tree_digest(workdir)
  assert 'config.json' in before and 'status.json' in before

  # An IDX directory with one file missing.
  idx_dir = tmp_path / 'idx'
  idx_dir.mkdir()
  import numpy as np
  data_lib.write_idx(str(idx_dir / 'train-images-idx3-ubyte.gz'),
                     np.zeros((4, 8, 8), np.uint8))
  base = ['--config=configs/mnist_mlp.py:bn,source=synthetic', f'--workdir={workdir}',
          '--overwrite']
  cases = [
      (['--config.seed=-1'], 'seed=-1'),
      (['--config.probe.unit=500'], 'probe.unit=500'),
      (['--config.data.name=mnist', '--config.data.source=idx',
        f'--config.data.data_dir={idx_dir}'], 'train-labels-idx1-ubyte'),
  ]
  for extra, needle in cases:
    proc = helpers.run_main(base + extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith('bn_research: error')]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert _tree_digest(workdir) == before, extra
  assert sorted(os.listdir(tmp_path)) == ['idx', 'run']  # nothing moved aside
