"""Synthetic class-conditional images: always available, fast, deterministic.

Each class has a fixed random prototype image (uniform in [0, 1] per pixel); an example
is its class prototype plus Gaussian pixel noise, clipped to [0, 1]. With the default
noise the classes are far apart relative to the noise (many pixels, each carrying a
signal), so even a linear model learns them quickly: good for tests and throughput
benchmarks, meaningless as a research result.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

# Pixel noise standard deviation. Chosen so that one pixel alone is a weak cue
# (prototype spread ~0.29) but a whole image is an easy one.
NOISE_STD = 0.3


def make_synthetic(
    num_train: int,
    num_test: int,
    image_size: int,
    channels: int,
    num_classes: int,
    seed: int,
    noise_std: float = NOISE_STD,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Draws a synthetic train/test set.

  Labels are balanced (i mod num_classes, then shuffled). Train and test share the
  prototypes but not the noise draws. The result depends only on the arguments.

  Args:
    num_train: number of training examples.
    num_test: number of test examples.
    image_size: height and width.
    channels: channels per pixel.
    num_classes: number of classes (prototypes).
    seed: seed for `np.random.default_rng`.
    noise_std: pixel noise standard deviation.

  Returns:
    (train_images, train_labels, test_images, test_labels); images float32
    (N, image_size, image_size, channels) in [0, 1], labels int32 in [0, num_classes).
  """
  rng = np.random.default_rng(seed)
  shape = (image_size, image_size, channels)
  prototypes = rng.random((num_classes,) + shape, dtype=np.float32)

  def draw(n: int) -> Tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    noise = rng.standard_normal((n,) + shape, dtype=np.float32) * np.float32(noise_std)
    images = np.clip(prototypes[labels] + noise, 0.0, 1.0)
    return images.astype(np.float32, copy=False), labels

  train_images, train_labels = draw(num_train)
  test_images, test_labels = draw(num_test)
  return train_images, train_labels, test_images, test_labels
