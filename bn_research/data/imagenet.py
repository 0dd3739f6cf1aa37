"""ImageNet (ILSVRC 2012) input pipeline for the Inception experiments (paper Section 4.2).

Reads TFDS `imagenet2012` through `tfds.data_source` style random access (ArrayRecord
files, no TensorFlow at training time) with grain: JPEG bytes are decoded, cropped,
resized and flipped in uint8 on the host, in grain worker processes; the photometric
distortions and the normalisation run on the device (`bn_research.data.augment`).
This module imports neither JAX nor TensorFlow (grain's workers import it).

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
  batch the stream does not depend on the number of hosts, and a run resumed at step
  k sees exactly the batches of the uninterrupted run: the step is the stream's whole
  state. The same layout as `bn_research.inputs`.
* Per-example augmentation randomness is seeded by (seed, stream position): the host
  draws the crop, the flip and a uint32 seed from which the device draws the
  photometric distortions; so it too is independent of worker scheduling, host count
  and resumption.
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
  `image_size` (bilinear without antialiasing, as TF-slim's; the JPEG decoder's DCT
  scaling does the large reductions); horizontal flip with probability 1/2 (all on
  the host, in uint8); then, on the device, photometric distortions in a random order
  per example, clipping to [0, 1] after each:

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
* Host output: images uint8 (B, H, W, 3), labels int32 (B,), and per training example
  a uint32 `seed`; float32 images are made on the device and never cross the bus.
  There, `normalization='inception'` (default) maps [0, 1] to [-1, 1] as the
  Inception models do; 'mean_std' subtracts the ImageNet RGB mean (0.485, 0.456,
  0.406) and divides by the std (0.229, 0.224, 0.225).
* Decoding: PIL decodes the JPEG bytes straight to uint8, at a reduced DCT scale when
  the crop is at least twice the output size; OpenCV resizes (`_crop_resize`).
  grain runs the examples: `num_workers` worker processes (0: in this process), each
  keeping `prefetch` batches ready; the stream is a `grain.MapDataset` indexed by step, so
  opening it at step s is the whole of resuming.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import io
import math
import os
import weakref
from typing import Any, Iterator, Optional, Sequence

import cv2
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

# One OpenCV thread: the host's unit of parallelism is a grain worker process, and
# OpenCV's own thread pool in each of them would only compete for the same cores.
cv2.setNumThreads(1)


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


def color_parameters(u: Any, jitter: ColorJitter) -> Any:
  """(brightness delta, contrast factor, saturation factor, hue delta) from four
  uniforms in [0, 1) (the last axis of `u`; NumPy or jnp, float32 stays float32)."""
  lo = np.asarray([-jitter.brightness, jitter.contrast[0], jitter.saturation[0],
                   -jitter.hue], np.float32)
  hi = np.asarray([jitter.brightness, jitter.contrast[1], jitter.saturation[1],
                   jitter.hue], np.float32)
  return lo + u * (hi - lo)


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
  c.num_workers = 8                    # grain worker processes; 0: in this process
  c.prefetch = 2                       # batches each worker keeps ready (0 workers:
                                       # a thread this far ahead; 0: none)
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
    'data.num_workers': checks.Int(0, note='grain worker processes; 0: in this process'),
    'data.prefetch': checks.Int(0, note='batches each worker keeps ready'),
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
  Images come as their encoded bytes: the pipeline decodes them itself, straight to
  the size it needs (see `_crop_resize`). Never downloads or prepares anything.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    source = builder.as_data_source(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})
    if len(source):
      try:
        source[0]
      except ModuleNotFoundError:
        # A source that encodes on read (TFDS's mock data) needs TensorFlow for
        # bytes; its decoded images serve as well.
        source = builder.as_data_source(split=split)
    return source
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


def open_image(image: Any) -> Image.Image:
  """A PIL image from encoded bytes (opened, not yet decoded, so that the decoder can
  be told the size needed) or a uint8 (H, W[, C]) array (C in 1, 3, 4)."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(image)))
  if isinstance(image, Image.Image):
    return image
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise TypeError(f'expected a uint8 image, got dtype {arr.dtype}')
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
    raise ValueError(f'expected an (H, W, 1|3|4) image, got shape {arr.shape}')
  return Image.fromarray(np.ascontiguousarray(arr[..., :3] if arr.ndim == 3 else arr))


