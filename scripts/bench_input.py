"""Can the host keep up? ImageNet's host-side training preprocessing against JPEG decoding.

Prints, in one run, on the same JPEG bytes:
* PIL's full decode alone (`Image.open(...).load()`), images/s on one core;
* the crop, resize and flip alone, on images decoded beforehand, on one core;
* the host's training preprocessing (`imagenet.preprocess_train`: decode at the
  scale the crop needs, random crop, resize, flip, in uint8), images/s on one core;
* the whole grain pipeline (`ImageNetPipeline.train_batches`) with W worker
  processes, W = 1 .. --max_workers (default: this process's cores), images/s, and
  each rate as a fraction of W x the one-worker rate;
* the host cores one accelerator needs at --accelerator_images_per_s (an input: this
  script measures no accelerator; `scripts/bench_inception.py` does, on one);
and ends with the line `host preprocessing / full decode, per core: R`.

The photometric distortions and normalisation are not host work (they run on the
device, `bn_research.data.augment`), so they are not timed here.

The default images are generated: --num_images 500x375 JPEGs (quality 90, about the
size of an average ImageNet photo) with a natural image's 1/f amplitude spectrum.
`--jpeg_dir=DIR` times the *.jpg / *.jpeg / *.JPEG files of DIR instead.

Usage:
  python -m scripts.bench_input
  python -m scripts.bench_input --jpeg_dir=/data/imagenet/val_sample --max_workers=16
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Callable, Optional, Sequence

# Runnable as `python scripts/bench_input.py` from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from bn_research.data import imagenet  # pylint: disable=g-import-not-at-top

JPEG_SUFFIXES = ('.jpg', '.jpeg')
# An assumed accelerator training rate, images/s, used only to size the host: the
# order of what data-parallel ImageNet CNN benchmarks report per modern chip. Pass
# the figure scripts/bench_inception.py measures on your chip instead.
DEFAULT_ACCELERATOR_IMAGES_PER_S = 2000.0


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 RGB noise with a natural image's 1/f amplitude spectrum and correlated
  channels: smooth regions and edges at every scale, which JPEG compresses about as
  well as it compresses photographs."""
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.rfftfreq(width)[None, :]
  f = np.sqrt(fx ** 2 + fy ** 2)
  f[0, 0] = 1.0
  planes = [np.fft.irfft2((rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f,
                          s=(height, width)) for _ in range(3)]
  mix = np.array([[1.0, 0.8, 0.6], [0.8, 1.0, 0.8], [0.6, 0.8, 1.0]])
  x = np.stack(planes, -1) @ mix.T
  x = 128 + 45 * (x - x.mean()) / x.std()
  return np.clip(x, 0, 255).astype(np.uint8)


def generated_jpegs(num: int, height: int = 375, width: int = 500) -> list[bytes]:
  rng = np.random.default_rng(0)
  out = []
  for _ in range(num):
    buf = io.BytesIO()
    Image.fromarray(natural_image(rng, height, width)).save(buf, 'JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def read_jpegs(folder: str) -> list[bytes]:
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(JPEG_SUFFIXES))
  out = []
  for name in names:
    with open(os.path.join(folder, name), 'rb') as f:
      out.append(f.read())
  return out


class JpegSource:
  """A random-access source of {'image': JPEG bytes, 'label': 0} (cycled)."""

  def __init__(self, jpegs: Sequence[bytes], length: int):
    self.jpegs, self.length = list(jpegs), length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int) -> dict:
    return {'image': self.jpegs[i % len(self.jpegs)], 'label': 0}


def per_core_rate(fn: Callable[[bytes], object], jpegs: Sequence[bytes], repeats: int,
                  min_seconds: float) -> float:
  """Images/s of `fn` over the JPEGs, in this thread: the best of `repeats` passes,
  each at least `min_seconds` long (the best pass is the least disturbed by other
  work on a shared machine)."""
  best = 0.0
  for _ in range(repeats):
    count, start = 0, time.perf_counter()
    while True:
      for b in jpegs:
        fn(b)
      count += len(jpegs)
      elapsed = time.perf_counter() - start
      if elapsed >= min_seconds:
        break
    best = max(best, count / elapsed)
  return best


def full_decode(jpeg: bytes) -> None:
  img = Image.open(io.BytesIO(jpeg))
  if img.mode != 'RGB':
    img = img.convert('RGB')
  img.load()


def grain_rate(jpegs: Sequence[bytes], workers: int, image_size: int, batch_size: int,
               num_batches: int) -> float:
  """Images/s of the grain training pipeline with `workers` processes, after each
  worker has delivered a first batch (start-up is not throughput)."""
  config = imagenet.imagenet_data_config(image_size=image_size, num_workers=workers,
                                         prefetch=2)
  n = batch_size * (num_batches + workers) * 2
  pipeline = imagenet.ImageNetPipeline(
      config, batch_size=batch_size, seed=0, process_index=0, process_count=1,
      train_source=JpegSource(jpegs, n), eval_source=JpegSource(jpegs[:1], 1))
  iterator = pipeline.train_batches(0)
  try:
    for _ in range(max(workers, 1)):
      next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator)
    return num_batches * batch_size / (time.perf_counter() - start)
  finally:
    iterator.close()


