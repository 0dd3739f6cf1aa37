"""ImageNet (ILSVRC 2012) input pipeline for the Inception experiments (paper Section 4.2).

Reads TFDS `imagenet2012` through `tfds.data_source` style random access (ArrayRecord
files, no TensorFlow at training time), decodes and augments with PIL + NumPy in a
thread pool, and keeps a few batches ready in a background thread.

Preparing ImageNet (once; the only step that needs TensorFlow)
--------------------------------------------------------------
1. Register at https://image-net.org/download-images and download the ILSVRC 2012
   archives `ILSVRC2012_img_train.tar` (~138 GiB) and `ILSVRC2012_img_val.tar`
   (~6.3 GiB). Do not extract them.
2. Put both files in `<data_dir>/downloads/manual/`, TFDS's default manual
   directory (another folder can be named with `--manual_dir=...`).
3. In an environment that also has TensorFlow and importlib_resources (`pip install
   -r requirements.txt -r requirements-imagenet.txt`; the TFDS imagenet2012 builder
   imports TensorFlow, and TFDS 4.9.10 needs importlib_resources to prepare any
   dataset on Python >= 3.9, tensorflow/datasets#11212), convert them to ArrayRecord:

       python -m bn_research.data.imagenet prepare <data_dir>

   (add `--manual_dir=DIR` if the tars are elsewhere). This is
   `tfds.builder('imagenet2012', data_dir=<data_dir>, file_format='array_record')
   .download_and_prepare()`; the equivalent `tfds build imagenet2012
   --data_dir=<data_dir> --file_format=array_record` also works, but the TFDS 4.9.10
   command line additionally needs apache-beam installed (tensorflow/datasets#5463).
   ArrayRecord is required: the TFDS default, TFRecord, can only be read
   sequentially through tf.data, and this pipeline needs random access.
   The result is `<data_dir>/imagenet2012/5.1.0/` (ArrayRecord shards plus
   `dataset_info.json`, roughly the size of the tars); the tars can then be deleted.
   Conversion runs once and takes hours.
4. Train with `data.data_dir=<data_dir>`. Reading needs no TensorFlow. The folder
   must be on a local (or locally mounted) disk: ArrayRecord random access does not
   work on gs:// paths.

Design
------
* Data order is a pure function of (seed, step). The global training stream is the
  concatenation of per-epoch orders of the N training examples; the global batch of
  step s is stream positions s*G .. s*G+G-1 (G = batch_size * process_count), and
  host p takes positions s*G + p*B .. s*G + (p+1)*B - 1 (B = batch_size, this host's
  share). Hosts therefore read disjoint examples that together cover every epoch,
  batches may straddle an epoch boundary, nothing is dropped, for a given global
  batch the stream does not depend on the number of hosts, and a run resumed at step k sees exactly the
  batches of the uninterrupted run. The same layout as `bn_research.inputs`.
* Per-example augmentation randomness is seeded by (seed, stream position), so it
  too is independent of thread scheduling, host count and resumption.
* Shuffling (`shuffle`), per epoch, from (seed, epoch):
    - 'thorough': one global permutation of all N indices. (The paper, 4.2.1:
      "shuffle training examples more thoroughly".)
    - 'within_shard': the index space is cut into contiguous shards of
      `shuffle_shard_size` examples (a stand-in for the original's record files);
      shards are visited in a random order and examples are shuffled inside each
      shard, so consecutive examples come from one shard at a time and a mini-batch
      smaller than a shard mixes one shard (two at a boundary). This is the weaker
      shuffling the paper's 4.2.1 describes turning on ("within-shard shuffling").
    - 'shards_only': shards in a random order, examples inside a shard in stored
      order, so the same examples keep landing in the same mini-batches (the
      situation within-shard shuffling fixed). Note TFDS already hash-shuffled the stored
      order once at preparation time.
* Training preprocessing (Inception recipe): random crop covering 8%-100% of the
  image area with aspect ratio (w/h) in [3/4, 4/3] (log-uniform), up to
  `crop_max_attempts` (10) tries, else the evaluation centre crop; resize to
  `image_size` (bilinear, antialiased); horizontal flip with probability 1/2; then
  photometric distortions in a random order per example, clipping to [0, 1] after
  each:

      distortions   brightness delta   contrast factor   saturation factor   hue delta
      'full'        +-32/255           [0.5, 1.5]        [0.5, 1.5]          +-0.2
      'reduced'     +-16/255           [0.75, 1.25]      [0.75, 1.25]        +-0.1
      'none'        -                  -                 -                   -

  'full' is the TF-slim Inception `distort_color`. The paper (4.2.1, "reduce the
  photometric distortions") gives no numbers; 'reduced' is our choice: every range
  halved. Hue deltas are fractions of the hue circle (0.2 = 72 degrees); contrast
  scales around each channel's image mean; saturation scales HSV saturation.
* Evaluation: one central square crop whose side is 0.875 of the shorter side,
  resized to `image_size` (the same region as "resize the shorter side to 256, crop
  the central 224x224"; cropping first is cheaper and avoids one resampling). No
  randomness. The whole split is returned: the last batch is padded with zeros and
  its `mask` (float32, 1 = real example) marks the padding.
* Output: images float32 (B, H, W, 3), labels int32 (B,). `normalization='inception'`
  (default) maps [0, 1] to [-1, 1] as the Inception models do; 'mean_std' subtracts
  the ImageNet RGB mean (0.485, 0.456, 0.406) and divides by the std (0.229, 0.224,
  0.225).
* Decoding: TFDS decodes JPEG bytes (PIL; OpenCV if installed) inside `source[i]`; that call, the crop,
  resize and distortions run in a `concurrent.futures` thread pool (`num_workers`;
  PIL and large NumPy operations release the GIL). A background thread keeps
  `prefetch` batches ready and, given a sharding, puts them on device (multi-host:
  as global arrays built from each host's share).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import ml_collections
import numpy as np
from PIL import Image

from bn_research import checks

NAME = 'imagenet2012'
NUM_CLASSES = 1000
SOURCES = ('tfds',)
DISTORTIONS = ('full', 'reduced', 'none')
SHUFFLES = ('thorough', 'within_shard', 'shards_only')
NORMALIZATIONS = ('inception', 'mean_std')
EVAL_CROP_FRACTION = 0.875            # 224 / 256
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

PREPARE_HELP = (
    'Prepare it once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
    '<data_dir>/downloads/manual/ and run, with requirements-imagenet.txt installed '
    '(TensorFlow, importlib_resources), `python -m bn_research.data.imagenet prepare '
    '<data_dir>`. See the bn_research.data.imagenet docstring.')

# Stream tags mixed into the seeds so that the data order and the augmentations draw
# from unrelated random streams.
_ORDER_STREAM = 0x0D0
_AUGMENT_STREAM = 0xA06


@dataclasses.dataclass(frozen=True)
class ColorJitter:
  """Ranges of the Inception photometric distortions (images in [0, 1])."""
  brightness: float                   # delta uniform in [-b, b], added
  contrast: tuple[float, float]       # factor uniform in [lo, hi]
  saturation: tuple[float, float]     # factor uniform in [lo, hi]
  hue: float                          # delta uniform in [-h, h], fraction of the circle


DISTORTION_STRENGTHS: dict[str, Optional[ColorJitter]] = {
    'full': ColorJitter(brightness=32 / 255, contrast=(0.5, 1.5),
                        saturation=(0.5, 1.5), hue=0.2),
    'reduced': ColorJitter(brightness=16 / 255, contrast=(0.75, 1.25),
                           saturation=(0.75, 1.25), hue=0.1),
    'none': None,
}


# ---------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------

def imagenet_data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The `config.data` block for ImageNet runs; keyword arguments override defaults.

  Unknown keys raise ValueError (a typo must not silently fall back to a default).
  """
  c = ml_collections.ConfigDict()
  c.name = NAME                        # any TFDS name with image/label features
  c.source = 'tfds'
  c.data_dir = ''                      # TFDS data_dir holding imagenet2012/5.1.0/
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.image_size = 224
  c.channels = 3
  c.num_classes = NUM_CLASSES
  c.distortions = 'full'               # 'full' | 'reduced' | 'none'
  c.shuffle = 'thorough'               # 'thorough' | 'within_shard' | 'shards_only'
  c.shuffle_shard_size = 1024          # examples per shard for the shard-based orders
  c.crop_area_range = (0.08, 1.0)
  c.crop_aspect_ratio_range = (3 / 4, 4 / 3)
  c.crop_max_attempts = 10
  c.random_flip = True
  c.eval_crop_fraction = EVAL_CROP_FRACTION
  c.normalization = 'inception'        # [-1, 1]; or 'mean_std'
  c.num_workers = 8                    # decode/augment threads; 0: in the caller
  c.prefetch = 2                       # batches kept ready; 0: no background thread
  # Shared schema with the in-memory datasets; ImageNet uses its official splits,
  # so this pipeline does not read it.
  c.split_seed = 0
  for key, value in overrides.items():
    if key not in c:
      raise ValueError(f'imagenet_data_config: unknown key {key!r}; known: '
                       f'{", ".join(sorted(c.keys()))}.')
    if isinstance(value, os.PathLike):
      value = os.fspath(value)
    c[key] = value
  return c


