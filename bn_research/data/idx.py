"""Reading and writing IDX files, the binary format MNIST and Fashion-MNIST ship in.

An IDX file is a small header followed by one big-endian array:

* bytes 0-1: zero;
* byte 2: element type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
  0x0D float32, 0x0E float64);
* byte 3: number of dimensions `d`;
* then `d` big-endian uint32 sizes, then the elements in C order.

The header is parsed here rather than trusting a fixed 16-byte offset and 28x28 shape,
so any image size and any of the types above round-trip. Files may be gzip'd or not:
gzip is detected from its magic bytes, not from the file name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np

# IDX type code -> big-endian NumPy dtype.
_CODE_TO_DTYPE = {
    0x08: np.dtype('>u1'),
    0x09: np.dtype('>i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}
# Keyed by (kind, itemsize) so that native and big-endian dtypes map alike.
_KIND_SIZE_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()}

_GZIP_MAGIC = b'\x1f\x8b'


class DataFileError(FileNotFoundError, ValueError):
  """A data file or directory is missing or unusable.

  Also a ValueError, so the launcher reports it as one line with exit code 2, like any
  other bad input; FileNotFoundError for callers that test for a missing file.
  """

# File names tried for each split, in order. The '.idx3' spelling is what some
# mirrors and unpacking tools produce for the original MNIST files.
_STEMS = {
    ('train', 'images'): ('train-images-idx3-ubyte', 'train-images.idx3-ubyte'),
    ('train', 'labels'): ('train-labels-idx1-ubyte', 'train-labels.idx1-ubyte'),
    ('test', 'images'): ('t10k-images-idx3-ubyte', 't10k-images.idx3-ubyte'),
    ('test', 'labels'): ('t10k-labels-idx1-ubyte', 't10k-labels.idx1-ubyte'),
}


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataFileError(f'{path}: cannot read it ({e.strerror}); check that it is a '
                        'readable file.') from None
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise ValueError(f'{path}: not a complete gzip file ({e}); it is truncated or '
                       'corrupt: copy or download it again.') from None
  return raw


def parse_idx(raw: bytes, source: str = '<bytes>') -> np.ndarray:
  """Decodes the bytes of an (uncompressed) IDX file.

  Args:
    raw: the whole file content.
    source: a name for error messages.

  Returns:
    The array, in native byte order, with the shape given by the header.

  Raises:
    ValueError: if the header is malformed or the payload size disagrees with it.
  """
  if len(raw) < 4:
    raise ValueError(f'{source}: too short to be an IDX file ({len(raw)} bytes).')
  zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
  if zero0 != 0 or zero1 != 0:
    raise ValueError(
        f'{source}: bad IDX magic {raw[:4].hex()} (first two bytes must be zero).')
  if code not in _CODE_TO_DTYPE:
    raise ValueError(
        f'{source}: unknown IDX type code 0x{code:02x}; known: '
        + ', '.join(f'0x{c:02x}' for c in sorted(_CODE_TO_DTYPE)))
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise ValueError(f'{source}: truncated IDX header ({ndim} dimensions declared).')
  shape = struct.unpack(f'>{ndim}I', raw[4:header_len])
  dtype = _CODE_TO_DTYPE[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  payload = len(raw) - header_len
  if payload != expected:
    raise ValueError(
        f'{source}: IDX header says shape {tuple(shape)} of {dtype.name} '
        f'({expected} bytes) but the file holds {payload} bytes of data: it is truncated '
        'or corrupt; copy or download it again.')
  data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
  # Native byte order, and a writable copy detached from the (possibly large) buffer.
  return data.astype(dtype.newbyteorder('='))


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file, gzip'd or not.

  Args:
    path: file path.

  Returns:
    The stored array in native byte order.
  """
  return parse_idx(_read_bytes(path), source=path)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes `array` as an IDX file; gzip'd when `path` ends in '.gz'.

  Args:
    path: destination file.
    array: any shape; dtype uint8, int8, int16, int32, float32 or float64.

  Raises:
    ValueError: for dtypes IDX cannot represent (e.g. int64, bool) or more than
      255 dimensions.
  """
  array = np.asarray(array)
  code = _KIND_SIZE_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
  if code is None:
    raise ValueError(
        f'write_idx: dtype {array.dtype} has no IDX type code; use one of '
        'uint8, int8, int16, int32, float32, float64.')
  if array.ndim > 255:
    raise ValueError(f'write_idx: {array.ndim} dimensions; IDX allows at most 255.')
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  payload = np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + payload)


def find_idx_file(data_dir: str, split: str, kind: str) -> Optional[str]:
  """Returns the path of the IDX file for `split` ('train'|'test') and `kind`
  ('images'|'labels') in `data_dir`, or None when absent. Plain files win over .gz."""
  for stem in _STEMS[(split, kind)]:
    for suffix in ('', '.gz'):
      path = os.path.join(data_dir, stem + suffix)
      if os.path.isfile(path):
        return path
  return None


def missing_idx_files(data_dir: str) -> Sequence[str]:
  """Names of the expected IDX files that `data_dir` lacks (empty when complete)."""
  return [
      _STEMS[key][0] + '[.gz]' for key in _STEMS
      if find_idx_file(data_dir, *key) is None
  ]


def _images_to_float(images: np.ndarray, path: str) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1] (divided by 255); float pixels pass through
  unchanged but must already be in [0, 1]; (N, H, W) gains a channel axis."""
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(
        f'{path}: image IDX must have 3 (N, H, W) or 4 (N, H, W, C) dimensions, '
        f'got shape {images.shape}.')
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  if images.dtype.kind == 'f':
    images = images.astype(np.float32)
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
      raise ValueError(
          f'{path}: float images must lie in [0, 1], got '
          f'[{images.min()}, {images.max()}].')
    return images
  raise ValueError(
      f'{path}: images must be uint8 (scaled by 1/255) or float in [0, 1], '
      f'got {images.dtype}.')


