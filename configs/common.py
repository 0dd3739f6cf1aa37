r"""What the config files share: the one parser of their arguments, and recipe tables.

A config file is loaded as `--config=configs/x.py:ARG`, and ARG reaches its
`get_config(arg)` as one string, e.g. `bn,lr=0.1,steps=5000`. Every config file
parses it with `parse_arg` (the big_vision way):

    args = parse_arg(arg, variant=('bn', ('bn', 'baseline')), lr=(None, float))

The paper's Section 4.2 models are the Inception recipe plus some of the 4.2.1
"accelerating BN networks" changes; `apply_inception_model` sets exactly those changes,
scaled from a base recipe, so that one table serves the ImageNet configs and the small
offline preset:

| model          | BN | lr   | dropout | L2   | lr decay | LRN | shuffle  | distortions | act     |
|----------------|----|------|---------|------|----------|-----|----------|-------------|---------|
| inception      | no | 1x   | yes     | 1x   | 1x       | yes | shard    | full        | relu    |
| bn_baseline    | ✓  | 1x   | yes     | 1x   | 1x       | yes | shard    | full        | relu    |
| bn_x5          | ✓  | 5x   | no      | 1/5  | 6x faster| no  | thorough | reduced     | relu    |
| bn_x30         | ✓  | 30x  | no      | 1/5  | 6x faster| no  | thorough | reduced     | relu    |
| bn_x5_sigmoid  | ✓  | 5x   | no      | 1/5  | 6x faster| no  | thorough | reduced     | sigmoid |
| inception_x5   | no | 5x   | yes     | 1x   | 1x       | yes | shard    | full        | relu    |
| inception_sigmoid | no | 5x | no     | 1/5  | 6x faster| no  | thorough | reduced     | sigmoid |

Any batch size B (`batch=B`, a multiple of 32): `apply_batch` keeps what BN sees and
what the schedule means the paper's, and scales the rest (Goyal et al. 2017):

| at batch B                  | value                                                 |
|-----------------------------|-------------------------------------------------------|
| BN statistics               | ghost batches of 32 (`model.virtual_batch_size=32`)   |
| learning rate               | the batch-32 rate x B/32 (`lr_scaling=none`: x1)      |
| warmup (`warmup=W` epochs)  | linear from the batch-32 rate to the scaled rate      |
| steps, log / eval / checkpoint cadence, decay period | images / B (so: epochs)      |

A step at batch B is B/32 of the paper's steps: `progress(step, batch_size)` turns a
run's step into images seen and batch-32-equivalent steps (the x axis of Figures 2/3).

`inception_x5` is the paper's report that Inception at BN-x5's rate reaches "machine
infinity"; `inception_sigmoid` that Inception with sigmoids but no BN stays at chance
(we give it BN-x5-Sigmoid's recipe minus BN, the closest reading of the text).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

# ---------------------------------------------------------------- arguments

_BOOLS = {'true': True, 'false': False, '1': True, '0': False, 'yes': True, 'no': False}


class PositiveInt(int):
  """A spec type for counts and sizes (a batch, a number of steps): an integer >= 1,
  refused in one line before the config file divides by it."""


def _spec_entry(key: str, entry: Any) -> tuple[Any, Any]:
  """(default, what is allowed) of one spec entry: a type or a tuple of choices."""
  if isinstance(entry, tuple) and len(entry) == 2 and (
      isinstance(entry[1], type) or isinstance(entry[1], tuple)):
    return entry
  if entry is None:
    raise TypeError(f'parse_arg: give {key}=(None, type), not a bare None.')
  return entry, type(entry)


def _convert(key: str, text: str, allowed: Any) -> Any:
  """`text` as the allowed type or choice; ValueError naming key, value and allowed."""
  if isinstance(allowed, tuple):
    if text not in allowed:
      raise ValueError(f'config argument {key}={text!r}; allowed: {", ".join(allowed)}.')
    return text
  if allowed is bool:
    if text.lower() not in _BOOLS:
      raise ValueError(f'config argument {key}={text!r}; allowed: true or false.')
    return _BOOLS[text.lower()]
  if allowed in (int, PositiveInt):
    try:
      value = int(text)
    except ValueError:
      raise ValueError(f'config argument {key}={text!r} is not an integer.') from None
    if allowed is PositiveInt and value < 1:
      raise ValueError(f'config argument {key}={text!r}; allowed: an integer >= 1.')
    return value
  if allowed is float:
    try:
      value = float(text)
    except ValueError:
      value = math.nan
    if not math.isfinite(value):
      raise ValueError(f'config argument {key}={text!r}; allowed: a finite number.')
    return value
  if allowed is str:
    if not text:
      raise ValueError(f'config argument {key}= is empty; allowed: a non-empty string.')
    return text
  raise TypeError(f'parse_arg: {key} has an unsupported type {allowed!r}.')


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses a config file's argument, `word,key=value,key=value`.

  Args:
    arg: the text after `configs/x.py:` (None or '' for none).
    **spec: every allowed key with its default: a plain value (its type is the
      allowed type), `(default, type)` (e.g. `(None, float)` for "not given"), or
      `(default, ('a', 'b'))` for a choice. Types: str, int, `PositiveInt` (>= 1),
      float (finite), bool.
      The FIRST key of the spec may also be given as a bare leading word
      (`bn,lr=0.1` sets the first key to 'bn'); a bare word naming a bool key sets
      it True.

  Returns:
    A ConfigDict with every key of the spec: the given value or the default.

  Raises:
    ValueError: one line naming the key, the value and what is allowed.
  """
  entries = {key: _spec_entry(key, entry) for key, entry in spec.items()}
  out = {key: default for key, (default, _) in entries.items()}
  first = next(iter(entries), None)
  given = set()
  for i, part in enumerate(p.strip() for p in (arg or '').split(',')):
    if not part:
      continue
    key, eq, text = part.partition('=')
    key, text = key.strip(), text.strip()
    if not eq:
      if key in entries and entries[key][1] is bool:
        key, text = key, 'true'
      elif i == 0 and first is not None:
        key, text = first, key
      else:
        raise ValueError(f'config argument {part!r} is not key=value; allowed keys: '
                         f'{", ".join(entries)}.')
    if key not in entries:
      raise ValueError(f'unknown config argument {key!r} (in {arg!r}); allowed: '
                       f'{", ".join(entries)}.')
    if key in given:
      raise ValueError(f'config argument {key!r} is given twice in {arg!r}.')
    given.add(key)
    out[key] = _convert(key, text, entries[key][1])
  return ml_collections.ConfigDict(out)


