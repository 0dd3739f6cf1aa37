"""Crop views for evaluation: which windows of an image a crop scheme averages over,
and the crop + resize + mirror of each as two interpolation matrices applied on the
device (`bn_research.evaluate` uses them).

A view is a window at a scale of the image's side and a position, resized back to
the image's size with bilinear weights (half-pixel centres, the window's edge pixels
repeated), mirrored left-right or not. As matrices, view = rows @ image @ cols.T per
channel, so every view of a batch is one einsum on the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

SCALES = (0.875, 0.75, 0.625)
POSITIONS = ('center', 'top_left', 'top_right', 'bottom_left', 'bottom_right')
MAX_CROPS = 1 + len(SCALES) * len(POSITIONS)

# GoogLeNet's 144 crops (Szegedy et al. 2014, Section 7), `multi:144`: the image
# resized to 4 sizes of its shorter side (256, 288, 320 and 352 for a 224 input; for
# another input size n, n x side / 224); from each, 3 squares of the shorter side
# (left, centre, right; top, middle, bottom for a portrait image); from each square
# the 4 corners and the centre at the input size and the square itself resized to it;
# each mirrored: 4 x 3 x 6 x 2 = 144 views.
GOOGLENET_INPUT = 224
GOOGLENET_SIDES = (256, 288, 320, 352)
SQUARES = ('first', 'middle', 'last')
GOOGLENET_POSITIONS = POSITIONS + ('whole',)
GOOGLENET_VIEWS = len(GOOGLENET_SIDES) * len(SQUARES) * len(GOOGLENET_POSITIONS) * 2


@dataclasses.dataclass(frozen=True)
class View:
  """One view of an image: the window at `scale` of the side, at `position`, resized
  back to the image's size, mirrored left-right if `flip`. A GoogLeNet view (`side`
  > 0) is instead the window at `position` of `square` once the image's shorter side
  is resized to `side` (on the 224-pixel scale); `scale` is then unused."""
  scale: float = 1.0
  position: str = 'center'
  flip: bool = False
  side: int = 0
  square: str = ''

  @property
  def name(self) -> str:
    where = (f'{self.square}@{self.side}:{self.position}' if self.side
             else f'{self.position}@{self.scale:g}')
    return where + (',flip' if self.flip else '')


def googlenet_views() -> list[View]:
  """The 144 views of `multi:144`, sizes first, then squares, positions, mirror."""
  return [View(position=p, flip=f, side=side, square=q) for side in GOOGLENET_SIDES
          for q in SQUARES for p in GOOGLENET_POSITIONS for f in (False, True)]


def _crops(n: int) -> list[View]:
  """The first n crops: the whole image, then each scale's centre and corners."""
  windows = [View()] + [View(s, p) for s in SCALES for p in POSITIONS]
  return windows[:n]


def parse_scheme(text: str) -> list[View]:
  """The views of a crop scheme: 'center', 'flip' or 'multi:N'.

  Raises:
    ValueError: one line naming the scheme and what is allowed.
  """
  allowed = (f'center, flip, multi:N with N in [1, {MAX_CROPS}], or '
             f'multi:{GOOGLENET_VIEWS} (GoogLeNet\'s crops)')
  if text == 'center':
    return [View()]
  if text == 'flip':
    return [View(), View(flip=True)]
  if text == f'multi:{GOOGLENET_VIEWS}':
    return googlenet_views()
  kind, _, count = text.partition(':')
  if kind != 'multi' or not count.isdigit() or not 1 <= int(count) <= MAX_CROPS:
    raise ValueError(f'--crops={text!r}; allowed: {allowed}.')
  return [dataclasses.replace(v, flip=f) for v in _crops(int(count)) for f in (False, True)]


def window(view: View, height: int, width: int) -> tuple[float, float, float, float]:
  """(top, left, crop height, crop width) of the view's window in an image: whole
  pixels, except for GoogLeNet views (a square image is taken as the input size)."""
  if view.side:
    return googlenet_window(view, height, width, min(height, width))
  ch, cw = round(view.scale * height), round(view.scale * width)
  rows = {'center': (height - ch) // 2, 'top_left': 0, 'top_right': 0,
          'bottom_left': height - ch, 'bottom_right': height - ch}
  cols = {'center': (width - cw) // 2, 'top_left': 0, 'bottom_left': 0,
          'top_right': width - cw, 'bottom_right': width - cw}
  return rows[view.position], cols[view.position], ch, cw