def available_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--jpeg_dir', default='',
                 help='folder of JPEG photos to time (default: generated images).')
  p.add_argument('--num_images', type=int, default=64,
                 help='generated images (without --jpeg_dir).')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--repeats', type=int, default=3, help='passes; the best is reported.')
  p.add_argument('--min_seconds', type=float, default=2.0,
                 help='minimum length of one timed pass.')
  p.add_argument('--max_workers', type=int, default=0,
                 help='grain workers up to this many (default: the available cores).')
  p.add_argument('--batch_size', type=int, default=32, help='grain batch size.')
  p.add_argument('--accelerator_images_per_s', type=float,
                 default=DEFAULT_ACCELERATOR_IMAGES_PER_S,
                 help='training images/s of one accelerator (an assumption unless you '
                      'pass what scripts/bench_inception.py measured).')
  args = p.parse_args(argv)
  problems = [
      ('jpeg_dir', args.jpeg_dir, 'an existing folder with JPEG files',
       not args.jpeg_dir or (os.path.isdir(args.jpeg_dir) and read_jpegs(args.jpeg_dir))),
      ('num_images', args.num_images, 'an integer >= 1', args.num_images >= 1),
      ('image_size', args.image_size, 'an integer >= 1', args.image_size >= 1),
      ('repeats', args.repeats, 'an integer >= 1', args.repeats >= 1),
      ('min_seconds', args.min_seconds, 'a number >= 0', args.min_seconds >= 0),
      ('max_workers', args.max_workers, 'an integer >= 0 (0: all cores)',
       args.max_workers >= 0),
      ('batch_size', args.batch_size, 'an integer >= 1', args.batch_size >= 1),
      ('accelerator_images_per_s', args.accelerator_images_per_s, 'a number > 0',
       args.accelerator_images_per_s > 0),
  ]
  for name, value, allowed, ok in problems:
    if not ok:
      print(f'bench_input: --{name}={value!r} is not allowed; expected {allowed}.',
            file=sys.stderr)
      sys.exit(2)
  return args


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parse_args(argv)
  if args.jpeg_dir:
    jpegs, what = read_jpegs(args.jpeg_dir), f'JPEGs from {args.jpeg_dir}'
  else:
    jpegs, what = generated_jpegs(args.num_images), 'generated 500x375 JPEGs (quality 90)'
  sizes = [Image.open(io.BytesIO(b)).size for b in jpegs]
  print(f'{len(jpegs)} JPEGs: {what}; mean {np.mean([len(b) for b in jpegs]) / 1024:.0f} KiB, '
        f'mean size {np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f}; '
        f'output {args.image_size}x{args.image_size}')
  opts = imagenet.PreprocessOptions(image_size=args.image_size)
  rng = np.random.default_rng(0)
  decode = per_core_rate(full_decode, jpegs, args.repeats, args.min_seconds)
  host = per_core_rate(lambda b: imagenet.preprocess_train(b, rng, opts), jpegs,
                       args.repeats, args.min_seconds)
  # The same preprocessing on images decoded beforehand: what the host spends besides
  # decoding (the reduced-scale decode aside).
  decoded = {}
  for b in jpegs:
    img = Image.open(io.BytesIO(b))
    img.load()
    decoded[b] = img
  after = per_core_rate(lambda b: imagenet.preprocess_train(decoded[b], rng, opts), jpegs,
                        args.repeats, args.min_seconds)
  print(f'{"full decode (PIL, RGB), one core:":56s}{decode:9,.0f} images/s')
  print(f'{"crop+resize+flip of decoded images, one core:":56s}{after:9,.0f} images/s')
  print(f'{"host preprocessing (decode+crop+resize+flip), one core:":56s}{host:9,.0f} images/s')
  cores = available_cores()
  max_workers = args.max_workers or cores
  one = None
  for workers in range(1, max_workers + 1):
    # Enough batches that each worker delivers several, and the run lasts.
    num_batches = max(4 * workers, int(args.min_seconds * host / args.batch_size) + 1)
    rate = grain_rate(jpegs, workers, args.image_size, args.batch_size, num_batches)
    one = rate if one is None else one
    noun = 'worker' if workers == 1 else 'workers'
    label = f'grain, {workers} {noun}:'
    print(f'{label:56s}{rate:9,.0f} images/s = {rate / (workers * one):.2f} '
          f'x {workers} x one worker')
  needed = args.accelerator_images_per_s / host
  print(f'host cores per accelerator at {args.accelerator_images_per_s:,.0f} images/s '
        f'(an input, not measured here): {needed:.1f} (at the one-core host rate; '
        f'{cores} cores available here)')
  print(f'host preprocessing / full decode, per core: {host / decode:.2f}')


if __name__ == '__main__':
  main()
