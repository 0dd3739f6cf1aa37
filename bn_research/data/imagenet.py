"""ImageNet (ILSVRC 2012) input pipeline for the Inception experiments (paper Section 4.2).

Reads TFDS `imagenet2012` through `tfds.data_source` style random access (ArrayRecord
files, no TensorFlow at training time) with grain: JPEG bytes are decoded, cropped,
resized and flipped in uint8 on the host, in grain worker processes; the photometric
distortions and the normalisation run on the device (`bn_research.data.augment`).
This module imports neither JAX nor TensorFlow (grain's workers import it).

Preparing ImageNet (once, the only step that needs TensorFlow):
`python -m bn_research.data.imagenet prepare <data_dir>`; the steps are in the
docstring of `bn_research.data.imagenet_config`, which also holds the data config.
The host's image operations are in `bn_research.data.imagenet_images`.

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
import functools
import weakref
from typing import Any, Iterator, Optional, Sequence

import ml_collections
import numpy as np

from bn_research import checks
# The config and the host's image operations live in their own modules; their names
# stay importable from here.
from bn_research.data.imagenet_config import (  # pylint: disable=unused-import
    DISTORTION_STRENGTHS, DISTORTIONS, EVAL_VIEWS, IMAGENET_KEYS, IMAGENET_MEAN, IMAGENET_STD, NAME,
    NORMALIZATIONS, NUM_CLASSES, PREPARE_HELP, SHUFFLES, SOURCES, ColorJitter,
    color_parameters, imagenet_data_config, open_tfds_split, prepare_imagenet2012,
    validate_imagenet_config)
from bn_research.data.imagenet_images import (  # pylint: disable=unused-import
    EVAL_CROP_FRACTION, PreprocessOptions, _crop_resize, augmentation_rng,
    central_crop_box, color_seed, open_image, preprocess_eval, preprocess_eval_squares,
    preprocess_train, random_crop_box, square_boxes, squares_size)

# The stream tag mixed into the data order's seeds (the augmentations use another).
_ORDER_STREAM = 0x0D0


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
    self.eval_views = str(config.get('eval_views', 'center'))
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
    squares = self.eval_views == 'squares'
    if position >= self.num_eval_examples:
      size = squares_size(self.options.image_size) if squares else self.options.image_size
      shape = (3, size, size, 3) if squares else (size, size, 3)
      return {'image': np.zeros(shape, np.uint8), 'label': np.int32(0),
              'mask': np.float32(0)}
    example = self.eval_source[position]
    preprocess = preprocess_eval_squares if squares else preprocess_eval
    return {'image': preprocess(example['image'], self.options),
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
    yields the same number of batches; padding has mask 0. With
    `data.eval_views='squares'` each image is its three squares, (3, S, S, 3)."""
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