# Every key of the ImageNet `data` block, with what it accepts (bn_research/checks.py).
IMAGENET_KEYS = {
    'data.name': checks.Text(nonempty=True, note='a TFDS dataset name'),
    'data.source': checks.Choice(SOURCES),
    'data.data_dir': checks.Text(),
    'data.train_split': checks.Text(nonempty=True),
    'data.eval_split': checks.Text(nonempty=True),
    'data.image_size': checks.Int(1),
    'data.channels': checks.Int(3, 3, note='ImageNet images have 3 channels'),
    'data.num_classes': checks.Int(2),
    'data.distortions': checks.Choice(DISTORTIONS),
    'data.shuffle': checks.Choice(SHUFFLES),
    'data.shuffle_shard_size': checks.Int(1),
    'data.crop_area_range': checks.Range(0.0, 1.0),
    'data.crop_aspect_ratio_range': checks.Range(0.0, math.inf),
    'data.crop_max_attempts': checks.Int(0),
    'data.random_flip': checks.Bool(),
    'data.eval_crop_fraction': checks.Float(0.0, 1.0, low_open=True),
    'data.normalization': checks.Choice(NORMALIZATIONS),
    'data.num_workers': checks.Int(0, note='0: decode in the caller'),
    'data.prefetch': checks.Int(0, note='0: no background thread'),
    'data.split_seed': checks.Int(0, checks.SEED_LIMIT - 1, note='not read for ImageNet'),
}