def googlenet_window(view: View, height: int, width: int, size: int
                     ) -> tuple[float, float, float, float]:
  """A GoogLeNet view's window (top, left, h, w) in a height x width image, in its
  pixels (fractional), for a network input of `size` pixels."""
  short = min(height, width)
  offset = (max(height, width) - short) * SQUARES.index(view.square) / 2
  top, left = (offset, 0.0) if height > width else (0.0, offset)
  if view.position == 'whole':
    return top, left, float(short), float(short)
  resized = size * view.side / GOOGLENET_INPUT   # the square's side once resized
  per_pixel = short / resized                     # image pixels per resized pixel
  margin = (resized - size) * per_pixel           # from a corner to the opposite one
  dy, dx = {'center': (margin / 2, margin / 2), 'top_left': (0.0, 0.0),
            'top_right': (0.0, margin), 'bottom_left': (margin, 0.0),
            'bottom_right': (margin, margin)}[view.position]
  return top + dy, left + dx, size * per_pixel, size * per_pixel


def check_scheme_fits(text: str, views: Sequence[View], height: int, width: int) -> None:
  """Every crop of a scheme must be a window of at least 2 pixels a side that is not
  the whole image (else it is the whole image again, or not an image).

  Raises:
    ValueError: one line naming the scheme, the image size and the largest that fits.
  """
  if any(v.side for v in views) and height != width:
    raise ValueError(f'--crops={text!r} needs square network inputs (its crops are '
                     f'squares), not {height}x{width}; allowed for them: center, flip, '
                     'multi:N.')
  def fits(view):
    if view.side:
      return True                        # windows of 0.64 of the image and more
    _, _, ch, cw = window(view, height, width)
    return view.scale == 1.0 or (2 <= ch < height and 2 <= cw < width)
  if all(fits(v) for v in views):
    return
  largest = max((n for n in range(1, MAX_CROPS + 1) if all(map(fits, _crops(n)))))
  raise ValueError(f'--crops={text!r} does not fit the {height}x{width} images (a crop would '
                   'be the whole image or under 2 pixels); allowed for them: center, flip, '
                   f'multi:N with N <= {largest}.')


def interpolation_matrix(out_size: int, start: float, length: float, in_size: int):
  """(out_size, in_size) bilinear weights that resize pixels [start, start + length) of
  a row to out_size pixels (half-pixel centres; the window's edge positions repeat
  past its ends; a fractional window interpolates between pixels)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = start + min(max((i + 0.5) * length / out_size - 0.5, 0.0), length - 1.0)
    lo = min(int(math.floor(src)), in_size - 1)
    hi = min(lo + 1, in_size - 1)
    frac = src - lo
    a[i, lo] += 1.0 - frac
    a[i, hi] += frac
  return a


def view_matrices(view: View, height: int, width: int, out: Optional[int] = None):
  """(rows (h, H), cols (w, W)) float32: view = rows @ image @ cols.T per channel.

  The view is of an H x W image at its own size (h, w = H, W), or, with `out`, a
  GoogLeNet view of a square at `out` pixels: the image is then one of the three
  squares, resized to H = W pixels (`imagenet_images.preprocess_eval_squares`).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  if out is None:
    top, left, ch, cw = window(view, height, width)
    out_h, out_w = height, width
  else:
    top, left, ch, cw = googlenet_window(view, height, width, out)
    out_h = out_w = out
  rows = interpolation_matrix(out_h, top, ch, height)
  cols = interpolation_matrix(out_w, left, cw, width)
  if view.flip:
    cols = cols[::-1]
  return rows.astype(np.float32), np.ascontiguousarray(cols).astype(np.float32)


def apply_view(images, rows, cols):
  """(N, H, W, C) images -> the view (N, h, w, C): a crop, resize and flip in one."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.einsum('oh,nhwc,pw->nopc', rows, images, cols,
                    precision='highest').astype(images.dtype)