# ---------------------------------------------------------------- batch size

PAPER_BATCH = 32  # Section 4.2: mini-batches of 32 examples, and BN's statistics over them


def check_batch(batch: int) -> None:
  """ValueError naming `batch=` unless ghost batches of 32 tile it."""
  if batch < PAPER_BATCH or batch % PAPER_BATCH:
    raise ValueError(f'config argument batch={batch}; allowed: a multiple of '
                     f'{PAPER_BATCH} (32, 64, 96, ...) so that ghost batches of '
                     f'{PAPER_BATCH} tile it.')


def steps_for(images: float, batch: int) -> int:
  """Steps of `batch` images that see `images` images (at least 1)."""
  return max(1, round(images / batch))


def progress(step: int, batch_size: int) -> dict:
  """A step of a run at `batch_size` as images seen and the paper's batch-32 steps."""
  images = step * batch_size
  return {'images': images, 'paper_steps': images / PAPER_BATCH}


def apply_batch(c: ml_collections.ConfigDict, batch: int, *, cadence_images: dict,
                images_per_epoch: int, lr_scaling: str,
                warmup_epochs: float) -> ml_collections.ConfigDict:
  """Sets the batch size B and everything that scales with it on config `c`.

  Call after `apply_inception_model`, which set the batch-32 learning rate.

  Args:
    c: the config (its learning rate and decay period given at batch 32).
    batch: the global batch B (a multiple of 32).
    cadence_images: {dotted config key: images}, e.g. {'eval_every_steps': 1_600_000}:
      each key is set to the number of B-image batches that see that many images.
    images_per_epoch: training images per epoch (for `warmup_epochs`).
    lr_scaling: 'linear' (the rate x B/32) or 'none'.
    warmup_epochs: linear warmup from the batch-32 rate to the scaled rate over this
      many epochs (0: none).

  Raises:
    ValueError: one line naming the argument: a batch ghost batches of 32 cannot
      tile, a negative warmup, or a warmup with nothing to warm up to.
  """
  check_batch(batch)
  if warmup_epochs < 0:
    raise ValueError(f'config argument warmup={warmup_epochs:g}; allowed: epochs >= 0.')
  scale = batch / PAPER_BATCH if lr_scaling == 'linear' else 1.0
  if warmup_epochs and scale == 1.0:
    raise ValueError(f'config argument warmup={warmup_epochs:g} has no effect at batch={batch} '
                     f'with lr_scaling={lr_scaling} (the warmup starts at the batch-32 rate, '
                     'which is the rate); allowed: warmup=0, or a larger batch with '
                     'lr_scaling=linear.')
  paper_decay_images = c.optimizer.decay_steps * PAPER_BATCH
  c.batch_size = batch
  # Statistics over 32 examples at any B; at B = 32 the whole batch is one (and on
  # several devices the per-device share is under 32, so no ghost batches then).
  c.model.virtual_batch_size = PAPER_BATCH if batch > PAPER_BATCH else 0
  c.optimizer.learning_rate = c.optimizer.learning_rate * scale
  c.optimizer.decay_steps = steps_for(paper_decay_images, batch)
  c.optimizer.warmup_steps = (steps_for(warmup_epochs * images_per_epoch, batch)
                              if warmup_epochs else 0)
  c.optimizer.warmup_from = 1.0 / scale if warmup_epochs else 0.0
  for key, images in cadence_images.items():
    *path, last = key.split('.')
    node = c
    for part in path:
      node = node[part]
    node[last] = steps_for(images, batch)
  return c


