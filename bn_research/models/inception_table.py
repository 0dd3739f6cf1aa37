"""The Inception variant's filter counts: the paper's appendix table (and TF-slim's
variant of it), the stem's widths, and the width of every normalized convolution.

Plain Python (no JAX): the model registry reads `normalized_widths` to check and
default group_norm's groups when a config is validated, before anything is imported
for training. `inception.py` builds the network from these tables.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple


TABLES = ('paper', 'tf_slim')
MIN_WIDTH = 8


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
  """One row of the appendix table.

  Attributes:
    name: the paper's name, e.g. '3a'.
    conv1x1: #1x1 filters (0: no 1x1 branch, as in the stride-2 modules).
    reduce3x3, conv3x3: the 3x3 branch's 1x1 reduction and 3x3 widths.
    reduce_double3x3, double3x3: the double-3x3 branch's reduction and both 3x3 widths.
    pool: 'avg' or 'max' (3x3 pooling).
    pool_proj: width of the 1x1 projection after the pool; 0 means pass-through.
    stride: 2 for the downsampling modules 3c and 4e, else 1.
  """
  name: str
  conv1x1: int
  reduce3x3: int
  conv3x3: int
  reduce_double3x3: int
  double3x3: int
  pool: str
  pool_proj: int
  stride: int = 1

  @property
  def out_channels_added(self) -> int:
    """Channels this module's conv branches produce (pass-through adds the input's)."""
    return self.conv1x1 + self.conv3x3 + self.double3x3 + self.pool_proj


# The paper's appendix table (Figure 5), in order. Stem (before 3a): convolution 7x7/2
# to 64, max pool 3x3/2, convolution 1x1 64 ("#3x3 reduce") and 3x3 192, max pool 3x3/2.
PAPER_TABLE: Tuple[ModuleSpec, ...] = (
    ModuleSpec('3a', 64, 64, 64, 64, 96, 'avg', 32),
    ModuleSpec('3b', 64, 64, 96, 64, 96, 'avg', 64),
    ModuleSpec('3c', 0, 128, 160, 64, 96, 'max', 0, stride=2),
    ModuleSpec('4a', 224, 64, 96, 96, 128, 'avg', 128),
    ModuleSpec('4b', 192, 96, 128, 96, 128, 'avg', 128),
    ModuleSpec('4c', 160, 128, 160, 128, 160, 'avg', 128),
    ModuleSpec('4d', 96, 128, 192, 160, 192, 'avg', 128),
    ModuleSpec('4e', 0, 128, 192, 192, 256, 'max', 0, stride=2),
    ModuleSpec('5a', 352, 192, 320, 160, 224, 'avg', 128),
    ModuleSpec('5b', 352, 192, 320, 192, 224, 'max', 128),
)

# TF-slim's inception_v2 (Mixed_3b .. Mixed_5c): the paper's table except the pool
# projections of 4c and 4d (slim's Mixed_4d and Mixed_4e), which are 96, not 128.
TF_SLIM_TABLE: Tuple[ModuleSpec, ...] = tuple(
    dataclasses.replace(m, pool_proj=96) if m.name in ('4c', '4d') else m
    for m in PAPER_TABLE)

STEM_WIDTHS = {'conv1': 64, 'conv2_reduce': 64, 'conv2': 192}
SEPARABLE_DEPTH_MULTIPLIER = 8


def module_table(table: str = 'paper') -> Tuple[ModuleSpec, ...]:
  """The inception modules' filter counts: 'paper' (appendix table) or 'tf_slim'."""
  if table not in TABLES:
    raise ValueError(f'unknown table {table!r}; allowed: {", ".join(TABLES)}.')
  return PAPER_TABLE if table == 'paper' else TF_SLIM_TABLE


def scaled_width(width: int, multiplier: float) -> int:
  """`width * multiplier` rounded, at least MIN_WIDTH; 0 (an absent branch) stays 0."""
  if width == 0:
    return 0
  if multiplier == 1.0:
    return width
  return max(MIN_WIDTH, int(round(width * multiplier)))


def normalized_widths(width_multiplier: float = 1.0, table: str = 'paper') -> list[int]:
  """The width of every convolution unit (each followed by the normalizer), in order.

  The stem's units and every unit of every module (the double-3x3 branch has two of
  one width); what a normalizer that splits channels (group_norm's groups) must divide.
  """
  w = lambda d: scaled_width(d, width_multiplier)
  widths = [w(STEM_WIDTHS[k]) for k in ('conv1', 'conv2_reduce', 'conv2')]
  for s in module_table(table):
    widths += [w(d) for d in (s.conv1x1, s.reduce3x3, s.conv3x3, s.reduce_double3x3,
                              s.double3x3, s.double3x3, s.pool_proj) if d]
  return widths
