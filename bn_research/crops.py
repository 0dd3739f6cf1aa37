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
from typing import Sequence

SCALES = (0.875, 0.75, 0.625)
POSITIONS = ('center', 'top_left', 'top_right', 'bottom_left', 'bottom_right')
MAX_CROPS = 1 + len(SCALES) * len(POSITIONS)


@dataclasses.dataclass(frozen=True)
class View:
  """One view of an image: the window at `scale` of the side, at `position`, resized
  back to the image's size, mirrored left-right if `flip`."""
  scale: float = 1.0
  position: str = 'center'
  flip: bool = False

  @property
  def name(self) -> str:
    return (f'{self.position}@{self.scale:g}' + (',flip' if self.flip else ''))


def _crops(n: int) -> list[View]:
  """The first n crops: the whole image, then each scale's centre and corners."""
  windows = [View()] + [View(s, p) for s in SCALES for p in POSITIONS]
  return windows[:n]


def parse_scheme(text: str) -> list[View]:
  """The views of a crop scheme: 'center', 'flip' or 'multi:N'.

  Raises:
    ValueError: one line naming the scheme and what is allowed.
  """
  allowed = f'center, flip, or multi:N with N in [1, {MAX_CROPS}]'
  if text == 'center':
    return [View()]
  if text == 'flip':
    return [View(), View(flip=True)]
  kind, _, count = text.partition(':')
  if kind != 'multi' or not count.isdigit() or not 1 <= int(count) <= MAX_CROPS:
    raise ValueError(f'--crops={text!r}; allowed: {allowed}.')
  return [dataclasses.replace(v, flip=f) for v in _crops(int(count)) for f in (False, True)]


def window(view: View, height: int, width: int) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) of the view's window in an image."""
  ch, cw = round(view.scale * height), round(view.scale * width)
  rows = {'center': (height - ch) // 2, 'top_left': 0, 'top_right': 0,
          'bottom_left': height - ch, 'bottom_right': height - ch}
  cols = {'center': (width - cw) // 2, 'top_left': 0, 'bottom_left': 0,
          'top_right': width - cw, 'bottom_right': width - cw}
  return rows[view.position], cols[view.position], ch, cw


def check_scheme_fits(text: str, views: Sequence[View], height: int, width: int) -> None:
  """Every crop of a scheme must be a window of at least 2 pixels a side that is not
  the whole image (else it is the whole image again, or not an image).

  Raises:
    ValueError: one line naming the scheme, the image size and the largest that fits.
  """
  def fits(view):
    _, _, ch, cw = window(view, height, width)
    return view.scale == 1.0 or (2 <= ch < height and 2 <= cw < width)
  if all(fits(v) for v in views):
    return
  largest = max((n for n in range(1, MAX_CROPS + 1) if all(map(fits, _crops(n)))))
  raise ValueError(f'--crops={text!r} does not fit the {height}x{width} images (a crop would '
                   'be the whole image or under 2 pixels); allowed for them: center, flip, '
                   f'multi:N with N <= {largest}.')


def interpolation_matrix(out_size: int, start: int, length: int, in_size: int):
  """(out_size, in_size) bilinear weights that resize pixels [start, start + length) of
  a row to out_size pixels (half-pixel centres; edge pixels repeat past the ends)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = min(max((i + 0.5) * length / out_size - 0.5, 0.0), length - 1.0)
    lo = int(math.floor(src))
    hi = min(lo + 1, length - 1)
    frac = src - lo
    a[i, start + lo] += 1.0 - frac
    a[i, start + hi] += frac
  return a


def view_matrices(view: View, height: int, width: int):
  """(rows (H, H), cols (W, W)) float32: view = rows @ image @ cols.T per channel."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  top, left, ch, cw = window(view, height, width)
  rows = interpolation_matrix(height, top, ch, height)
  cols = interpolation_matrix(width, left, cw, width)
  if view.flip:
    cols = cols[::-1]
  return rows.astype(np.float32), np.ascontiguousarray(cols).astype(np.float32)


def apply_view(images, rows, cols):
  """(N, H, W, C) images -> the view (N, H, W, C): a crop, resize and flip in one."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.einsum('oh,nhwc,pw->nopc', rows, images, cols,
                    precision='highest').astype(images.dtype)