# ---------------------------------------------------------------- Inception recipes

INCEPTION_MODELS = ('inception', 'bn_baseline', 'bn_x5', 'bn_x30', 'bn_x5_sigmoid',
                    'inception_x5', 'inception_sigmoid')

# (uses_bn, lr multiple, accelerated recipe of 4.2.1, activation)
_INCEPTION_TABLE = {
    'inception': (False, 1, False, 'relu'),
    'bn_baseline': (True, 1, False, 'relu'),
    'bn_x5': (True, 5, True, 'relu'),
    'bn_x30': (True, 30, True, 'relu'),
    'bn_x5_sigmoid': (True, 5, True, 'sigmoid'),
    'inception_x5': (False, 5, False, 'relu'),
    'inception_sigmoid': (False, 5, True, 'sigmoid'),
}


def apply_inception_model(c: ml_collections.ConfigDict, model: str, *,
                          base_learning_rate: float, base_weight_decay: float,
                          base_decay_steps: int,
                          base_dropout: float) -> ml_collections.ConfigDict:
  """Sets the model's normalizer, learning rate and 4.2.1 changes on config `c`."""
  if model not in _INCEPTION_TABLE:
    raise ValueError(f'model={model!r}; allowed: {", ".join(INCEPTION_MODELS)}.')
  uses_bn, lr_multiple, accelerated, activation = _INCEPTION_TABLE[model]
  c.model.normalizer = 'batch_norm' if uses_bn else 'none'
  c.model.activation = activation
  c.optimizer.learning_rate = base_learning_rate * lr_multiple
  # 4.2.1: remove dropout; reduce L2 5x; decay the learning rate 6x faster; remove
  # LRN; shuffle more thoroughly; reduce photometric distortions.
  c.model.dropout_rate = 0.0 if accelerated else base_dropout
  c.optimizer.weight_decay = base_weight_decay / 5 if accelerated else base_weight_decay
  c.optimizer.decay_steps = (max(1, round(base_decay_steps / 6)) if accelerated
                             else base_decay_steps)
  c.model.use_lrn = not accelerated
  c.data.shuffle = 'thorough' if accelerated else 'within_shard'
  c.data.distortions = 'reduced' if accelerated else 'full'
  return c
