"""The config schema every experiment shares, and its validation.

Config files in `configs/` start from `base_config()` so that scripts, sweeps and the
compare tools can rely on the same keys. `validate_config` checks a resolved config
before any data is loaded or anything is compiled; every error is one line that names
the bad value and what is allowed.
"""

from __future__ import annotations

import os
import re

import ml_collections

from bn_research import checks
from bn_research import models

PARALLELISMS = ('jit', 'pmap')
EVAL_BATCH_STATS = ('moving_average', 'population')
POPULATION_BATCHES_MAX = 1000
PROBE_MODES = ('inference', 'train')

OPTIMIZERS = ('sgd', 'momentum')
TRAINABLE = ('all', 'batch_norm')


def base_config() -> ml_collections.ConfigDict:
  """Every key the engine reads, with defaults. Config files override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32                # global, over all devices and hosts
  c.num_train_steps = 1000
  c.eval_every_steps = 500
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.eval_batch_size = 1000
  c.num_eval_examples = 0          # evaluate on the first N held-out examples; 0: all
  # Training steps run per dispatch (a lax.scan over a chunk of steps), so that for
  # small models Python overhead does not dominate. Chunks always end at log, eval and
  # checkpoint steps, which keeps resumed runs bitwise identical.
  c.steps_per_dispatch = 1
  c.parallelism = 'jit'            # 'jit' over a 1-D device mesh, or 'pmap'
  c.num_devices = 0                # 0: all local devices
  c.distributed = False            # call jax.distributed.initialize() (multi-host)
  # XLA compile options for the training chunk, eval and probe programs, as
  # 'name=value,name=value' (e.g. 'xla_cpu_experimental_ynn_fusion_type=' to leave CPU
  # matmuls to Eigen rather than YNNPACK). Performance only: checked by a trial compile
  # before the run starts. Not applied under parallelism='pmap' (jax.pmap takes none).
  c.compiler_options = ''

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'momentum'    # 'sgd' | 'momentum'
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9       # the paper's value
  c.optimizer.nesterov = False
  # Exponential decay lr * decay_rate ** (step / decay_steps); decay_rate 1.0 = constant.
  # "Decay 6x faster" (Section 4.2.1) is decay_steps / 6.
  c.optimizer.decay_rate = 1.0
  c.optimizer.decay_steps = 1000
  c.optimizer.staircase = False
  # Linear warmup (Goyal et al. 2017) over the first warmup_steps steps (0: none), from
  # warmup_from * the rate at step 0 up to the rate at step warmup_steps.
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup_from = 0.0
  # L2 weight regularisation, wd/2 * ||W||^2 added to the loss (applied as wd * W in
  # the gradient, before momentum). Kernels only; BN's gamma/beta only if asked.
  c.optimizer.weight_decay = 0.0
  c.optimizer.regularize_batch_norm = False
  # 'all', or 'batch_norm': only the normalizers' gamma and beta train, everything
  # else stays at its random initialisation (Frankle et al. 2021).
  c.optimizer.trainable = 'all'

  # Every registered model's keys with their defaults (bn_research/models: the
  # shared normalizer options and each model's own).
  c.model = models.default_model_config()

  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic'
  c.data.source = 'synthetic'
  c.data.data_dir = ''
  c.data.binarize = False
  c.data.binarize_threshold = 0.5
  c.data.num_test = 1000
  c.data.split_seed = 0
  c.data.num_train = 2000
  c.data.image_size = 8
  c.data.channels = 1
  c.data.num_classes = 10
  # data.source='download' (and 'auto' when the mirror answers): the IDX files' base
  # URL, '' = the mirror TFDS uses, 'none' = never download; and the seconds any one
  # network operation may take.
  c.data.download_url = ''
  c.data.download_timeout = 30.0
  # ImageNet pipeline options (ignored by in-memory datasets).
  c.data.distortions = 'full'
  c.data.shuffle = 'thorough'
  c.data.num_workers = 8
  c.data.prefetch = 2

  # Divergence as the paper means it ("machine infinity"): besides a non-finite loss or
  # parameter, a mean training loss over a log interval above max_loss (0: no such
  # test). 20 nats is 9x the chance loss of 10 classes (ln 10) and 3x that of 1000;
  # see docs/engine.md "Divergence" for the runs it was chosen from.
  c.divergence = ml_collections.ConfigDict()
  c.divergence.max_loss = 20.0

  # Which statistics BN uses at evaluation: the moving averages tracked in training
  # ('moving_average'), or Algorithm 2's population statistics ('population'),
  # estimated at each evaluation from `population_batches` training mini-batches of the
  # training batch size with the current weights: E[x] = mean of mu_B, Var[x] =
  # m/(m-1) mean of var_B. The checkpointed moving averages are never touched. The
  # probe uses the same statistics.
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_stats = 'moving_average'
  c.eval.population_batches = 50

  # Activation tracking (the paper's Figure 1): percentiles of the input to one unit's
  # nonlinearity, on a fixed batch of held-out examples, at every eval.
  c.probe = ml_collections.ConfigDict()
  c.probe.enabled = False
  c.probe.layer = -1                  # hidden layer index; -1: the last
  c.probe.unit = 0
  c.probe.num_examples = 1000
  c.probe.percentiles = (15.0, 50.0, 85.0)
  # 'inference': the network as it is evaluated (BN with eval.batch_stats);
  # 'train': BN normalises the probe batch with its own statistics, as in training.
  c.probe.mode = 'inference'

  # Santurkar et al.'s measurements (bn_research/measure.py), on the training batch of
  # every `every_steps`-th step (0: off): internal covariate shift per layer
  # (ics_l2/, ics_cos/, ics_rel/<layer>) and the loss landscape along the gradient at step
  # sizes `etas` (landscape_loss_range, landscape_grad_pred, landscape_beta).
  c.measure = ml_collections.ConfigDict()
  c.measure.every_steps = 0
  c.measure.ics = True
  c.measure.landscape = True
  c.measure.etas = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)   # absolute step sizes along -g
  # The paper's own claims (MLP only): singular values of each hidden layer's Jacobian
  # on the first `jacobian_examples` examples (jacobian_sv_*/<layer>, Section 3.3); the
  # fraction of sigmoid inputs beyond |x| > 2 and 4 and their histogram
  # (saturation_2/, saturation_4/, input_hist/<layer>/...); every parameter array's
  # norm (param_norm/<path>, Section 2).
  c.measure.jacobian = False
  c.measure.jacobian_examples = 8
  c.measure.saturation = False
  c.measure.param_norms = False
  return c


# Every top-level, optimizer and probe key, with what it accepts. The model's and the
# data's keys are declared by their owners (models.model_keys(), data.DATA_KEYS,
# imagenet.IMAGENET_KEYS); `key_specs` gathers them. Adding a key to `base_config`
# means adding its spec: tests/test_validation.py fails for a key without one.
CORE_KEYS = {
    'seed': checks.Int(0, checks.SEED_LIMIT - 1),
    'batch_size': checks.Int(1),
    'num_train_steps': checks.Int(1),
    'eval_every_steps': checks.Int(1),
    'log_every_steps': checks.Int(1),
    'checkpoint_every_steps': checks.Int(1),
    'eval_batch_size': checks.Int(1),
    'num_eval_examples': checks.Int(0, note='0: all'),
    'steps_per_dispatch': checks.Int(1),
    'parallelism': checks.Choice(PARALLELISMS),
    'num_devices': checks.Int(0, note='0: all local devices'),
    'distributed': checks.Bool(),
    'compiler_options': checks.Text(note="'name=value,...'"),
    'optimizer.name': checks.Choice(OPTIMIZERS),
    'optimizer.learning_rate': checks.Float(0.0, low_open=True),
    'optimizer.momentum': checks.Float(0.0, 1.0, high_open=True),
    'optimizer.nesterov': checks.Bool(),
    'optimizer.decay_rate': checks.Float(0.0, 1.0, low_open=True),
    'optimizer.decay_steps': checks.Int(1),
    'optimizer.staircase': checks.Bool(),
    'optimizer.warmup_steps': checks.Int(0, note='0: no warmup'),
    'optimizer.warmup_from': checks.Float(0.0, 1.0, note="the first step's rate / the rate"),
    'optimizer.weight_decay': checks.Float(0.0),
    'optimizer.regularize_batch_norm': checks.Bool(),
    'optimizer.trainable': checks.Choice(TRAINABLE),
    'divergence.max_loss': checks.Float(0.0, note='0: no loss test'),
    'eval.batch_stats': checks.Choice(EVAL_BATCH_STATS),
    # Bounded: the batches are held on the host for every estimate, and a signal is
    # noticed between them, not inside one estimate's pieces.
    'eval.population_batches': checks.Int(1, POPULATION_BATCHES_MAX,
                                           note='training mini-batches per estimate'),
    'probe.mode': checks.Choice(PROBE_MODES),
    'measure.every_steps': checks.Int(0, note='0: off'),
    'measure.ics': checks.Bool(),
    'measure.landscape': checks.Bool(),
    'measure.etas': checks.Floats(0.0, low_open=True),
    'measure.jacobian': checks.Bool(),
    'measure.jacobian_examples': checks.Int(1),
    'measure.saturation': checks.Bool(),
    'measure.param_norms': checks.Bool(),
    'probe.enabled': checks.Bool(),
    # Its range depends on the model: checked in `validate_config`.
    'probe.layer': checks.Int(None, note='-1: the last hidden layer'),
    'probe.unit': checks.Int(0),
    'probe.num_examples': checks.Int(1),
    'probe.percentiles': checks.Floats(0.0, 100.0),
}


def key_specs(config: ml_collections.ConfigDict) -> dict:
  """{dotted key: checks.Spec} for every key `config` may hold, from every owner."""
  from bn_research import data  # pylint: disable=g-import-not-at-top
  from bn_research.data import imagenet  # pylint: disable=g-import-not-at-top
  specs = {**CORE_KEYS, **models.model_keys()}
  if _is_imagenet(config):
    specs.update(imagenet.IMAGENET_KEYS)
  else:
    # base_config carries the ImageNet pipeline's options for every dataset (in-memory
    # data ignores them); they are still checked, so a typo never waits for ImageNet.
    specs.update({**imagenet.IMAGENET_KEYS, **data.DATA_KEYS})
  return specs


def _is_imagenet(config: ml_collections.ConfigDict) -> bool:
  return config.get('data', {}).get('name') == 'imagenet2012'


_OPTION_NAME = re.compile(r'xla_[a-z0-9_]+')


def parse_compiler_options(text: str) -> dict:
  """'name=value,...' -> {name: value}; values 'true'/'false', ints and floats are typed.

  Raises ValueError naming the malformed entry. Whether XLA knows an option is checked
  by `check_compiler_options`, which compiles.
  """
  options = {}
  for entry in filter(None, (e.strip() for e in str(text).split(','))):
    name, sep, value = entry.partition('=')
    name, value = name.strip(), value.strip()
    if not sep or not _OPTION_NAME.fullmatch(name):
      raise ValueError(f'compiler_options: {entry!r} is not name=value with an XLA option '
                       "name (xla_...); e.g. 'xla_cpu_experimental_ynn_fusion_type='.")
    if value.lower() in ('true', 'false'):
      options[name] = value.lower() == 'true'
    else:
      for kind in (int, float):
        try:
          options[name] = kind(value)
          break
        except ValueError:
          continue
      else:
        options[name] = value
  return options


def check_compiler_options(options: dict) -> None:
  """Compiles a one-op program with `options`; ValueError naming the one XLA refuses."""
  if not options:
    return
  import jax  # pylint: disable=g-import-not-at-top
  for name, value in options.items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
    except Exception as e:  # XLA raises its own runtime error type
      raise ValueError(f'compiler_options: XLA refuses {name}={value!r}: '
                       f'{str(e).splitlines()[0]}') from None


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
  """Raises ValueError naming the first bad value; cheap (no data, no compilation).

  Every key with a spec (`key_specs`) is type- and range-checked, then the checks that
  relate keys: batches that split over the devices, the probed unit inside the model,
  and the owners' own (models, data, ImageNet).

  Args:
    config: a resolved config.
    num_devices: devices the batches are split over (checked for divisibility), or
      None when not known yet.
  """
  checks.check_keys(config, key_specs(config))
  parse_compiler_options(config.compiler_options)
  if config.optimizer.trainable == 'batch_norm' and config.model.normalizer == 'none':
    raise ValueError("optimizer.trainable='batch_norm' trains only the normalizers' gamma and "
                     "beta, but model.normalizer='none'; allowed: any other normalizer.")

  m = config.model
  if m.normalizer == 'virtual_batch_norm' and m.virtual_batch_size <= 0:
    raise ValueError("model.normalizer='virtual_batch_norm' needs model.virtual_batch_size "
                     f'> 0, got {m.virtual_batch_size!r}.')
  if m.virtual_batch_size and m.normalizer in ('layer_norm', 'group_norm'):
    raise ValueError(f'model.virtual_batch_size={m.virtual_batch_size!r} does not apply to '
                     f'model.normalizer={m.normalizer!r} (per-example statistics); allowed: 0.')
  check_devices(config, num_devices or 1)
  models.validate_model_config(m)

  if _is_imagenet(config):
    from bn_research.data import imagenet  # pylint: disable=g-import-not-at-top
    imagenet.validate_imagenet_config(config.data)
  else:
    from bn_research import data  # pylint: disable=g-import-not-at-top
    data.validate_data_config(config.data)

  _validate_probe(config)
  measure = config.measure
  kinds = ('ics', 'landscape', 'jacobian', 'saturation', 'param_norms')
  if measure.every_steps and not any(measure[k] for k in kinds):
    raise ValueError(f'measure.every_steps={measure.every_steps} but measure.'
                     f'{", measure.".join(kinds)} are all False; turn one on or set '
                     'every_steps=0.')
  for key in ('jacobian', 'saturation'):
    if (measure.every_steps and measure[key]
        and models.entry_for(config.model).hidden_widths is None):
      raise ValueError(f'measure.{key}=True measures the hidden layers of a model that '
                       f'sows them (the MLP); model.name={config.model.name!r} has none '
                       f'(set measure.{key}=False).')
  if (measure.every_steps and measure.jacobian
      and measure.jacobian_examples > config.batch_size):
    raise ValueError(f'measure.jacobian_examples={measure.jacobian_examples} is more than '
                     f'the batch of {config.batch_size}; allowed: 1..{config.batch_size}.')
  # The measurements read extra training batches by step number: in-memory data under
  # jit only. Algorithm 2 reads the first N batches (streamed data: from a stream of its
  # own), under jit.
  in_memory_jit = config.parallelism == 'jit' and not _is_imagenet(config)
  if config.eval.batch_stats == 'population' and config.parallelism != 'jit':
    raise ValueError(
        "eval.batch_stats='population' estimates Algorithm 2's statistics under "
        f"parallelism=jit; got parallelism={config.parallelism!r} "
        "(use eval.batch_stats='moving_average').")
  if measure.every_steps and not in_memory_jit:
    raise ValueError(f'measure.every_steps={measure.every_steps}: the measurements run on '
                     'in-memory data under parallelism=jit (not pmap, not the streamed '
                     'imagenet2012); set measure.every_steps=0.')


def check_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """The checks of `validate_config` that depend on the device count: the batches and
  BN's ghost batches must split over `num_devices`. For a config already validated
  without knowing the devices (the engine learns them after start-up)."""
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % num_devices:
      raise ValueError(
          f'{key}={config[key]} is not divisible by the {num_devices} devices it is '
          'split over; use a multiple of the device count (or set num_devices).')
  m = config.model
  if m.virtual_batch_size and m.normalizer != 'none':
    per_device = config.batch_size // num_devices
    if per_device % m.virtual_batch_size:
      raise ValueError(
          f'model.virtual_batch_size={m.virtual_batch_size} does not divide the per-device '
          f'batch of {per_device} (batch_size={config.batch_size} over {num_devices} devices).')


def _validate_probe(config: ml_collections.ConfigDict) -> None:
  """The probed layer and unit must exist: an index past the end would wrap around
  (Python indexing) and record one unit while config.json names another."""
  probe = config.probe
  if not probe.enabled:
    return
  hidden_widths = models.entry_for(config.model).hidden_widths
  if hidden_widths is None:
    raise ValueError(f'probe.enabled=True: the probe tracks a hidden unit of a model that '
                     f'sows its hidden layers (the MLP); model.name={config.model.name!r} '
                     'has none (set probe.enabled=False).')
  widths = tuple(hidden_widths(config.model))
  if not -len(widths) <= probe.layer < len(widths):
    raise ValueError(
        f'probe.layer={probe.layer!r} is invalid: model.hidden_sizes={widths} has '
        f'{len(widths)} hidden layers, so it must be in [{-len(widths)}, {len(widths) - 1}] '
        '(-1: the last).')
  width = widths[probe.layer]
  if probe.unit >= width:
    raise ValueError(f'probe.unit={probe.unit!r} is invalid: hidden layer {probe.layer} has '
                     f'{width} units, so it must be in [0, {width - 1}].')


def check_config_path(arg: str) -> None:
  """Checks the file part of a --config value ('path.py' or 'path.py:argument').

  For the launcher to call before ml_collections imports the file, whose own errors
  for a missing file or a directory are tracebacks.

  Raises:
    ValueError: one line naming the path and what to pass instead.
  """
  path = str(arg).split(':', 1)[0]
  if not path:
    raise ValueError(f'--config={arg!r}: no file given; pass a config file such as '
                     'configs/mnist_mlp.py:bn.')
  if os.path.isdir(path):
    raise ValueError(f'--config={arg!r}: {path!r} is a directory; pass a config file '
                     'in it, e.g. configs/mnist_mlp.py:bn.')
  if not os.path.isfile(path):
    raise ValueError(f'--config={arg!r}: no such file {path!r} (relative paths start at '
                     f'{os.getcwd()!r}); config files are in configs/.')
  if not os.access(path, os.R_OK):
    raise ValueError(f'--config={arg!r}: {path!r} is not readable; check its permissions.')
