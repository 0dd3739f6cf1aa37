"""The host's side of ImageNet preprocessing, in uint8: crop boxes, decoding at the
scale a crop needs, crop + resize, flip (`bn_research.data.imagenet` runs these in
grain's workers; the photometric distortions run on the device,
`bn_research.data.augment`). Imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import cv2
import ml_collections
import numpy as np
from PIL import Image

from bn_research import crops

EVAL_CROP_FRACTION = 0.875            # 224 / 256

# The stream tag mixed into the augmentation seeds so that they and the data order
# (`bn_research.data.imagenet`) draw from unrelated random streams.
_AUGMENT_STREAM = 0xA06

# One OpenCV thread: the host's unit of parallelism is a grain worker process, and
# OpenCV's own thread pool in each of them would only compete for the same cores.
cv2.setNumThreads(1)


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


def square_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
  """(top, left, h, w) of the image's 3 squares of its shorter side along the longer
  one: left, centre, right (top, middle, bottom for a portrait image)."""
  short = min(height, width)
  offsets = [round((max(height, width) - short) * q / 2) for q in range(3)]
  return [(o, 0, short, short) if height > width else (0, o, short, short) for o in offsets]


def squares_size(image_size: int) -> int:
  """The side the squares are handed over at: GoogLeNet's largest resize of the
  shorter side (352 for a 224 input), so that every one of its crops is a window."""
  return round(image_size * max(crops.GOOGLENET_SIDES) / crops.GOOGLENET_INPUT)


def preprocess_eval_squares(image: Any, opts: PreprocessOptions = PreprocessOptions()
                            ) -> np.ndarray:
  """uint8 (3, S, S, 3): the image's three squares (`square_boxes`), each resized to
  S = `squares_size(image_size)`, for GoogLeNet's 144 crops (`--crops=multi:144`),
  which the device takes from them (`bn_research.crops`)."""
  img = open_image(image)
  img.load()                     # decoded once, in full, for the three squares
  size = squares_size(opts.image_size)
  return np.stack([_crop_resize(img, box, size) for box in square_boxes(img.height, img.width)])


def color_seed(rng: np.random.Generator) -> np.uint32:
  """The uint32 the device derives an example's photometric draws from."""
  return np.uint32(rng.integers(0, 2**32, dtype=np.uint64))
