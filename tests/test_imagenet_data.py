"""Tests of the ImageNet pipeline (bn_research.data.imagenet), without ImageNet and
without TensorFlow.

Three kinds of stand-in data:
* `tfds.testing.mock_data`: the real `tfds.builder('imagenet2012').as_data_source`
  call, answered with random uint8 images (5-50 px a side) and labels. It works
  without TensorFlow as long as TFDS itself decodes the images (the default).
* `_FakeSource`: a plain in-memory sequence with images we control (exact pixel
  checks, JPEG bytes, grayscale).
* A tiny TFDS builder written to real ArrayRecord files (no TensorFlow needed when
  images are given as JPEG bytes), to read the on-disk path without mocks.
"""

import importlib.util
import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

import tensorflow_datasets as tfds

from bn_research.data import imagenet

NUM_MOCK = 10


def _config(data_dir, **overrides) -> ml_collections.ConfigDict:
  overrides.setdefault('image_size', 24)
  overrides.setdefault('num_workers', 0)       # worker processes: test_grain_input.py
  overrides.setdefault('prefetch', 2)
  return imagenet.imagenet_data_config(data_dir=str(data_dir), **overrides)


def _pattern(index: int, height: int, width: int) -> np.ndarray:
  """A smooth, index-dependent uint8 RGB image (so crops and colours are visible)."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  r = 40 + 150 * xx / max(width - 1, 1)
  g = 40 + 150 * yy / max(height - 1, 1)
  b = np.full_like(r, 30 + (37 * index) % 180)
  return np.stack([r, g, b], -1).astype(np.uint8)


def _jpeg(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, 'JPEG', quality=95)
  return buf.getvalue()


class _FakeSource:
  """Random-access source: image i is `_pattern(i)`, label i (mod 1000)."""

  def __init__(self, n, height=40, width=56, encode=False):
    self.n, self.height, self.width, self.encode = n, height, width, encode

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    image = _pattern(i, self.height, self.width)
    return {'image': _jpeg(image) if self.encode else image, 'label': i % 1000}


def _pipeline(n=12, *, eval_n=None, batch_size=4, seed=0, process_index=0, process_count=1,
              config=None, **overrides):
  return imagenet.ImageNetPipeline(
      config or _config('/unused', **overrides), batch_size=batch_size, seed=seed,
      process_index=process_index, process_count=process_count,
      train_source=_FakeSource(n), eval_source=_FakeSource(eval_n or n))


@pytest.fixture
def mock_imagenet():
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    yield


def _take(iterator, k):
  out = [next(iterator) for _ in range(k)]
  if hasattr(iterator, 'close'):
    iterator.close()
  return out


# ---- config ---------------------------------------------------------------------

def test_config_defaults_and_overrides(tmp_path):
  c = imagenet.imagenet_data_config()
  assert (c.name, c.source, c.image_size, c.num_classes) == ('imagenet2012', 'tfds', 224, 1000)
  assert (c.distortions, c.shuffle) == ('full', 'thorough')
  c = imagenet.imagenet_data_config(data_dir=tmp_path, distortions='reduced', image_size=64)
  assert (c.data_dir, c.distortions, c.image_size) == (str(tmp_path), 'reduced', 64)
  imagenet.validate_imagenet_config(c)
  with pytest.raises(ValueError, match='distortion'):
    imagenet.imagenet_data_config(distortion='reduced')  # typo of a key


@pytest.mark.parametrize('key, value, match', [
    ('distortions', 'heavy', 'distortions'),
    ('shuffle', 'random', 'shuffle'),
    ('image_size', 0, 'image_size'),
    ('image_size', -224, 'image_size'),
    ('data_dir', '', 'data_dir'),
    ('data_dir', '/nonexistent/imagenet', 'does not exist'),
    ('source', 'folder', 'source'),
    ('num_workers', -1, 'num_workers'),
    ('prefetch', -2, 'prefetch'),
    ('shuffle_shard_size', 0, 'shuffle_shard_size'),
    ('crop_area_range', (0.5, 0.1), 'crop_area_range'),
    ('eval_crop_fraction', 1.5, 'eval_crop_fraction'),
    ('normalization', 'zscore', 'normalization'),
])
def test_bad_config_values_raise(tmp_path, key, value, match):
  c = _config(tmp_path)
  c[key] = value
  with pytest.raises(ValueError, match=match):
    imagenet.validate_imagenet_config(c)


def test_base_config_shape_validates(tmp_path):
  # The shared base config carries only some ImageNet keys; the rest default.
  c = ml_collections.ConfigDict(dict(
      name='imagenet2012', source='tfds', data_dir=str(tmp_path), image_size=224,
      distortions='reduced', shuffle='within_shard', num_workers=8, prefetch=2,
      split_seed=0, num_classes=10, channels=3))
  imagenet.validate_imagenet_config(c)


def test_bad_pipeline_arguments_raise():
  with pytest.raises(ValueError, match='batch_size'):
    _pipeline(batch_size=0)
  with pytest.raises(ValueError, match='process_index'):
    _pipeline(process_index=2, process_count=2)
  with pytest.raises(ValueError, match='seed'):
    _pipeline(seed=-1)


# ---- training batches -------------------------------------------------------------

def test_train_batch_shape_dtype_and_range(tmp_path, mock_imagenet):
  p = imagenet.ImageNetPipeline(_config(tmp_path), batch_size=4, seed=0,
                                process_index=0, process_count=1)
  assert p.num_train_examples == NUM_MOCK and p.num_classes == 1000
  batch = _take(p.train_batches(0), 1)[0]
  assert set(batch) == {'image', 'label', 'seed'}
  assert batch['image'].shape == (4, 24, 24, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
  assert batch['seed'].shape == (4,) and batch['seed'].dtype == np.uint32
  assert batch['image'].min() < batch['image'].max()
  assert ((0 <= batch['label']) & (batch['label'] < 1000)).all()


def test_mean_std_normalization():
  from bn_research.data import augment
  x = np.linspace(0, 1, 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
  y = np.asarray(augment.normalize(x, 'mean_std'))
  np.testing.assert_allclose(y * imagenet.IMAGENET_STD + imagenet.IMAGENET_MEAN, x, atol=1e-6)
  np.testing.assert_allclose(augment.normalize(x, 'inception'), 2 * x - 1)


def test_same_seed_same_batches_other_seed_differs(tmp_path, mock_imagenet):
  def run(seed):
    p = imagenet.ImageNetPipeline(_config(tmp_path), batch_size=4, seed=seed,
                                  process_index=0, process_count=1)
    return _take(p.train_batches(0), 3)

  a, b, c = run(0), run(0), run(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert any(not np.array_equal(x['image'], z['image']) for x, z in zip(a, c))


def test_resume_sees_the_same_batches(tmp_path, mock_imagenet):
  # 10 examples, batches of 4: steps 0..5 span 2.4 epochs, so resumes cross epochs.
  p = imagenet.ImageNetPipeline(_config(tmp_path), batch_size=4, seed=3,
                                process_index=0, process_count=1)
  full = _take(p.train_batches(0), 6)
  for k in (1, 2, 5):
    q = imagenet.ImageNetPipeline(_config(tmp_path), batch_size=4, seed=3,
                                  process_index=0, process_count=1)
    resumed = list(q.train_batches(k, num_steps=6 - k))
    assert len(resumed) == 6 - k
    for x, y in zip(resumed, full[k:]):
      np.testing.assert_array_equal(x['image'], y['image'])
      np.testing.assert_array_equal(x['label'], y['label'])


def test_every_example_once_per_epoch_across_epoch_boundaries():
  p = _pipeline(n=10, batch_size=4)
  stream = np.concatenate([p.train_indices(s) for s in range(5)])  # 20 = two epochs
  assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
  assert not np.array_equal(stream[:10], stream[10:])  # reshuffled per epoch


def test_hosts_read_disjoint_covering_shards_and_agree_with_one_host():
  n, hosts, local = 12, 3, 2               # global batch 6: two steps per epoch
  pipes = [_pipeline(n=n, batch_size=local, process_index=i, process_count=hosts, seed=5)
           for i in range(hosts)]
  single = _pipeline(n=n, batch_size=local * hosts, seed=5)
  for epoch in range(2):
    seen = []
    for step in (2 * epoch, 2 * epoch + 1):
      parts = [p.train_indices(step) for p in pipes]
      seen += [int(i) for part in parts for i in part]
      np.testing.assert_array_equal(np.concatenate(parts), single.train_indices(step))
    assert sorted(seen) == list(range(n))  # disjoint and covering, each epoch
  # Not just the indices: the augmented images are the same as with one host.
  step = 3
  host_images = np.concatenate([p.train_batch(step)['image'] for p in pipes])
  np.testing.assert_array_equal(host_images, single.train_batch(step)['image'])


# ---- shuffling ----------------------------------------------------------------

def _shard_changes(order, shard):
  ids = order // shard
  return int(np.count_nonzero(ids[1:] != ids[:-1]))


@pytest.mark.parametrize('n', [100, 95])
def test_shuffle_orders_differ_as_designed(n):
  shard = 10
  num_shards = -(-n // shard)
  orders = {s: imagenet.epoch_order(n, seed=0, epoch=0, shuffle=s, shard_size=shard)
            for s in imagenet.SHUFFLES}
  for o in orders.values():
    assert sorted(o.tolist()) == list(range(n))
  # thorough: neighbours come from all over the index space.
  assert _shard_changes(orders['thorough'], shard) > n // 2
  # within_shard: each shard is consumed in one contiguous run, in shuffled order...
  assert _shard_changes(orders['within_shard'], shard) == num_shards - 1
  runs = np.split(orders['within_shard'],
                  np.flatnonzero(np.diff(orders['within_shard'] // shard)) + 1)
  assert any(not np.all(np.diff(r) > 0) for r in runs)
  assert [r[0] // shard for r in runs] != list(range(num_shards))  # shard order shuffled
  # ...while shards_only keeps the stored order inside each shard.
  assert _shard_changes(orders['shards_only'], shard) == num_shards - 1
  runs = np.split(orders['shards_only'], np.flatnonzero(np.diff(orders['shards_only'] // shard)) + 1)
  assert all(np.all(np.diff(r) == 1) for r in runs)
  # Every option reshuffles per epoch and is a pure function of (seed, epoch).
  for s in imagenet.SHUFFLES:
    again = imagenet.epoch_order(n, seed=0, epoch=0, shuffle=s, shard_size=shard)
    np.testing.assert_array_equal(again, orders[s])
    other = imagenet.epoch_order(n, seed=0, epoch=1, shuffle=s, shard_size=shard)
    assert not np.array_equal(other, orders[s])


def test_within_shard_batches_mix_one_shard_only():
  shard, batch = 8, 4
  p = _pipeline(n=64, batch_size=batch, shuffle='within_shard', shuffle_shard_size=shard)
  t = _pipeline(n=64, batch_size=batch, shuffle='thorough')
  within = [len(set((p.train_indices(s) // shard).tolist())) for s in range(16)]
  thorough = [len(set((t.train_indices(s) // shard).tolist())) for s in range(16)]
  assert max(within) == 1
  assert np.mean(thorough) > 2


# ---- preprocessing ----------------------------------------------------------------

def test_eval_is_deterministic_central_and_padded():
  # 64x80 images: the central crop is 56x56 at (4, 12); image_size 56 = no resampling.
  config = _config('/unused', image_size=56, normalization='inception')
  p = imagenet.ImageNetPipeline(config, batch_size=3, seed=0, process_index=0,
                                process_count=1, train_source=_FakeSource(4),
                                eval_source=_FakeSource(7, height=64, width=80))
  first, second = list(p.eval_batches()), list(p.eval_batches())
  assert len(first) == 3
  for a, b in zip(first, second):
    for k in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(a[k], b[k])
  assert [b['mask'].tolist() for b in first] == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
  assert first[0]['mask'].dtype == np.float32 and first[0]['label'].dtype == np.int32
  assert first[2]['label'].tolist() == [6, 0, 0]
  assert not first[2]['image'][1:].any()
  for b_index, batch in enumerate(first):
    for j in range(3):
      if not batch['mask'][j]:
        continue
      expected = _pattern(3 * b_index + j, 64, 80)[4:60, 12:68]
      np.testing.assert_array_equal(batch['image'][j], expected)


def test_eval_hosts_cover_the_split_with_equal_batch_counts():
  n, hosts, per_host = 7, 2, 2            # global eval batch 4 -> 2 batches, 1 padded
  seen = []
  counts = []
  for i in range(hosts):
    p = _pipeline(n=5, eval_n=n, batch_size=3, process_index=i, process_count=hosts)
    batches = list(p.eval_batches(per_host))
    counts.append(len(batches))
    for b in batches:
      seen += b['label'][b['mask'] > 0].tolist()
  assert counts == [2, 2]
  assert sorted(seen) == list(range(n))


def test_random_crop_boxes_follow_the_inception_ranges():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = imagenet.random_crop_box(rng, 300, 400)
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    assert 0.07 <= h * w / (300 * 400) <= 1.0
    if h * w > 400:  # rounding aside
      assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02 or h == 300 or w == 400
  # No attempts (or impossible constraints) -> the evaluation centre crop.
  assert imagenet.random_crop_box(rng, 64, 80, max_attempts=0) == (4, 12, 56, 56)
  assert imagenet.random_crop_box(rng, 64, 80, area_range=(1.0, 1.0),
                                  aspect_ratio_range=(3.0, 3.0)) == (4, 12, 56, 56)


def test_encoded_and_grayscale_images():
  class Mixed(_FakeSource):
    def __getitem__(self, i):
      ex = super().__getitem__(i)
      if i % 3 == 1:
        ex['image'] = _jpeg(ex['image'][..., 0])           # grayscale JPEG ('L')
      elif i % 3 == 2:
        ex['image'] = ex['image'][..., :1]                 # (H, W, 1) array
      else:
        ex['image'] = _jpeg(ex['image'])                   # RGB JPEG
      return ex

  p = imagenet.ImageNetPipeline(_config('/unused'), batch_size=6, seed=0, process_index=0,
                                process_count=1, train_source=Mixed(6), eval_source=Mixed(6))
  train = p.train_batch(0)['image']
  assert train.shape == (6, 24, 24, 3) and train.dtype == np.uint8
  evals = next(iter(p.eval_batches()))['image']
  assert evals.shape == (6, 24, 24, 3)
  # Grayscale inputs come out grey in RGB; colour ones do not.
  gray = [int(i) for i in range(6) if i % 3 != 0]
  assert all((evals[i, ..., 0] == evals[i, ..., 2]).all() for i in gray)
  assert not (evals[0, ..., 0] == evals[0, ..., 2]).all()


# ---- errors ---------------------------------------------------------------------

def test_worker_errors_reach_the_consumer():
  class Broken(_FakeSource):
    def __getitem__(self, i):
      raise OSError(f'unreadable record {i}')

  p = imagenet.ImageNetPipeline(_config('/unused'), batch_size=2, seed=0, process_index=0,
                                process_count=1, train_source=Broken(4), eval_source=Broken(4))
  with pytest.raises(OSError, match='unreadable record'):
    next(p.train_batches(0))
  with pytest.raises(ValueError, match='start_step'):
    p.train_batches(-1)


# ---- TFDS on disk -------------------------------------------------------------------

def test_unprepared_data_dir_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='bn_research.data.imagenet prepare'):
    imagenet.open_tfds_split('imagenet2012', 'train', str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is not None,
                    reason='TensorFlow is installed: preparing would really run')
def test_prepare_without_tensorflow_explains(tmp_path):
  with pytest.raises(ImportError, match='TensorFlow'):
    imagenet.prepare_imagenet2012(str(tmp_path))


class TinyImagenetForTests(tfds.core.GeneratorBasedBuilder):
  """imagenet2012's feature layout, a few examples, JPEG bytes in (no TensorFlow)."""

  # A top-level module name keeps TFDS from looking for this builder's code folder,
  # which needs the `importlib_resources` package (tensorflow/datasets#11212).
  __module__ = 'tiny_imagenet_for_tests'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=1000),
        'file_name': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(9), 'validation': self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield f'img{i}', {'image': _jpeg(_pattern(i, 30 + i, 40)), 'label': 7 * i,
                        'file_name': f'img{i}.JPEG'}


def test_reads_real_array_record_files_without_tensorflow(tmp_path):
  TinyImagenetForTests(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  config = _config(tmp_path, name='tiny_imagenet_for_tests')
  p = imagenet.ImageNetPipeline(config, batch_size=4, seed=0, process_index=0, process_count=1)
  assert (p.num_train_examples, p.num_eval_examples) == (9, 5)
  assert isinstance(p.train_source[0]['image'], bytes)   # decoded by the pipeline
  batch = _take(p.train_batches(0), 1)[0]
  assert batch['image'].shape == (4, 24, 24, 3) and batch['image'].dtype == np.uint8
  assert set(batch['label'].tolist()) <= {7 * i for i in range(9)}
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in p.eval_batches(2)])
  assert sorted(labels.tolist()) == [7 * i for i in range(5)]