def validate_imagenet_config(cfg: ml_collections.ConfigDict, *,
                             check_data_dir: bool = True) -> None:
  """Raises ValueError naming the first bad value. Cheap: reads no data.

  Keys other than name/source/data_dir/image_size/distortions/shuffle/num_workers/
  prefetch are optional (defaults as in `imagenet_data_config`), so a base config
  with `data.name = 'imagenet2012'` validates too.

  Args:
    cfg: the data config.
    check_data_dir: also require `data_dir` to be set and (for local paths) exist.
  """
  checks.check_keys(cfg, IMAGENET_KEYS, 'data.')
  for key in ('name', 'image_size', 'distortions', 'shuffle', 'num_workers',
              'prefetch'):
    if key not in cfg:
      raise ValueError(f'data.{key} is missing; ImageNet configs start from '
                       'imagenet.imagenet_data_config().')
  if check_data_dir:
    data_dir = cfg.get('data_dir')
    if not data_dir:
      raise ValueError('data.data_dir is not set: name the TFDS data_dir that holds '
                       f'{cfg.name}/ (prepared as ArrayRecord). {PREPARE_HELP}')
    if '://' not in str(data_dir) and not os.path.isdir(data_dir):
      raise ValueError(f'data.data_dir={data_dir!r} does not exist. {PREPARE_HELP}')


# ---------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------