def _crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """uint8 (size, size, 3): the box (top, left, h, w) of `img`, resized bilinearly.

  The resize is bilinear interpolation at half-pixel centres with the crop's edge
  pixels repeated, without an antialiasing filter: what TF-slim's Inception
  preprocessing does (`tf.image.resize_images`, bilinear), computed by OpenCV
  (`cv2.INTER_LINEAR`, 11-bit fixed-point weights, so within one uint8 level of the
  exact float result; tests/test_grain_input.py checks it against float64 NumPy).

  A JPEG not yet decoded is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
  keeps the box at least `size` pixels on each side (`Image.draft`): the decoder's
  scaled inverse DCT is a low-pass filter, so the bilinear step then reduces by less
  than 2 on the box's shorter side and skips no pixel there, and decoding costs a
  fraction of a full decode. The box is mapped to the reduced image and rounded to
  whole pixels there (a shift of at most half a reduced pixel).
  """
  top, left, h, w = box
  height, width = img.height, img.width
  reduction = 1.0                          # the decoder's DCT scale: 1, 2, 4 or 8
  if img.format == 'JPEG':
    # None once decoded; else (mode, (0, 0, width / scale, height / scale)).
    drafted = img.draft('RGB', (math.ceil(width * size / w), math.ceil(height * size / h)))
    if drafted is not None:
      reduction = width / drafted[1][2]
  if img.mode not in ('RGB', 'L'):
    img = img.convert('RGB')               # CMYK, palette: convert before resampling
  pixels = np.asarray(img, dtype=np.uint8)  # decodes
  t, l = round(top / reduction), round(left / reduction)
  crop = pixels[t:max(t + 1, round((top + h) / reduction)),
                l:max(l + 1, round((left + w) / reduction))]
  out = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
  if out.ndim == 2:
    out = np.repeat(out[:, :, None], 3, axis=2)  # grayscale: after resizing, on fewer pixels
  return out


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  """The host-side (uint8) preprocessing options of a data config."""
  image_size: int = 224
  crop_area_range: tuple[float, float] = (0.08, 1.0)
  crop_aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
  crop_max_attempts: int = 10
  random_flip: bool = True
  eval_crop_fraction: float = EVAL_CROP_FRACTION

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> 'PreprocessOptions':
    d = cls()
    return cls(
        image_size=int(cfg.image_size),
        crop_area_range=tuple(float(v) for v in cfg.get('crop_area_range', d.crop_area_range)),
        crop_aspect_ratio_range=tuple(
            float(v) for v in cfg.get('crop_aspect_ratio_range', d.crop_aspect_ratio_range)),
        crop_max_attempts=int(cfg.get('crop_max_attempts', d.crop_max_attempts)),
        random_flip=bool(cfg.get('random_flip', d.random_flip)),
        eval_crop_fraction=float(cfg.get('eval_crop_fraction', d.eval_crop_fraction)))


def augmentation_rng(seed: int, position: int) -> np.random.Generator:
  """The generator of the example at global stream `position`: its crop, its flip and
  its device-side colour seed, in that order."""
  return np.random.default_rng([seed, _AUGMENT_STREAM, position])


def preprocess_train(image: Any, rng: np.random.Generator,
                     opts: PreprocessOptions = PreprocessOptions()) -> np.ndarray:
  """Random crop, resize, flip -> uint8 (size, size, 3). Draws the crop, then the flip.

  The photometric distortions and normalisation run on the device
  (`bn_research.data.augment`), from a seed drawn after these.
  """
  img = open_image(image)
  box = random_crop_box(rng, img.height, img.width, area_range=opts.crop_area_range,
                        aspect_ratio_range=opts.crop_aspect_ratio_range,
                        max_attempts=opts.crop_max_attempts,
                        fallback_fraction=opts.eval_crop_fraction)
  pixels = _crop_resize(img, box, opts.image_size)
  if opts.random_flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels)


def preprocess_eval(image: Any, opts: PreprocessOptions = PreprocessOptions()) -> np.ndarray:
  """Central crop (0.875 of the shorter side), resize -> uint8 (size, size, 3)."""
  img = open_image(image)
  box = central_crop_box(img.height, img.width, opts.eval_crop_fraction)
  return _crop_resize(img, box, opts.image_size)


