"""The small conv net, its config, CIFAR-10 through TFDS, and the BN regularisation job."""

import json
import os
import sys
import types
from unittest import mock

import jax
import numpy as np
import pytest

from tests import helpers

sys.path.insert(0, helpers.REPO)
from configs import small_cnn  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import conv_bn_regularization as exp  # pylint: disable=g-import-not-at-top,wrong-import-position


def _build(normalizer):
  from bn_research import models
  c = small_cnn.get_config('bn,data=synthetic')
  c.model.normalizer = normalizer
  c.model.conv_features = (4, 6)
  c.model.hidden_sizes = (5,)
  return models.build_model(c.model, num_classes=3)


def test_bn_is_one_flag_and_normalises_each_conv_channel_over_batch_and_positions():
  images = np.random.default_rng(0).random((8, 12, 12, 1)).astype(np.float32) * 3 + 1
  bn, plain = _build('batch_norm'), _build('none')
  v_bn = jax.jit(lambda x: bn.init(jax.random.key(0), x, train=False))(images)
  v_plain = jax.eval_shape(lambda: plain.init(jax.random.key(0), images, train=False))
  assert set(v_bn['params']) == {'conv_0', 'conv_bn_0', 'conv_1', 'conv_bn_1', 'dense_0',
                                 'bn_0', 'logits'}
  assert 'bias' not in v_bn['params']['conv_0']  # BN's beta takes the bias's role
  assert set(v_plain['params']) == {'conv_0', 'conv_1', 'dense_0', 'logits'}
  assert 'bias' in v_plain['params']['conv_0'] and 'batch_stats' not in v_plain

  logits, state = jax.jit(lambda v, x: bn.apply(
      v, x, train=True, mutable=['batch_stats'], capture_intermediates=True))(v_bn, images)
  assert logits.shape == (8, 3) and logits.dtype == np.float32
  # Section 3.2: one mean and variance per channel, over the batch and all positions.
  for name, features in (('conv_bn_0', 4), ('conv_bn_1', 6)):
    z = np.asarray(state['intermediates'][name]['__call__'][0], np.float64)
    assert z.shape[-1] == features
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.var(axis=(0, 1, 2)), 1.0, rtol=2e-3)