def open_tfds_split(name: str, split: str, data_dir: str) -> Sequence[dict]:
  """Random-access view of one prepared TFDS split: `len(src)`, `src[i] -> dict`.

  Uses `tfds.builder(...).as_data_source` (no TensorFlow; needs ArrayRecord files).
  Never downloads or prepares anything.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared under data_dir={data_dir!r} '
          f'(looked for {builder.data_dir}). {PREPARE_HELP}') from e
    if isinstance(e, NotImplementedError):
      raise RuntimeError(
          f'{builder.data_dir} holds {name!r} in a format without random access '
          '(probably TFRecord, the TFDS default). Delete that folder and prepare it '
          f'again as ArrayRecord: `python -m bn_research.data.imagenet prepare {data_dir}` '
          f'(or `tfds build {name} --data_dir={data_dir} --file_format=array_record`).'
      ) from e
    raise


def prepare_imagenet2012(data_dir: str, *, manual_dir: Optional[str] = None,
                         name: str = NAME) -> None:
  """One-time conversion of the ILSVRC 2012 tars to TFDS ArrayRecord. Needs TensorFlow.

  Same as `tfds build imagenet2012 --data_dir=DATA_DIR --file_format=array_record`,
  without the TFDS command line's apache-beam requirement. `manual_dir` defaults to
  `<data_dir>/downloads/manual`. Also needs importlib_resources (see the module
  docstring).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  missing = [m for m in ('tensorflow', 'importlib_resources')
             if importlib.util.find_spec(m) is None]
  if missing:
    raise ImportError(
        f'Preparing ImageNet needs {" and ".join(missing)} (the TFDS imagenet2012 '
        'builder imports TensorFlow; TFDS 4.9.10 also needs importlib_resources on '
        'Python >= 3.9 to prepare any dataset, tensorflow/datasets#11212): install '
        'requirements-imagenet.txt in the environment that runs this once. Training '
        'reads the prepared data without them.')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=download_config)


# ---------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------

