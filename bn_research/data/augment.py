"""ImageNet's photometric distortions and normalisation, on the device (jnp).

The host hands over uint8 images (cropped, resized, flipped) and, per training
example, a uint32 seed drawn from (seed, stream position) (`imagenet.color_seed`).
Inside the compiled step `DeviceAugment.train` turns them into the network's float32
input: each example's seed gives a random order of the four distortions and four
uniforms (`color_draws`), the uniforms become the distortions' sizes
(`imagenet.color_parameters`), and the distortions run in that order, clipping to
[0, 1] after each, then the normalisation. Everything here is pure and jit- and
vmap-able; a resumed run draws the same distortions because the seeds are a
function of the stream position, not of any device state.

The definitions are those of the TF-slim Inception `distort_color` (ranges in
`imagenet.DISTORTION_STRENGTHS`); tests/test_grain_input.py holds a NumPy
implementation of the same definitions, checks these against it given the same draws,
and checks both against the HSV definition of `colorsys`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from bn_research.data import imagenet

# The draws must not depend on the run's jax_default_prng_impl (a run may pick
# 'rbg' for speed): the per-example seeds are a data property, like the crops.
_KEY_IMPL = 'threefry2x32'


def color_draws(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(order (4,) int32: a permutation of the four distortions, u (4,) float32 in
  [0, 1)) of one example, from its uint32 seed."""
  key = jax.random.key(jnp.asarray(seed, jnp.uint32), impl=_KEY_IMPL)
  k_order, k_uniform = jax.random.split(key)
  return (jax.random.permutation(k_order, 4).astype(jnp.int32),
          jax.random.uniform(k_uniform, (4,), jnp.float32))


# The four distortions act on one (H, W, 3) float32 image in [0, 1]. Saturation and
# hue are closed forms of "convert to HSV, change S (clipped to [0, 1]) or H, convert
# back": V (the max channel) and the chroma C = max - min determine every channel once
# the hue is known, and scaling S by f scales each channel's distance below V by
# min(f, V / C).

def _max_min(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.max(x, axis=-1, keepdims=True), jnp.min(x, axis=-1, keepdims=True)


def adjust_brightness(x: jax.Array, delta: jax.Array) -> jax.Array:
  """Adds `delta` to every channel."""
  return x + delta


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """Scales each channel's distance from its image mean by `factor`."""
  mean = jnp.mean(x, axis=(0, 1), keepdims=True)
  return x * factor + mean * (1 - factor)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  """Scales HSV saturation by `factor`, clipped to [0, 1]."""
  v, m = _max_min(x)
  scale = jnp.minimum(factor, v / jnp.maximum(v - m, jnp.float32(1e-12)))
  return v + (x - v) * scale


def adjust_hue(x: jax.Array, delta: jax.Array) -> jax.Array:
  """Turns the HSV hue by `delta` (a fraction of the circle)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v, m = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
  chroma = v - m
  safe = jnp.where(chroma > 0, chroma, 1)
  # The sector is the index of the largest channel, not a test `r == v`: XLA may
  # compute a channel twice in different fusions, differing in the last bit, and an
  # equality test would then pick the sector of the smallest channel. Near a tie the
  # neighbouring sectors' formulas agree, so argmax is safe there.
  sector = jnp.argmax(x, axis=-1)
  hue6 = jnp.where(sector == 0, (g - b) / safe,
                   jnp.where(sector == 1, (b - r) / safe + 2, (r - g) / safe + 4))
  hue6 = hue6 + 6 * delta
  hue6 = hue6 - 6 * jnp.floor(hue6 * jnp.float32(1 / 6))       # into [0, 6)
  k = hue6[..., None] + jnp.asarray([5.0, 3.0, 1.0], jnp.float32)  # R, G, B: [n, n + 6)
  k = jnp.where(k >= 6, k - 6, k)                                  # mod 6
  return v[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4 - k), 0, 1)


_DISTORTIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def distort_color(image: jax.Array, order: jax.Array, u: jax.Array,
                  jitter: Optional[imagenet.ColorJitter]) -> jax.Array:
  """The four distortions of one (H, W, 3) image in [0, 1], in `order`, sized by `u`.

  Clips to [0, 1] after each. `jitter=None` ('none') returns the image unchanged.
  """
  if jitter is None:
    return image
  params = imagenet.color_parameters(u, jitter)
  branches = [lambda x, p, op=op, i=i: op(x, p[i]) for i, op in enumerate(_DISTORTIONS)]
  for slot in range(4):
    image = jnp.clip(jax.lax.switch(order[slot], branches, image, params), 0, 1)
  return image


def normalize(image01: jax.Array, normalization: str = 'inception') -> jax.Array:
  """[0, 1] float32 to the network's input range."""
  if normalization == 'inception':
    return image01 * jnp.float32(2) - jnp.float32(1)
  if normalization == 'mean_std':
    return (image01 - imagenet.IMAGENET_MEAN) / imagenet.IMAGENET_STD
  raise ValueError(f'normalization={normalization!r}; allowed: '
                   f'{", ".join(imagenet.NORMALIZATIONS)}.')


def to_unit_float(image: jax.Array) -> jax.Array:
  """uint8 pixels to float32 in [0, 1]."""
  return image.astype(jnp.float32) * jnp.float32(1 / 255)


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
  """The device half of the ImageNet preprocessing for one data config.

  Attributes:
    distortions: 'full' | 'reduced' | 'none' (`imagenet.DISTORTION_STRENGTHS`).
    normalization: 'inception' | 'mean_std'.
  """
  distortions: str = 'full'
  normalization: str = 'inception'

  def __post_init__(self):
    if self.distortions not in imagenet.DISTORTION_STRENGTHS:
      raise ValueError(f'distortions={self.distortions!r}; allowed: '
                       f'{", ".join(imagenet.DISTORTIONS)}.')
    if self.normalization not in imagenet.NORMALIZATIONS:
      raise ValueError(f'normalization={self.normalization!r}; allowed: '
                       f'{", ".join(imagenet.NORMALIZATIONS)}.')

  def train(self, batch: dict) -> dict:
    """{'image': uint8 (B, H, W, 3), 'label', 'seed': uint32 (B,)} -> the network's
    {'image': float32, 'label'}: distorted per example, normalised."""
    jitter = imagenet.DISTORTION_STRENGTHS[self.distortions]
    x = to_unit_float(batch['image'])
    if jitter is not None:
      x = jax.vmap(lambda image, seed: distort_color(image, *color_draws(seed), jitter))(
          x, batch['seed'])
    return {'image': normalize(x, self.normalization), 'label': batch['label']}

  def eval(self, batch: dict) -> dict:
    """An evaluation batch with uint8 images -> float32 normalised images (no
    distortion); other entries unchanged."""
    return {**batch, 'image': normalize(to_unit_float(batch['image']), self.normalization)}