def test_config_counts_epochs_and_is_valid():
  from bn_research import config as config_lib
  c = small_cnn.get_config('baseline,epochs=4,lr=0.05')
  config_lib.validate_config(c)
  assert c.model.name == 'small_cnn' and c.model.normalizer == 'none'
  assert c.batch_size == 32 and c.optimizer.learning_rate == 0.05
  assert c.eval_every_steps == c.log_every_steps == 60_000 // 32
  assert c.num_train_steps == 4 * (60_000 // 32)
  with pytest.raises(ValueError, match="unknown config argument 'epoch'"):
    small_cnn.get_config('bn,epoch=3')
  with pytest.raises(ValueError, match="data='svhn'"):
    small_cnn.get_config('bn,data=svhn')


def _fake_run(val_losses):
  from bn_research import experiment
  from bn_research import plan as plan_lib
  metrics = [{'step': 0, 'eval_loss': 2.3, 'eval_accuracy': 0.1}]
  for epoch, loss in enumerate(val_losses, 1):
    metrics.append({'step': 10 * epoch, 'train_loss': loss / 2, 'train_accuracy': 0.9,
                    'eval_loss': loss, 'eval_accuracy': 0.8 + 0.01 * epoch})
  return experiment.RunRecord(plan_lib.Run('bn', 'x', None), {'status': 'done'}, metrics,
                              {}, {})


def test_validation_loss_turning_upward_is_measured_from_its_minimum():
  s = exp.summarize_network(_fake_run([1.0, 0.7, 0.8, 0.9]), steps_per_epoch=10)
  assert s['epoch_of_min_val_loss'] == 2 and s['min_val_loss'] == 0.7
  assert s['val_loss_rise_after_min'] == pytest.approx(0.9 / 0.7 - 1)
  assert s['val_loss_turns_upward']
  assert [e for e, _ in s['val_loss']] == [0, 1, 2, 3, 4]
  assert [e for e, _ in s['train_loss']] == [1, 2, 3, 4]
  flat = exp.summarize_network(_fake_run([1.0, 0.7, 0.69, 0.72]), steps_per_epoch=10)
  assert not flat['val_loss_turns_upward']  # 4% above its minimum: noise, not a turn
  assert flat['best_val_accuracy'] == pytest.approx(0.84)


def test_cifar10_through_tfds_data_source(tmp_path):
  """CIFAR-10 as `tfds.testing.mock_data` serves it: (N, 32, 32, 3) images in [0, 1]."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from bn_research import data as data_lib
  from bn_research.data import tfds_source
  # What check_prepared looks for on disk (mock_data serves the records).
  version = str(tfds.builder_cls('cifar10').VERSION)
  prepared = tmp_path / 'cifar10' / version
  prepared.mkdir(parents=True)
  (prepared / 'dataset_info.json').write_text('{}')
  for split in ('train', 'test'):
    (prepared / f'cifar10-{split}.array_record-00000-of-00001').write_bytes(b'')
  config = data_lib.default_data_config(name='cifar10', source='tfds', data_dir=str(tmp_path))
  # TFDS 4.9.10's mock binds __getitems__ without its `self`; per-record reads are fine.
  getitems = lambda record_keys, generator, serialized=False: [generator[k] for k in record_keys]
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE), \
      mock.patch.object(tfds.testing.mocking, '_getitems', getitems):
    ds = data_lib.load_dataset(config)
  assert ds.train_images.shape == (6, 32, 32, 3) and ds.test_images.shape == (6, 32, 32, 3)
  assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
  assert ds.train_images.std() > 0.1  # decoded pixels, not zeros
  assert ds.name == 'cifar10 (tfds)' and ds.num_classes == 10
  assert tfds_source.check_prepared('cifar10', str(tmp_path / 'none'))[0] is None


def _job(tmp_path, *args):
  proc = helpers.run_module('experiments.conv_bn_regularization',
                            [f'--workdir={tmp_path}', '--data=synthetic', *args])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return helpers.read_json(tmp_path / 'conv_bn_regularization.json')


def test_job_trains_both_networks_and_writes_figure_and_summary(tmp_path):
  summary = _job(tmp_path, '--epochs=2', '--train_examples=320')
  per_epoch = 320 // 32
  for net in exp.NETWORKS:
    s = summary[net]
    assert s['status'] == 'done'
    assert [e for e, _ in s['val_accuracy']] == [0, 1, 2]
    assert [e for e, _ in s['train_accuracy']] == [1, 2]
    assert s['final_val_accuracy'] == s['val_accuracy'][-1][1]
    with open(tmp_path / net / 'config.json') as f:
      cfg = json.load(f)
    assert cfg['eval_every_steps'] == cfg['log_every_steps'] == per_epoch
    assert cfg['data']['num_train'] == 320
    assert cfg['model']['normalizer'] == ('batch_norm' if net == 'bn' else 'none')
  assert summary['val_accuracy_gap_final'] == pytest.approx(
      summary['bn']['final_val_accuracy'] - summary['baseline']['final_val_accuracy'])
  assert summary['steps'] == 2 * per_epoch
  assert os.path.getsize(tmp_path / 'conv_bn_regularization.png') > 10_000
  assert '| BN |' in (tmp_path / 'conv_bn_regularization.md').read_text()


def test_a_diverged_network_is_summarised_as_a_result(tmp_path):
  summary = _job(tmp_path, '--epochs=1', '--train_examples=64', '--lr=1e38')
  for net in exp.NETWORKS:
    assert summary[net]['status'] == 'diverged', summary[net]
  assert 'diverged' in (tmp_path / 'conv_bn_regularization.md').read_text()


def test_the_training_subset_is_written_once_and_read_as_idx(tmp_path):
  """Not synthetic: `prepare` writes N random training examples and the whole held-out
  split as IDX files; both runs read them (data.source=idx)."""
  from bn_research import data as data_lib
  args = types.SimpleNamespace(workdir=str(tmp_path / 'job'), data='fashion_mnist',
                               data_dir='', train_examples=40, seed=3, epochs=1,
                               steps=None, lr=None, overrides={})
  planned = exp.plan(args)
  assert planned[0].config.data.source != 'idx'
  assert not os.path.exists(args.workdir)  # planning writes nothing
  directory = exp.subset_dir(args.workdir, 'fashion_mnist', 40, 3)
  rng = np.random.default_rng(0)
  images = rng.random((100, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 100)
  loaded = types.SimpleNamespace(name='fake', train_images=images, train_labels=labels,
                                 test_images=images[:7], test_labels=labels[:7])
  with mock.patch.object(data_lib, 'load_dataset', return_value=loaded) as load:
    runs = exp.prepare(args, planned)
    exp.prepare(args, planned)  # a re-run finds the files and loads nothing
  assert load.call_count == 1
  for run, before in zip(runs, planned):
    assert (run.config.data.source, run.config.data.data_dir) == ('idx', directory)
    assert run.config.model.normalizer == before.config.model.normalizer
  keep = np.sort(np.random.default_rng(3).permutation(100)[:40])
  train = data_lib.read_idx(os.path.join(directory, 'train-images-idx3-ubyte'))
  np.testing.assert_array_equal(train.reshape(40, 28, 28),
                                np.round(images[keep, ..., 0] * 255).astype(np.uint8))
  assert len(data_lib.read_idx(os.path.join(directory, 't10k-labels-idx1-ubyte'))) == 7


@pytest.mark.parametrize('args, fragment', [
    (['--data=svhn'], "--data='svhn' is invalid: must be one of 'fashion_mnist', "
                      "'cifar10', 'synthetic'."),
    (['--lr=inf'], '--lr=inf'),
    (['--train_examples=-1'], '--train_examples=-1'),
    (['--train_examples=70000'], 'fashion_mnist has only 60000 training examples'),
    (['stray'], 'unexpected arguments: stray'),
])
def test_bad_flag_is_one_line_and_exit_code_2(tmp_path, args, fragment):
  proc = helpers.run_module('experiments.conv_bn_regularization',
                            [f'--workdir={tmp_path}/out', *args])
  assert proc.returncode == 2, proc.stderr[-2000:]
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith('conv_bn_regularization: error: ') and fragment in line, line
  assert not os.listdir(tmp_path)