def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: str,
                shard_size: int = 1024) -> np.ndarray:
  """The example indices of one epoch, in visiting order (int64, a permutation)."""
  if shuffle not in SHUFFLES:
    raise ValueError(f'shuffle={shuffle!r}; allowed: {", ".join(SHUFFLES)}.')
  rng = np.random.default_rng([seed, _ORDER_STREAM, epoch])
  if shuffle == 'thorough':
    return rng.permutation(num_examples)
  num_shards = -(-num_examples // shard_size)
  shard_rank = rng.permutation(num_shards)            # when each shard is visited
  shard_of = np.arange(num_examples) // shard_size
  if shuffle == 'within_shard':
    within = rng.random(num_examples)                  # random order inside a shard
  else:                                                # 'shards_only': stored order
    within = (np.arange(num_examples) % shard_size) / shard_size
  return np.argsort(shard_rank[shard_of] + within, kind='stable')


# ---------------------------------------------------------------------------------
# Image operations (NumPy / PIL), deterministic given an np.random.Generator
# ---------------------------------------------------------------------------------

def central_crop_box(height: int, width: int, fraction: float = EVAL_CROP_FRACTION
                     ) -> tuple[int, int, int, int]:
  """(top, left, h, w) of the central square with side `fraction` x shorter side."""
  side = max(1, int(fraction * min(height, width)))
  return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def random_crop_box(rng: np.random.Generator, height: int, width: int, *,
                    area_range: tuple[float, float] = (0.08, 1.0),
                    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
                    max_attempts: int = 10,
                    fallback_fraction: float = EVAL_CROP_FRACTION
                    ) -> tuple[int, int, int, int]:
  """Inception-style crop (top, left, h, w): area fraction and aspect ratio (w/h)
  sampled (the ratio log-uniformly); after `max_attempts` misfits, the centre crop."""
  area = height * width
  log_lo, log_hi = math.log(aspect_ratio_range[0]), math.log(aspect_ratio_range[1])
  for _ in range(max_attempts):
    target = area * rng.uniform(area_range[0], area_range[1])
    ratio = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return central_crop_box(height, width, fallback_fraction)


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
  """Inverse of `rgb_to_hsv`."""
  h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
  n = np.array([5.0, 3.0, 1.0], hsv.dtype)            # R, G, B
  k = (n + h * 6.0) % 6.0
  return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


# The four distortions below act on channel planes (3, H, W), float32 in [0, 1]
# (planes keep the per-pixel arithmetic on contiguous memory). Saturation and hue are
# closed forms of "convert to HSV, change S (clipped to [0, 1]) or H, convert back":
# V (the max channel) and the chroma C = max - min determine every channel once the
# hue is known, and scaling S by f scales each channel's distance below V by
# min(f, V / C). `rgb_to_hsv` / `hsv_to_rgb` above are the reference the tests hold
# them to.

def _max_min(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  r, g, b = planes
  return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _adjust_brightness(planes: np.ndarray, delta: np.float32) -> np.ndarray:
  return planes + delta


def _adjust_contrast(planes: np.ndarray, factor: np.float32) -> np.ndarray:
  mean = planes.reshape(3, -1).mean(axis=1, dtype=np.float32)[:, None, None]
  return planes * factor + mean * (np.float32(1) - factor)


def _adjust_saturation(planes: np.ndarray, factor: np.float32) -> np.ndarray:
  v, m = _max_min(planes)
  scale = np.minimum(factor, v / np.maximum(v - m, np.float32(1e-12)))
  return v + (planes - v) * scale


def _adjust_hue(planes: np.ndarray, delta: np.float32) -> np.ndarray:
  r, g, b = planes
  v, m = _max_min(planes)
  chroma = v - m
  safe = np.where(chroma > 0, chroma, np.float32(1))
  hue6 = np.where(r == v, (g - b) / safe,
                  np.where(g == v, (b - r) / safe + np.float32(2), (r - g) / safe + np.float32(4)))
  hue6 += np.float32(6) * delta
  hue6 -= np.float32(6) * np.floor(hue6 * np.float32(1 / 6))   # into [0, 6)
  out = np.empty_like(planes)
  for channel, n in enumerate((5.0, 3.0, 1.0)):
    k = hue6 + np.float32(n)                                     # [n, n + 6)
    k -= np.float32(6) * (k >= 6)                                # mod 6
    out[channel] = v - chroma * np.clip(np.minimum(k, np.float32(4) - k), 0, 1)
  return out


def distort_color(image: np.ndarray, rng: np.random.Generator,
                  jitter: Optional[ColorJitter]) -> np.ndarray:
  """Brightness, contrast, saturation and hue jitter in a random order.

  `image` is float32 (H, W, 3) in [0, 1]; so is the result (clipped after each op).
  The random draws are the same for every `jitter` (one order, four uniforms), so
  two strengths applied with equal generators differ only in the sizes of the
  changes.
  """
  if jitter is None:
    return image
  order = rng.permutation(4)
  u = rng.random(4)
  params = (
      (2 * u[0] - 1) * jitter.brightness,
      jitter.contrast[0] + u[1] * (jitter.contrast[1] - jitter.contrast[0]),
      jitter.saturation[0] + u[2] * (jitter.saturation[1] - jitter.saturation[0]),
      (2 * u[3] - 1) * jitter.hue,
  )
  ops = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
  planes = np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)
  for i in order:
    planes = ops[i](planes, np.float32(params[i]))
    np.clip(planes, 0.0, 1.0, out=planes)
  return np.moveaxis(planes, 0, -1)


def normalize(image01: np.ndarray, normalization: str = 'inception') -> np.ndarray:
  """[0, 1] float to the network's input range."""
  if normalization == 'inception':
    return image01 * np.float32(2.0) - np.float32(1.0)
  if normalization == 'mean_std':
    return (image01 - IMAGENET_MEAN) / IMAGENET_STD
  raise ValueError(f'normalization={normalization!r}; allowed: {", ".join(NORMALIZATIONS)}.')


def to_pil_rgb(image: Any) -> Image.Image:
  """An RGB PIL image from encoded bytes or a uint8 (H, W[, C]) array (C in 1, 3, 4)."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    img = Image.open(io.BytesIO(bytes(image)))
    return img if img.mode == 'RGB' else img.convert('RGB')
  if isinstance(image, Image.Image):
    return image if image.mode == 'RGB' else image.convert('RGB')
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise TypeError(f'expected a uint8 image, got dtype {arr.dtype}')
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f'expected an (H, W, 1|3|4) image, got shape {arr.shape}')
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  elif arr.shape[-1] == 4:
    arr = arr[..., :3]
  return Image.fromarray(np.ascontiguousarray(arr))


def _crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  top, left, h, w = box
  out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
  return np.asarray(out, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  image_size: int = 224
  distortions: str = 'full'
  crop_area_range: tuple[float, float] = (0.08, 1.0)
  crop_aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
  crop_max_attempts: int = 10
  random_flip: bool = True
  eval_crop_fraction: float = EVAL_CROP_FRACTION
  normalization: str = 'inception'

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> 'PreprocessOptions':
    d = cls()
    return cls(
        image_size=int(cfg.image_size),
        distortions=str(cfg.distortions),
        crop_area_range=tuple(float(v) for v in cfg.get('crop_area_range', d.crop_area_range)),
        crop_aspect_ratio_range=tuple(
            float(v) for v in cfg.get('crop_aspect_ratio_range', d.crop_aspect_ratio_range)),
        crop_max_attempts=int(cfg.get('crop_max_attempts', d.crop_max_attempts)),
        random_flip=bool(cfg.get('random_flip', d.random_flip)),
        eval_crop_fraction=float(cfg.get('eval_crop_fraction', d.eval_crop_fraction)),
        normalization=str(cfg.get('normalization', d.normalization)))


def preprocess_train(image: Any, rng: np.random.Generator,
                     opts: PreprocessOptions = PreprocessOptions()) -> np.ndarray:
  """Random crop, resize, flip, photometric distortions, normalisation -> float32.

  Draw order: crop, flip, then colour; so for equal generators, crops and flips do
  not depend on `opts.distortions`.
  """
  img = to_pil_rgb(image)
  box = random_crop_box(rng, img.height, img.width, area_range=opts.crop_area_range,
                        aspect_ratio_range=opts.crop_aspect_ratio_range,
                        max_attempts=opts.crop_max_attempts,
                        fallback_fraction=opts.eval_crop_fraction)
  pixels = _crop_resize(img, box, opts.image_size)
  if opts.random_flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  x = pixels.astype(np.float32) * np.float32(1 / 255)
  x = distort_color(x, rng, DISTORTION_STRENGTHS[opts.distortions])
  return np.ascontiguousarray(normalize(x, opts.normalization), dtype=np.float32)


def preprocess_eval(image: Any, opts: PreprocessOptions = PreprocessOptions()) -> np.ndarray:
  """Central crop (0.875 of the shorter side), resize, normalisation -> float32."""
  img = to_pil_rgb(image)
  box = central_crop_box(img.height, img.width, opts.eval_crop_fraction)
  x = _crop_resize(img, box, opts.image_size).astype(np.float32) * np.float32(1 / 255)
  return np.ascontiguousarray(normalize(x, opts.normalization), dtype=np.float32)


# ---------------------------------------------------------------------------------
# Background prefetch
# ---------------------------------------------------------------------------------

_ITEM, _END, _ERROR = 'item', 'end', 'error'


def prefetch_in_background(items: Iterable[Any], depth: int,
                           transform: Callable[[Any], Any] = lambda x: x,
                           name: str = 'imagenet-prefetch') -> Iterator[Any]:
  """Iterates `items` (and applies `transform`) in a daemon thread, `depth` ahead.

  Errors in the thread are re-raised in the consumer. Closing or dropping the
  returned generator stops the thread after the item it is working on.
  """
  if depth <= 0:
    for item in items:
      yield transform(item)
    return
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(entry) -> bool:
    while not stop.is_set():
      try:
        q.put(entry, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for item in items:
        if stop.is_set() or not put((_ITEM, transform(item))):
          return
      put((_END, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((_ERROR, e))

  thread = threading.Thread(target=work, name=name, daemon=True)
  thread.start()
  try:
    while True:
      kind, value = q.get()
      if kind == _END:
        return
      if kind == _ERROR:
        raise value
      yield value
  finally:
    stop.set()


def _placer(sharding: Any, process_count: int) -> Callable[[dict], dict]:
  """Host batch -> device arrays laid out by `sharding` (None: stay on the host)."""
  if sharding is None:
    return lambda batch: batch
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return lambda batch: jax.device_put(batch, sharding)

  def place(batch):
    return {k: jax.make_array_from_process_local_data(
        sharding, v, (v.shape[0] * process_count,) + v.shape[1:]) for k, v in batch.items()}
  return place


# ---------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------

class ImageNetPipeline:
  """ImageNet training and evaluation batches for one host.

  Args:
    config: a data config (`imagenet_data_config()`), validated here.
    batch_size: this host's training batch B; the global batch is
      B * process_count.
    seed: data-order and augmentation seed (>= 0).
    process_index, process_count: this host among all; default
      `jax.process_index()` / `jax.process_count()`.
    train_source, eval_source: random-access sequences of {'image': uint8 array or
      encoded bytes, 'label': int}; default: the TFDS splits under
      `config.data_dir`. (Injected in tests.)

  Attributes:
    num_train_examples, num_eval_examples, num_classes (1000), global_batch_size,
    steps_per_epoch (float).
  """

  num_classes = NUM_CLASSES

  def __init__(self, config: ml_collections.ConfigDict, *, batch_size: int, seed: int,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               train_source: Optional[Sequence[dict]] = None,
               eval_source: Optional[Sequence[dict]] = None):
    validate_imagenet_config(
        config, check_data_dir=train_source is None or eval_source is None)
    if not checks.is_int(batch_size) or batch_size <= 0:
      raise ValueError(f'batch_size={batch_size!r} must be a positive integer.')
    if not checks.is_int(seed) or seed < 0:
      raise ValueError(f'seed={seed!r} must be an integer >= 0.')
    if process_index is None or process_count is None:
      # Imported here, not at the top: preparing the data uses this module, not JAX.
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.process_index, self.process_count = int(process_index), int(process_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} is not in '
                       f'[0, process_count={self.process_count}).')
    self.config = config
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.options = PreprocessOptions.from_config(config)
    self.shuffle = str(config.shuffle)
    self.shuffle_shard_size = int(config.get('shuffle_shard_size', 1024))
    self.num_workers = int(config.num_workers)
    self.prefetch = int(config.prefetch)
    name, data_dir = str(config.name), config.get('data_dir')
    self.train_source = (train_source if train_source is not None else
                         open_tfds_split(name, config.get('train_split', 'train'), data_dir))
    self.eval_source = (eval_source if eval_source is not None else
                        open_tfds_split(name, config.get('eval_split', 'validation'), data_dir))
    self.num_train_examples = len(self.train_source)
    self.num_eval_examples = len(self.eval_source)
    if self.num_train_examples == 0:
      raise ValueError(f'the training split of {name!r} is empty.')
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

  # -- bookkeeping ----------------------------------------------------------------

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.process_count

  @property
  def steps_per_epoch(self) -> float:
    return self.num_train_examples / self.global_batch_size

  def close(self) -> None:
    """Shuts the worker pool down; a later batch starts a new one."""
    with self._lock:
      pool, self._pool = self._pool, None
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self) -> 'ImageNetPipeline':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _map(self, fn: Callable, items: Sequence) -> list:
    if self.num_workers == 0 or len(items) <= 1:
      return [fn(x) for x in items]
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.num_workers, thread_name_prefix='imagenet-worker')
      pool = self._pool
    return list(pool.map(fn, items))

  # -- order ------------------------------------------------------------------------

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Training example indices of `epoch` in visiting order (cached, two epochs)."""
    with self._lock:
      order = self._orders.get(epoch)
    if order is None:
      order = epoch_order(self.num_train_examples, seed=self.seed, epoch=epoch,
                          shuffle=self.shuffle, shard_size=self.shuffle_shard_size)
      with self._lock:
        self._orders[epoch] = order
        while len(self._orders) > 2:
          self._orders.pop(min(self._orders))
    return order

  def train_positions(self, step: int) -> np.ndarray:
    """Global stream positions of this host's examples at `step`, shape (B,)."""
    first = step * self.global_batch_size + self.process_index * self.batch_size
    return first + np.arange(self.batch_size, dtype=np.int64)

  def train_indices(self, step: int) -> np.ndarray:
    """Training-split indices of this host's examples at `step`, shape (B,)."""
    positions = self.train_positions(step)
    epochs, offsets = np.divmod(positions, self.num_train_examples)
    out = np.empty(self.batch_size, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.epoch_order(int(e))[offsets[sel]]
    return out

  # -- batches ------------------------------------------------------------------------

  def _train_example(self, item: tuple[int, int]) -> tuple[np.ndarray, int]:
    index, position = item
    example = self.train_source[index]
    rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, position])
    return preprocess_train(example['image'], rng, self.options), int(example['label'])

  def _eval_example(self, index: int) -> tuple[np.ndarray, int]:
    example = self.eval_source[index]
    return preprocess_eval(example['image'], self.options), int(example['label'])

  def train_batch(self, step: int) -> dict:
    """This host's batch for `step` (computed now, no prefetching)."""
    items = list(zip(self.train_indices(step).tolist(), self.train_positions(step).tolist()))
    results = self._map(self._train_example, items)
    return {'image': np.stack([r[0] for r in results]),
            'label': np.asarray([r[1] for r in results], np.int32)}

  def train_batches(self, start_step: int = 0, *, num_steps: Optional[int] = None,
                    sharding: Any = None) -> Iterator[dict]:
    """Batches {'image': (B, H, W, 3) float32, 'label': (B,) int32} for steps
    start_step, start_step + 1, ... (endless unless `num_steps`), prefetched in the
    background; with `sharding`, as device arrays (global arrays on several hosts)."""
    if not checks.is_int(start_step) or start_step < 0:
      raise ValueError(f'start_step={start_step!r} must be an integer >= 0.')
    stop = None if num_steps is None else start_step + num_steps

    def batches():
      step = start_step
      while stop is None or step < stop:
        yield self.train_batch(step)
        step += 1

    return prefetch_in_background(batches(), self.prefetch,
                                  _placer(sharding, self.process_count),
                                  name='imagenet-train-prefetch')

  def num_eval_batches(self, batch_size: Optional[int] = None) -> int:
    per_host = self.batch_size if batch_size is None else int(batch_size)
    return -(-self.num_eval_examples // (per_host * self.process_count))

  def eval_batch(self, index: int, batch_size: Optional[int] = None) -> dict:
    """This host's share of evaluation batch `index`, padded, with a float32 mask."""
    per_host = self.batch_size if batch_size is None else int(batch_size)
    first = index * per_host * self.process_count + self.process_index * per_host
    positions = first + np.arange(per_host)
    valid = positions < self.num_eval_examples
    results = self._map(self._eval_example, positions[valid].tolist())
    size = self.options.image_size
    image = np.zeros((per_host, size, size, 3), np.float32)
    label = np.zeros(per_host, np.int32)
    if results:
      image[valid] = np.stack([r[0] for r in results])
      label[valid] = [r[1] for r in results]
    return {'image': image, 'label': label, 'mask': valid.astype(np.float32)}

  def eval_batches(self, batch_size: Optional[int] = None, *,
                   sharding: Any = None) -> Iterator[dict]:
    """The whole evaluation split, in order, as this host's share of each global
    batch of batch_size * process_count (default batch_size: the training one).
    Every host yields the same number of batches; padding has mask 0."""
    per_host = self.batch_size if batch_size is None else batch_size
    if not checks.is_int(per_host) or per_host <= 0:
      raise ValueError(f'batch_size={per_host!r} must be a positive integer.')
    batches = (self.eval_batch(i, per_host) for i in range(self.num_eval_batches(per_host)))
    return prefetch_in_background(batches, self.prefetch,
                                  _placer(sharding, self.process_count),
                                  name='imagenet-eval-prefetch')


def main(argv: Optional[Sequence[str]] = None) -> None:
  """`python -m bn_research.data.imagenet prepare DATA_DIR [--manual_dir DIR]`."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m bn_research.data.imagenet',
      description='Convert the ILSVRC 2012 tars to TFDS ArrayRecord (once; needs '
                  'requirements-imagenet.txt).')
  sub = parser.add_subparsers(dest='command', required=True)
  prep = sub.add_parser('prepare', help='prepare imagenet2012 under DATA_DIR')
  prep.add_argument('data_dir')
  prep.add_argument('--manual_dir', default=None,
                    help='folder with the two tars (default DATA_DIR/downloads/manual)')
  args = parser.parse_args(argv)
  prepare_imagenet2012(args.data_dir, manual_dir=args.manual_dir)


if __name__ == '__main__':
  main()
