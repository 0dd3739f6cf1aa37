"""Feeding batches to the training loop, as a pure function of (seed, step).

The engine asks an input for a *chunk*: the data of `num_steps` consecutive training
steps starting at `start_step`, with leading axes (num_steps, local_batch). Two kinds:

* `InMemoryInput` keeps a small dataset (MNIST, Fashion-MNIST, synthetic) resident on
  the devices and sends only example indices; the gather happens inside the compiled
  step, so thousands of steps run per dispatch without host traffic.
* `StreamInput` wraps a host pipeline (ImageNet) that yields ready batches.

Either way, the examples of step s are the global example numbers s*B .. s*B+B-1 of a
per-epoch permutation seeded by (seed, epoch); a resumed run therefore sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_research import models


class InMemoryInput:
  """A dataset held in device memory; chunks are index arrays.

  Args:
    images, labels: the whole training split (every host holds all of it).
    batch_size: the global batch size B.
    seed: data-order seed.
    process_index, process_count: this host's share of each global batch.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    self.resident = {'image': images, 'label': labels}
    self.num_examples = len(labels)
    self.batch_size = batch_size
    self.seed = seed
    self.local_batch = batch_size // process_count
    self._lo = process_index * self.local_batch
    self._perms: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      rng = np.random.default_rng([self.seed, epoch])
      self._perms[epoch] = rng.permutation(self.num_examples).astype(np.int32)
    return self._perms[epoch]

  def example_indices(self, start_step: int, num_steps: int) -> np.ndarray:
    """Dataset indices of this host's examples, shape (num_steps, local_batch)."""
    first = start_step * self.batch_size + self._lo
    offsets = (np.arange(num_steps, dtype=np.int64)[:, None] * self.batch_size
               + np.arange(self.local_batch, dtype=np.int64)[None, :])
    global_numbers = first + offsets
    epochs = global_numbers // self.num_examples
    positions = global_numbers % self.num_examples
    out = np.empty_like(positions, dtype=np.int32)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[positions[sel]]
    return out

  def chunk(self, start_step: int, num_steps: int) -> dict:
    return {'index': self.example_indices(start_step, num_steps)}

  @staticmethod
  def materialize(resident: dict, chunk_t: dict) -> dict:
    """Inside the compiled step: turn one step's indices into a batch."""
    idx = chunk_t['index']
    return {'image': jnp.take(resident['image'], idx, axis=0),
            'label': jnp.take(resident['label'], idx, axis=0)}

  @staticmethod
  def materialize_eval(batch: dict) -> dict:
    """Evaluation batches are already the network's input."""
    return batch


class StreamInput:
  """A host pipeline with `train_batches(start_step)` yielding this host's batches.

  The stream is opened at the first chunk asked for, so a resumed run starts reading
  at its checkpoint's step; later chunks must follow on. With `augment` (ImageNet:
  `augment.DeviceAugment`), batches cross to the device as uint8 and `materialize`
  makes the network's float32 input inside the compiled step; without it, batches
  are already the network's input.
  """

  def __init__(self, pipeline: Any, augment: Any = None):
    self.resident: dict = {}
    self._pipeline = pipeline
    self._augment = augment
    self._iterator: Optional[Iterator[dict]] = None
    self._next_step = 0

  def chunk(self, start_step: int, num_steps: int) -> dict:
    if self._iterator is None:
      self._iterator = iter(self._pipeline.train_batches(start_step))
      self._next_step = start_step
    if start_step != self._next_step:
      raise RuntimeError(f'stream input asked for step {start_step}, '
                         f'expected {self._next_step}')
    batches = [next(self._iterator) for _ in range(num_steps)]
    self._next_step += num_steps
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

  def fixed_chunk(self, start_step: int, num_steps: int) -> dict:
    """Steps start..start+num_steps from a stream of their own (the training stream
    is left where it is): e.g. Algorithm 2's first N training batches."""
    iterator = iter(self._pipeline.train_batches(start_step))
    try:
      batches = [next(iterator) for _ in range(num_steps)]
    finally:
      close = getattr(iterator, 'close', None)
      if close is not None:
        close()
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

  def materialize(self, resident: dict, chunk_t: dict) -> dict:
    """Inside the compiled step: one step's host batch -> the network's batch."""
    del resident
    return chunk_t if self._augment is None else self._augment.train(chunk_t)

  def materialize_eval(self, batch: dict) -> dict:
    """Inside the compiled evaluation step: a host evaluation batch -> the network's."""
    return batch if self._augment is None else self._augment.eval(batch)


