"""The ImageNet data config, its validation, and the prepared TFDS splits.

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
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from bn_research import checks
from bn_research.data.imagenet_images import EVAL_CROP_FRACTION

NAME = 'imagenet2012'
NUM_CLASSES = 1000
SOURCES = ('tfds',)
DISTORTIONS = ('full', 'reduced', 'none')
SHUFFLES = ('thorough', 'within_shard', 'shards_only')
NORMALIZATIONS = ('inception', 'mean_std')
# What an evaluation example is: the central crop, or the three squares GoogLeNet's
# 144 crops are taken from (set by `python -m bn_research.evaluate --crops=multi:144`).
EVAL_VIEWS = ('center', 'squares')
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

PREPARE_HELP = (
    'Prepare it once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
    '<data_dir>/downloads/manual/ and run, with requirements-imagenet.txt installed '
    '(TensorFlow, importlib_resources), `python -m bn_research.data.imagenet prepare '
    '<data_dir>`. See the bn_research.data.imagenet_config docstring.')


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
  c.eval_views = 'center'              # or 'squares' (3, S, S, 3) per example
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
    'data.eval_views': checks.Choice(EVAL_VIEWS),
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
