"""The ImageNet input split between host and device: grain workers, uint8 batches,
the on-device photometric distortions (bn_research.data.augment) against a NumPy
implementation of the same definitions, reduced-size JPEG decoding, and the input
benchmark's output format.

The NumPy implementation below is the reference: it is the definition the pipeline
used on the host before the distortions moved to the device (TF-slim's
`distort_color` ranges), written on channel planes, and is itself checked against
the HSV definition of `colorsys`.
"""

import colorsys
import io
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bn_research import inputs
from bn_research.data import augment
from bn_research.data import imagenet
from scripts.bench_input import natural_image
from tests.test_imagenet_data import _FakeSource, _config, _jpeg, _pattern

F32_EPS = float(np.finfo(np.float32).eps)


# ---- the NumPy reference -----------------------------------------------------------

def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """(..., 3) RGB in [0, 1] to HSV, all channels in [0, 1]."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = np.maximum(np.maximum(r, g), b)
  minc = np.minimum(np.minimum(r, g), b)
  delta = maxc - minc
  safe = np.where(delta > 0, delta, 1.0)
  s = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
  h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return np.stack([h, s, maxc], axis=-1).astype(rgb.dtype, copy=False)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
  k = (np.array([5.0, 3.0, 1.0], hsv.dtype) + h * 6.0) % 6.0
  return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _max_min(planes):
  r, g, b = planes
  return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def np_brightness(planes, delta):
  return planes + delta


def np_contrast(planes, factor):
  mean = planes.reshape(3, -1).mean(axis=1, dtype=np.float32)[:, None, None]
  return planes * factor + mean * (np.float32(1) - factor)


def np_saturation(planes, factor):
  v, m = _max_min(planes)
  scale = np.minimum(factor, v / np.maximum(v - m, np.float32(1e-12)))
  return v + (planes - v) * scale


def np_hue(planes, delta):
  r, g, b = planes
  v, m = _max_min(planes)
  chroma = v - m
  safe = np.where(chroma > 0, chroma, np.float32(1))
  hue6 = np.where(r == v, (g - b) / safe,
                  np.where(g == v, (b - r) / safe + np.float32(2), (r - g) / safe + np.float32(4)))
  hue6 = hue6 + np.float32(6) * delta
  hue6 -= np.float32(6) * np.floor(hue6 * np.float32(1 / 6))
  out = np.empty_like(planes)
  for channel, n in enumerate((5.0, 3.0, 1.0)):
    k = hue6 + np.float32(n)
    k -= np.float32(6) * (k >= 6)
    out[channel] = v - chroma * np.clip(np.minimum(k, np.float32(4) - k), 0, 1)
  return out


def np_distort_color(image, order, u, jitter):
  """(H, W, 3) float32 in [0, 1]; the distortions in `order`, sized from `u`."""
  if jitter is None:
    return image
  params = imagenet.color_parameters(np.asarray(u, np.float32), jitter)
  ops = (np_brightness, np_contrast, np_saturation, np_hue)
  planes = np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)
  for i in order:
    planes = np.clip(ops[i](planes, np.float32(params[i])), 0.0, 1.0)
  return np.moveaxis(planes, 0, -1)


def _random_image(seed, h=16, w=16):
  x = np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)
  x[0, 0] = 0.5                                 # grey: no chroma
  x[0, 1] = 0.0                                 # black
  x[0, 2] = (0.7, 0.7, 0.2)                     # two channels tie for the maximum
  return x


# ---- the reference against the HSV definition ---------------------------------------

def test_reference_saturation_and_hue_match_the_hsv_definition():
  x = _random_image(1)
  ref = np.array([[colorsys.rgb_to_hsv(*map(float, px)) for px in row] for row in x])
  np.testing.assert_allclose(rgb_to_hsv(x), ref, atol=1e-6)
  np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6)
  planes = np.ascontiguousarray(np.moveaxis(x, -1, 0))
  for f in (0.0, 0.5, 1.3, 4.0):
    h = rgb_to_hsv(x)
    h[..., 1] = np.clip(h[..., 1] * f, 0, 1)
    expected = hsv_to_rgb(h)
    np.testing.assert_allclose(np.moveaxis(np_saturation(planes, np.float32(f)), 0, -1),
                               expected, atol=1e-5)
    np.testing.assert_allclose(augment.adjust_saturation(x, jnp.float32(f)), expected,
                               atol=1e-5)
  for d in (-0.2, 0.05, 0.5):
    h = rgb_to_hsv(x)
    h[..., 0] = (h[..., 0] + d) % 1.0
    expected = hsv_to_rgb(h)
    np.testing.assert_allclose(np.moveaxis(np_hue(planes, np.float32(d)), 0, -1),
                               expected, atol=1e-5)
    np.testing.assert_allclose(augment.adjust_hue(x, jnp.float32(d)), expected, atol=1e-5)


# ---- the device against the reference ------------------------------------------------

def test_color_draws_are_a_permutation_and_uniforms():
  seeds = np.arange(200, dtype=np.uint32) * np.uint32(2654435761)
  order, u = jax.jit(jax.vmap(augment.color_draws))(seeds)
  order, u = np.asarray(order), np.asarray(u)
  assert (np.sort(order, axis=1) == np.arange(4)).all()
  assert len({tuple(o) for o in order}) > 12        # many of the 24 orders occur
  assert u.dtype == np.float32 and (0 <= u).all() and (u < 1).all()
  assert abs(u.mean() - 0.5) < 0.05
  again = np.asarray(jax.jit(jax.vmap(augment.color_draws))(seeds)[1])
  np.testing.assert_array_equal(again, u)           # a pure function of the seed
  for name, jitter in imagenet.DISTORTION_STRENGTHS.items():
    if jitter is None:
      continue
    p = imagenet.color_parameters(u, jitter)
    assert np.abs(p[:, 0]).max() <= jitter.brightness, name
    assert jitter.contrast[0] <= p[:, 1].min() and p[:, 1].max() <= jitter.contrast[1]
    assert jitter.saturation[0] <= p[:, 2].min() and p[:, 2].max() <= jitter.saturation[1]
    assert np.abs(p[:, 3]).max() <= jitter.hue


@pytest.mark.parametrize('distortions', imagenet.DISTORTIONS)
def test_device_distortions_match_the_numpy_reference(distortions):
  """Same draws, same definitions: the two differ by float32 rounding only.

  Tolerance: each distortion is a few float32 operations on values of magnitude <= 7
  (hue in sixths of the circle), each rounding by <= 7 * eps / 2, and the contrast mean
  sums 32 * 32 values in another order (<= log2(1024) = 10 roundings of a value <= 1);
  over four distortions that is below 4 * (8 * 7 + 10) * eps ~ 3e-5. Clipping never
  amplifies an error and the closed forms are continuous where their branches meet.
  """
  jitter = imagenet.DISTORTION_STRENGTHS[distortions]
  tol = 4 * (8 * 7 + 10) * F32_EPS
  images = np.stack([_random_image(s, 32, 32) for s in range(12)])
  images[3] = _pattern(3, 32, 32).astype(np.float32) / 255     # smooth, natural-ish
  seeds = np.random.default_rng(0).integers(0, 2**32, 12, dtype=np.uint64).astype(np.uint32)
  order, u = (np.asarray(a) for a in jax.jit(jax.vmap(augment.color_draws))(seeds))
  device = jax.jit(jax.vmap(lambda x, o, v: augment.distort_color(x, o, v, jitter)))(
      images, order, u)
  device = np.asarray(device)
  worst = 0.0
  for i in range(len(images)):
    expected = np_distort_color(images[i], order[i], u[i], jitter)
    worst = max(worst, float(np.abs(device[i] - expected).max()))
  assert worst <= tol, (worst, tol)
  if jitter is not None:                       # and the comparison is not vacuous
    assert np.abs(device - images).mean() > 0.01


def test_train_batch_on_the_device_is_distortion_then_normalisation():
  rng = np.random.default_rng(4)
  batch = {'image': rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
           'label': np.arange(6, dtype=np.int32),
           'seed': rng.integers(0, 2**32, 6, dtype=np.uint64).astype(np.uint32)}
  order, u = (np.asarray(a) for a in jax.vmap(augment.color_draws)(batch['seed']))
  x = batch['image'].astype(np.float32) / np.float32(255)
  for distortions in imagenet.DISTORTIONS:
    for normalization in imagenet.NORMALIZATIONS:
      aug = augment.DeviceAugment(distortions, normalization)
      out = jax.jit(aug.train)(batch)
      assert out['image'].dtype == jnp.float32 and out['image'].shape == (6, 16, 16, 3)
      np.testing.assert_array_equal(out['label'], batch['label'])
      jitter = imagenet.DISTORTION_STRENGTHS[distortions]
      expected = np.stack([np_distort_color(x[i], order[i], u[i], jitter) for i in range(6)])
      if normalization == 'inception':
        expected = 2 * expected - 1
      else:
        expected = (expected - [0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])
      np.testing.assert_allclose(out['image'], expected, atol=1e-4)
  ev = jax.jit(augment.DeviceAugment('full', 'inception').eval)(
      {**batch, 'mask': np.ones(6, np.float32)})
  np.testing.assert_allclose(ev['image'], 2 * x - 1, atol=1e-6)   # never distorted
  assert set(ev) == {'image', 'label', 'seed', 'mask'}


def test_device_augment_rejects_unknown_names():
  with pytest.raises(ValueError, match='distortions'):
    augment.DeviceAugment('heavy')
  with pytest.raises(ValueError, match='normalization'):
    augment.DeviceAugment('full', 'zscore')


def test_reduced_distortions_change_pixels_less_than_full():
  image = np.broadcast_to(_pattern(3, 32, 32), (24, 32, 32, 3))
  batch = {'image': image, 'label': np.zeros(24, np.int32),
           'seed': np.arange(24, dtype=np.uint32)}
  x = 2 * (image.astype(np.float32) * np.float32(1 / 255)) - 1
  change = {d: float(np.abs(np.asarray(augment.DeviceAugment(d).train(batch)['image']) - x).mean())
            for d in imagenet.DISTORTIONS}
  assert change['none'] < 1e-6               # float32 rounding of the normalisation
  assert 0.01 < change['reduced'] < 0.75 * change['full']


# ---- the stream: uint8 over the bus, workers, resume ----------------------------------

def _pipeline(**overrides):
  overrides.setdefault('num_workers', 0)
  return imagenet.ImageNetPipeline(
      _config('/unused', **overrides), batch_size=4, seed=7, process_index=0,
      process_count=1, train_source=_FakeSource(10, encode=True), eval_source=_FakeSource(6))


def _same(a, b):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_worker_processes_give_the_in_process_stream_and_resume_exactly():
  """10 examples, batches of 4: steps 0..5 span 2.4 epochs. The stream opened at step
  s (a run restarted after SIGKILL at its last checkpoint) is the uninterrupted
  stream from s on, with 2 worker processes as in this process."""
  full = list(_pipeline(prefetch=0).train_batches(0, num_steps=6))
  assert full[0]['image'].dtype == np.uint8 and full[0]['seed'].dtype == np.uint32
  it = _pipeline(num_workers=2, prefetch=1).train_batches(3)
  resumed = [next(it) for _ in range(3)]
  it.close()
  for a, b in zip(resumed, full[3:]):
    _same(a, b)
  threaded = list(_pipeline(prefetch=2).train_batches(2, num_steps=4))
  for a, b in zip(threaded, full[2:]):
    _same(a, b)
  # Seeds are per stream position: no two examples share one.
  seeds = np.concatenate([b['seed'] for b in full])
  assert len(set(seeds.tolist())) == len(seeds)


class _UnreadableSource(_FakeSource):
  """Record 5 cannot be read (module level: grain's workers unpickle it)."""

  def __getitem__(self, i):
    if i == 5:
      raise OSError(f'unreadable record {i}')
    return super().__getitem__(i)


def test_an_error_in_a_worker_process_reaches_the_training_loop():
  p = imagenet.ImageNetPipeline(
      _config('/unused', num_workers=1, prefetch=1, shuffle='shards_only',
              shuffle_shard_size=100), batch_size=4, seed=0, process_index=0,
      process_count=1, train_source=_UnreadableSource(8), eval_source=_FakeSource(2))
  it = p.train_batches(0)
  np.testing.assert_array_equal(next(it)['label'], [0, 1, 2, 3])   # stored order
  with pytest.raises(Exception, match='unreadable record 5'):
    next(it)
  it.close()


def test_stream_input_materializes_float_batches_inside_jit():
  p = _pipeline()
  source = inputs.StreamInput(p, augment.DeviceAugment('reduced', 'inception'))
  chunk = source.chunk(2, 2)
  assert chunk['image'].dtype == np.uint8 and chunk['image'].shape == (2, 4, 24, 24, 3)
  assert chunk['seed'].shape == (2, 4)
  step = jax.jit(lambda c: source.materialize({}, c))
  out = step(jax.tree_util.tree_map(lambda x: x[1], chunk))
  expected = augment.DeviceAugment('reduced', 'inception').train(p.train_batch(3))
  np.testing.assert_allclose(out['image'], expected['image'], atol=1e-6)
  np.testing.assert_array_equal(out['label'], p.train_batch(3)['label'])
  assert out['image'].dtype == jnp.float32
  ev = next(iter(p.eval_batches(3)))
  assert ev['image'].dtype == np.uint8
  got = jax.jit(source.materialize_eval)(ev)['image']
  np.testing.assert_allclose(got, 2 * (ev['image'] * np.float32(1 / 255)) - 1, atol=1e-6)


def test_run_data_sends_uint8_and_the_network_input_is_made_on_the_device(tmp_path):
  """`load_run_data` on TFDS mock ImageNet: what crosses to the device is uint8 (train
  chunks with their seeds, eval batches), the initialisation sample is float32."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from configs import imagenet_inception  # pylint: disable=g-import-not-at-top
  c = imagenet_inception.get_config('model=bn_x5')
  c.data.data_dir = str(tmp_path)
  c.data.image_size = 24
  c.data.num_workers = 0
  c.batch_size, c.eval_batch_size = 4, 4
  with tfds.testing.mock_data(num_examples=6):
    data = inputs.load_run_data(c)
    chunk = data.source.chunk(0, 2)
    evals = list(data.eval_batches())
  assert {k: v.dtype for k, v in chunk.items()} == {
      'image': np.uint8, 'label': np.int32, 'seed': np.uint32}
  assert chunk['image'].shape == (2, 4, 24, 24, 3)
  assert all(b['image'].dtype == np.uint8 for b in evals)
  assert sum(float(b['mask'].sum()) for b in evals) == 6
  assert data.sample_image.dtype == np.float32 and data.sample_image.shape == (2, 24, 24, 3)
  out = jax.jit(data.source.materialize)({}, jax.tree_util.tree_map(lambda x: x[0], chunk))
  assert out['image'].dtype == jnp.float32 and float(jnp.abs(out['image']).max()) <= 1


def test_distortion_setting_changes_nothing_on_the_host():
  batches = {d: _pipeline(distortions=d).train_batch(1) for d in imagenet.DISTORTIONS}
  _same(batches['full'], batches['none'])
  _same(batches['reduced'], batches['none'])


# ---- reduced-size JPEG decoding ----------------------------------------------------

def _np_bilinear(pixels: np.ndarray, size: int) -> np.ndarray:
  """float64 bilinear resize to (size, size): half-pixel centres, the edge pixels
  repeated past the ends, no antialiasing (TF-slim's `tf.image.resize_images`)."""
  def weights(n_in):
    src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((size, n_in))
    np.add.at(m, (np.arange(size), lo), 1 - (src - lo))
    np.add.at(m, (np.arange(size), hi), src - lo)
    return m
  x = pixels.astype(np.float64)
  if x.ndim == 2:
    x = np.repeat(x[:, :, None], 3, axis=2)
  return np.einsum('oh,hwc,pw->opc', weights(x.shape[0]), x, weights(x.shape[1]),
                   optimize=True)


def _dct_scale(height, width, box, size):
  """The JPEG decoder's reduction 1, 2, 4 or 8 for a box: the largest that keeps the
  box at least `size` pixels on each side (enumerated, not computed as the code does)."""
  _, _, h, w = box
  return max([1] + [s for s in (2, 4, 8) if h / s >= size and w / s >= size])


# Rounding to uint8 (0.5), OpenCV's 11-bit fixed-point weights in its two passes
# (2 weights x 2 passes x 255 / 4096 ~ 0.25) and its row buffer's truncation: under
# one level.
RESIZE_TOLERANCE = 1.0


@pytest.mark.parametrize('box,size', [((0, 0, 375, 500), 224), ((10, 20, 300, 360), 224),
                                      ((5, 7, 100, 80), 224), ((0, 0, 375, 500), 64),
                                      ((30, 41, 333, 250), 57), ((0, 0, 375, 500), 24)])
@pytest.mark.parametrize('gray', [False, True])
def test_crop_resize_matches_a_float64_bilinear_reference(box, size, gray):
  """The host's crop + resize equals float64 bilinear interpolation of the same
  crop of the same decoded pixels, within one uint8 level; a JPEG is decoded at the
  DCT scale that keeps the crop at least `size` pixels, and the box maps onto it."""
  rng = np.random.default_rng(1)
  pixels = natural_image(rng, 375, 500)
  jpeg = _jpeg(pixels[..., 0] if gray else pixels)
  scale = _dct_scale(375, 500, box, size)
  img = Image.open(io.BytesIO(jpeg))
  out = imagenet._crop_resize(img, box, size)
  assert out.shape == (size, size, 3) and out.dtype == np.uint8
  decoded = Image.open(io.BytesIO(jpeg))
  decoded.draft(decoded.mode, (500 // scale, 375 // scale))  # PIL: size // request
  decoded = np.asarray(decoded)
  assert decoded.shape[:2] == (math.ceil(375 / scale), math.ceil(500 / scale))
  top, left, h, w = box
  crop = decoded[round(top / scale):round((top + h) / scale),
                 round(left / scale):round((left + w) / scale)]
  np.testing.assert_array_less(np.abs(out - _np_bilinear(crop, size)), RESIZE_TOLERANCE)
  # An image decoded beforehand is resized at full scale.
  full = np.asarray(Image.open(io.BytesIO(jpeg)))
  out = imagenet._crop_resize(Image.fromarray(full), box, size)
  np.testing.assert_array_less(
      np.abs(out - _np_bilinear(full[top:top + h, left:left + w], size)), RESIZE_TOLERANCE)


@pytest.mark.parametrize('height,width', [(40, 56), (56, 40)])
def test_eval_squares_are_the_three_squares_resized(height, width):
  """With `eval_views='squares'` an evaluation example is the image's left, centre and
  right (top, middle, bottom) squares of its shorter side, each resized to
  S = image_size x 352/224, within one level of a float64 bilinear resize; padding
  has the same shape."""
  pipeline = imagenet.ImageNetPipeline(
      _config('/unused', eval_views='squares', image_size=16), batch_size=4, seed=0,
      process_index=0, process_count=1, train_source=_FakeSource(4),
      eval_source=_FakeSource(3, height=height, width=width))
  side = round(16 * 352 / 224)
  batch = pipeline.eval_batch(0)
  assert batch['image'].shape == (4, 3, side, side, 3) and batch['image'].dtype == np.uint8
  np.testing.assert_array_equal(batch['mask'], [1, 1, 1, 0])
  assert not batch['image'][3].any()
  for i in range(3):
    photo = _pattern(i, height, width)
    short = min(height, width)
    for q in range(3):
      offset = (max(height, width) - short) * q // 2   # 0, 8, 16: whole pixels here
      square = (photo[offset:offset + short] if height > width
                else photo[:, offset:offset + short])
      np.testing.assert_array_less(
          np.abs(batch['image'][i, q] - _np_bilinear(square, side)), RESIZE_TOLERANCE)


def test_reduced_scale_decode_is_closer_to_an_antialiased_resize():
  """Where the crop is at least twice the output size, the decoder's DCT scaling does
  the large reduction: the result is closer to an antialiased resize of the full
  decode (PIL's triangle filter) than bilinear interpolation of the full decode, which
  skips pixels there: a third closer on average, fewer pixels more than 4 levels off."""
  rng = np.random.default_rng(0)
  jpeg = _jpeg(natural_image(rng, 375, 500))
  full = Image.open(io.BytesIO(jpeg))
  full.load()
  for box, size in [((0, 0, 375, 500), 64), ((0, 0, 375, 500), 40), ((0, 0, 375, 500), 24),
                    ((10, 20, 300, 360), 60), ((0, 0, 375, 500), 150)]:
    img = Image.open(io.BytesIO(jpeg))
    reduced = imagenet._crop_resize(img, box, size).astype(int)
    assert img.size[0] < 500, box                   # the reduced decode did happen
    skipping = imagenet._crop_resize(full, box, size)  # already decoded: no draft
    top, left, h, w = box
    ideal = np.asarray(full.resize((size, size), Image.Resampling.BILINEAR,
                                   box=(left, top, left + w, top + h)))
    ours, theirs = np.abs(reduced - ideal), np.abs(skipping.astype(int) - ideal)
    assert ours.mean() <= 2 / 3 * theirs.mean(), (box, ours.mean(), theirs.mean())
    assert np.mean(ours > 4) < np.mean(theirs > 4), box
  # A crop under twice the output size is decoded in full.
  img = Image.open(io.BytesIO(jpeg))
  np.testing.assert_array_equal(imagenet._crop_resize(img, (0, 0, 375, 500), 224),
                                imagenet._crop_resize(full, (0, 0, 375, 500), 224))
  assert img.size == (500, 375)


# ---- the benchmark's output --------------------------------------------------------

def test_bench_input_runs_on_a_folder_of_jpegs(tmp_path):
  for i in range(4):
    Image.fromarray(_pattern(i, 40 + i, 56)).save(tmp_path / f'p{i}.jpg', quality=90)
  (tmp_path / 'notes.txt').write_text('not an image')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-m', 'scripts.bench_input', f'--jpeg_dir={tmp_path}',
       '--image_size=24', '--repeats=1', '--max_workers=1', '--min_seconds=0'],
      cwd=root, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert re.fullmatch(r'host preprocessing / full decode, per core: \d+\.\d\d', lines[-1])
  text = proc.stdout
  assert re.search(r'4 JPEGs', text)
  for label in ('full decode', 'host preprocessing', 'grain, 1 worker'):
    assert re.search(label + r'.*?[\d,.]+ images/s', text), label
  assert re.search(r'host cores per accelerator', text)


def test_bench_input_bad_flag_is_one_line_and_exit_2(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-m', 'scripts.bench_input', f'--jpeg_dir={tmp_path}/none'],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1 and 'jpeg_dir' in proc.stderr