def padded_eval_batches(images: np.ndarray, labels: np.ndarray,
                        batch_size: int) -> list[dict]:
  """The whole split in batches of `batch_size`; the last is padded and masked."""
  out = []
  for lo in range(0, len(labels), batch_size):
    img, lab = images[lo:lo + batch_size], labels[lo:lo + batch_size]
    n = len(lab)
    mask = np.ones(batch_size, np.float32)
    if n < batch_size:
      mask[n:] = 0
      img = np.concatenate([img, np.zeros((batch_size - n,) + img.shape[1:], img.dtype)])
      lab = np.concatenate([lab, np.zeros(batch_size - n, lab.dtype)])
    out.append({'image': img, 'label': lab, 'mask': mask})
  return out


@dataclasses.dataclass
class RunData:
  """Everything a run reads: the training input, the held-out set and the probe batch.

  Attributes:
    source: the training input (`InMemoryInput` of GLOBAL batches, or this process's
      `StreamInput`).
    eval_batches: () -> the held-out batches (global for in-memory data, this
      process's share for streamed data), padded and masked.
    num_classes: output classes.
    probe_images: the Figure 1 probe's held-out images, or None.
    description: what data.json records about the data.
    sample_image: two training-shaped inputs (for initialisation).
  """
  source: Any
  eval_batches: Callable[[], list]
  num_classes: int
  probe_images: Optional[np.ndarray]
  description: dict
  sample_image: np.ndarray

  @property
  def in_memory(self) -> bool:
    return isinstance(self.source, InMemoryInput)


def load_run_data(config: ml_collections.ConfigDict) -> RunData:
  """Loads the configured data for this process (raises ValueError on bad input)."""
  process_index, process_count = jax.process_index(), jax.process_count()
  if config.data.name == 'imagenet2012':
    # pylint: disable=g-import-not-at-top
    from bn_research.data import augment
    from bn_research.data import imagenet
    # pylint: enable=g-import-not-at-top
    pipeline = imagenet.ImageNetPipeline(
        config.data, batch_size=config.batch_size // process_count, seed=config.seed,
        process_index=process_index, process_count=process_count)
    eval_batch = config.eval_batch_size // process_count
    eval_batches = lambda: pipeline.eval_batches(eval_batch)
    source = StreamInput(pipeline, augment.DeviceAugment(pipeline.distortions,
                                                         pipeline.normalization))
    size = pipeline.options.image_size
    return RunData(source, eval_batches, pipeline.num_classes, None,
                   {'dataset': 'imagenet2012', 'num_train': pipeline.num_train_examples},
                   np.zeros((2, size, size, 3), np.float32))
  from bn_research import data as data_lib  # pylint: disable=g-import-not-at-top
  ds = data_lib.load_dataset(config.data)
  source = InMemoryInput(ds.train_images, ds.train_labels, batch_size=config.batch_size,
                         seed=config.seed)
  # Counts of held-out examples are checked against the test set actually loaded:
  # clipping them silently would leave config.json naming more than was used.
  num_test = len(ds.test_labels)
  probed = (config.probe.enabled
            and models.entry_for(config.model).hidden_widths is not None)
  for key, wanted in (('num_eval_examples', config.num_eval_examples),
                      ('probe.num_examples', config.probe.num_examples if probed else 0)):
    if wanted > num_test:
      raise ValueError(f'{key}={wanted} but the test set has {num_test} examples; '
                       f'allowed: 1..{num_test}.')
  n_eval = config.num_eval_examples or num_test
  batches = padded_eval_batches(ds.test_images[:n_eval], ds.test_labels[:n_eval],
                                config.eval_batch_size)
  probe_images = ds.test_images[:config.probe.num_examples] if probed else None
  return RunData(source, lambda: batches, ds.num_classes, probe_images,
                 dict(ds.description), np.asarray(ds.train_images[:2]))