def color_seed(rng: np.random.Generator) -> np.uint32:
  """The uint32 the device derives an example's photometric draws from."""
  return np.uint32(rng.integers(0, 2**32, dtype=np.uint64))


# ---------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------

def _define_grain_profiling_flag() -> None:
  """Gives grain's worker-profiling flag its value, unless absl parsed flags.

  grain 0.2.18 reads that absl flag when it starts workers in a process that imported
  JAX, and absl refuses to read flags before parsing (google/grain#1355, fixed after
  0.2.18); a program that does not parse absl flags would fail there.
  """
  # pylint: disable=g-import-not-at-top
  from absl import flags
  import grain  # defines the flag
  # pylint: enable=g-import-not-at-top
  del grain
  name = 'grain_enable_multiprocess_worker_profiling'
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
    flags.FLAGS[name].parse(flags.FLAGS[name].default)   # as if given: readable


# Iterators with worker processes not yet closed: closed at exit, before the
# interpreter tears down the modules their finalizers need.
_OPEN_WORKER_ITERATORS: 'weakref.WeakSet[Any]' = weakref.WeakSet()


@atexit.register
def _close_worker_iterators() -> None:
  for iterator in list(_OPEN_WORKER_ITERATORS):
    iterator.close()


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs first in each grain worker process."""
  del worker_index, worker_count
  _define_grain_profiling_flag()


class ImageNetPipeline:
  """ImageNet training and evaluation batches for one host, read by grain.

  Batches are uint8 images; the device turns them into the network's float32 input
  (`bn_research.data.augment`): training batches carry a per-example uint32 `seed`
  for the photometric distortions.

  Args:
    config: a data config (`imagenet_data_config()`), validated here.
    batch_size: this host's training batch B; the global batch is
      B * process_count.
    seed: data-order and augmentation seed (>= 0).
    process_index, process_count: this host among all; default
      `jax.process_index()` / `jax.process_count()`.
    train_source, eval_source: random-access sequences of {'image': uint8 array or
      encoded bytes, 'label': int}; default: the TFDS splits under
      `config.data_dir`. (Injected in tests; must pickle for grain workers.)

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
      # Imported here, not at the top: preparing the data and grain's worker
      # processes use this module, not JAX.
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.process_index, self.process_count = int(process_index), int(process_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} is not in '
                       f'[0, process_count={self.process_count}).')
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.options = PreprocessOptions.from_config(config)
    self.distortions = str(config.distortions)
    self.normalization = str(config.get('normalization', 'inception'))
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

  def __getstate__(self) -> dict:
    # Workers rebuild the epoch orders they need rather than receive them.
    return {**self.__dict__, '_orders': {}}

  # -- bookkeeping ----------------------------------------------------------------

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.process_count

  @property
  def steps_per_epoch(self) -> float:
    return self.num_train_examples / self.global_batch_size

  # -- order ------------------------------------------------------------------------

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Training example indices of `epoch` in visiting order (cached, two epochs)."""
    order = self._orders.get(epoch)
    if order is None:
      order = epoch_order(self.num_train_examples, seed=self.seed, epoch=epoch,
                          shuffle=self.shuffle, shard_size=self.shuffle_shard_size)
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
    epochs, offsets = np.divmod(self.train_positions(step), self.num_train_examples)
    return np.asarray([self.epoch_order(int(e))[o] for e, o in zip(epochs, offsets)],
                      np.int64)

  # -- examples (what grain's workers run) ----------------------------------------------

  def train_example(self, k: int) -> dict:
    """This host's k-th training example of the stream (step k // B, slot k % B):
    {'image': uint8 (S, S, 3), 'label': int32, 'seed': uint32}."""
    step, slot = divmod(int(k), self.batch_size)
    position = step * self.global_batch_size + self.process_index * self.batch_size + slot
    epoch, offset = divmod(position, self.num_train_examples)
    example = self.train_source[int(self.epoch_order(epoch)[offset])]
    rng = augmentation_rng(self.seed, position)
    image = preprocess_train(example['image'], rng, self.options)
    return {'image': image, 'label': np.int32(example['label']), 'seed': color_seed(rng)}

  def eval_example(self, k: int, per_host: int) -> dict:
    """This host's k-th evaluation example (batch k // per_host), masked past the end."""
    index, slot = divmod(int(k), per_host)
    position = (index * self.process_count + self.process_index) * per_host + slot
    if position >= self.num_eval_examples:
      size = self.options.image_size
      return {'image': np.zeros((size, size, 3), np.uint8), 'label': np.int32(0),
              'mask': np.float32(0)}
    example = self.eval_source[position]
    return {'image': preprocess_eval(example['image'], self.options),
            'label': np.int32(example['label']), 'mask': np.float32(1)}

  # -- batches ------------------------------------------------------------------------

  def _iterate(self, dataset: Any) -> Iterator[dict]:
    """Runs a grain MapDataset of batches: in `num_workers` processes, each with
    `prefetch` batches ready, or in this process (a thread `prefetch` batches ahead)."""
    import grain  # pylint: disable=g-import-not-at-top
    # No reader threads: a worker process is the unit of parallelism (PIL holds the
    # GIL for parts of decoding), and grain's default read-ahead of 500 elements
    # would hold hundreds of batches.
    ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if self.num_workers > 0:
      _define_grain_profiling_flag()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=max(self.prefetch, 1)),
                          worker_init_fn=_init_worker)
    elif self.prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(
          ds, prefetch_buffer_size=self.prefetch)
    iterator = iter(ds)
    if self.num_workers > 0:
      _OPEN_WORKER_ITERATORS.add(iterator)
    return iterator

  def train_dataset(self, start_step: int = 0,
                    num_steps: Optional[int] = None) -> Any:
    """grain.MapDataset whose element i is this host's batch of step start_step + i."""
    import grain  # pylint: disable=g-import-not-at-top
    if not checks.is_int(start_step) or start_step < 0:
      raise ValueError(f'start_step={start_step!r} must be an integer >= 0.')
    # "Endless" is a length no run reaches: MapDataset is lazy, nothing is allocated.
    stop = start_step + num_steps if num_steps is not None else 2**48
    b = self.batch_size
    return (grain.MapDataset.range(start_step * b, stop * b)
            .map(self.train_example).batch(b))

  def train_batch(self, step: int) -> dict:
    """This host's batch for `step`, computed now in this process."""
    return self.train_dataset(step, 1)[0]

  def train_batches(self, start_step: int = 0, *,
                    num_steps: Optional[int] = None) -> Iterator[dict]:
    """Batches {'image': (B, S, S, 3) uint8, 'label': (B,) int32, 'seed': (B,) uint32}
    of steps start_step, start_step + 1, ... (endless unless `num_steps`).

    The stream opened at step s yields exactly the batches the stream opened at 0
    yields from s on, whatever `num_workers`: the step is the iterator's state.
    """
    return self._iterate(self.train_dataset(start_step, num_steps))

  def num_eval_batches(self, batch_size: Optional[int] = None) -> int:
    per_host = self.batch_size if batch_size is None else int(batch_size)
    return -(-self.num_eval_examples // (per_host * self.process_count))

  def eval_dataset(self, batch_size: Optional[int] = None) -> Any:
    """grain.MapDataset of this host's share of each evaluation batch, padded."""
    import grain  # pylint: disable=g-import-not-at-top
    per_host = self.batch_size if batch_size is None else batch_size
    if not checks.is_int(per_host) or per_host <= 0:
      raise ValueError(f'batch_size={per_host!r} must be a positive integer.')
    per_host = int(per_host)
    return (grain.MapDataset.range(self.num_eval_batches(per_host) * per_host)
            .map(functools.partial(self.eval_example, per_host=per_host)).batch(per_host))

  def eval_batch(self, index: int, batch_size: Optional[int] = None) -> dict:
    """This host's share of evaluation batch `index`, padded, with a float32 mask."""
    return self.eval_dataset(batch_size)[index]

  def eval_batches(self, batch_size: Optional[int] = None) -> Iterator[dict]:
    """The whole evaluation split, in order, as this host's share of each global
    batch of batch_size * process_count (default batch_size: the training one):
    {'image': uint8, 'label': int32, 'mask': float32 (1 = real example)}. Every host
    yields the same number of batches; padding has mask 0."""
    return self._iterate(self.eval_dataset(batch_size))


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