def load_idx_dir(
    data_dir: str,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads the four MNIST-layout IDX files of `data_dir`.

  Args:
    data_dir: directory with train-images-idx3-ubyte, train-labels-idx1-ubyte,
      t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each optionally '.gz'.

  Returns:
    (train_images, train_labels, test_images, test_labels): images float32
    (N, H, W, C) in [0, 1] (uint8 files are divided by 255), labels int32.

  Raises:
    DataFileError: when a file is missing (the message lists which); it is both a
      FileNotFoundError and a ValueError.
    ValueError: on malformed, truncated or empty files, mismatched image/label
      counts, or train and test images of different shapes; each names the file.
  """
  missing = missing_idx_files(data_dir)
  if missing:
    raise DataFileError(
        f'IDX directory {data_dir!r} lacks: {", ".join(missing)}; put all four '
        "MNIST-layout files there, or use data.source='download' (MNIST, Fashion-MNIST).")
  out = []
  for split in ('train', 'test'):
    image_path = find_idx_file(data_dir, split, 'images')
    label_path = find_idx_file(data_dir, split, 'labels')
    images = _images_to_float(read_idx(image_path), image_path)
    labels = read_idx(label_path)
    if labels.ndim != 1 or labels.dtype.kind not in 'iu':
      raise ValueError(
          f'{label_path}: labels must be a 1-D integer array, got '
          f'{labels.dtype} {labels.shape}.')
    if len(labels) != len(images):
      raise ValueError(
          f'{image_path} holds {len(images)} images but {label_path} holds '
          f'{len(labels)} labels: the two files are not one set; replace them with a '
          'matching pair.')
    if not len(labels):
      raise ValueError(f'{image_path} holds no images: the {split} split is empty; '
                       'replace it with a complete file.')
    out += [images, labels.astype(np.int32)]
  train_path = find_idx_file(data_dir, 'train', 'images')
  test_path = find_idx_file(data_dir, 'test', 'images')
  if out[0].shape[1:] != out[2].shape[1:]:
    raise ValueError(
        f'{train_path} holds images of shape {out[0].shape[1:]} but {test_path} of '
        f'{out[2].shape[1:]}: train and test must come from one dataset.')
  return tuple(out)
