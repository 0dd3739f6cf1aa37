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

from bn_research import normalization

PARALLELISMS = ('jit', 'pmap')
OPTIMIZERS = ('sgd', 'momentum')
TRAINABLE = ('all', 'batch_norm')
ACTIVATIONS = ('sigmoid', 'relu', 'tanh')


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
  # before the run starts. Not applied under parallelism='pmap' (jax.pmap takes none)
  # nor by the vmapped sweep (bn_research.vmap_sweep), whose batched matmuls were not
  # measured with them.
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
  # L2 weight regularisation, wd/2 * ||W||^2 added to the loss (applied as wd * W in
  # the gradient, before momentum). Kernels only; BN's gamma/beta only if asked.
  c.optimizer.weight_decay = 0.0
  c.optimizer.regularize_batch_norm = False
  # 'all', or 'batch_norm': only the normalizers' gamma and beta train, everything
  # else stays at its random initialisation (Frankle et al. 2021).
  c.optimizer.trainable = 'all'

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'
  # 'batch_norm' | 'virtual_batch_norm' | 'batch_renorm' | 'layer_norm' | 'group_norm'
  # | 'noisy_batch_norm' | 'none' (bn_research.normalization.NORMALIZERS).
  c.model.normalizer = 'batch_norm'
  c.model.activation = 'sigmoid'
  c.model.hidden_sizes = (100, 100, 100)
  c.model.init_stddev = 0.1           # Gaussian init of dense kernels
  c.model.dropout_rate = 0.0
  c.model.bn_momentum = 0.99
  c.model.bn_epsilon = 1e-5
  c.model.virtual_batch_size = 0      # 0: statistics over the whole (global) batch
  c.model.unbiased_running_var = True
  # group_norm's number of groups G (Wu & He's default 32); it must divide every
  # normalized layer's width (e.g. 4 for the MLP's 100 units or the width-1/8 Inception).
  c.model.norm_groups = 32
  # batch_renorm (Ioffe 2017): r_max and d_max are 1 and 0 (plain BN) until
  # renorm_start_step, then relax linearly over renorm_ramp_steps to these values.
  c.model.renorm_r_max = 3.0
  c.model.renorm_d_max = 5.0
  c.model.renorm_start_step = 5000
  c.model.renorm_ramp_steps = 20000
  # noisy_batch_norm (Santurkar et al. 2018): per-step random y * s + b after BN with
  # s ~ U(1, 1 + bn_noise), b ~ U(-bn_noise, bn_noise) per unit.
  c.model.bn_noise = 0.5
  # Under pmap: pool BN statistics across replicas (True), or per replica (False, the
  # same as virtual_batch_size = per-device batch under jit).
  c.model.bn_cross_replica = True
  c.model.dtype = 'float32'
  # Inception-only options (ignored by the MLP).
  c.model.use_lrn = False
  c.model.width_multiplier = 1.0
  c.model.small_inputs = False
  c.model.stem_stride = 1

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
  # ImageNet pipeline options (ignored by in-memory datasets).
  c.data.distortions = 'full'
  c.data.shuffle = 'thorough'
  c.data.num_workers = 8
  c.data.prefetch = 2

  # Activation tracking (the paper's Figure 1): percentiles of the input to one unit's
  # nonlinearity, on a fixed batch of held-out examples, at every eval.
  c.probe = ml_collections.ConfigDict()
  c.probe.enabled = False
  c.probe.layer = -1                  # hidden layer index; -1: the last
  c.probe.unit = 0
  c.probe.num_examples = 1000
  c.probe.percentiles = (15.0, 50.0, 85.0)
  return c


def _positive_int(name, value):
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'{name}={value!r} must be a positive integer.')


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

  Args:
    config: a resolved config.
    num_devices: devices the batch is split over (checked for divisibility), or None.
  """
  if config.num_eval_examples < 0:
    raise ValueError(f'num_eval_examples={config.num_eval_examples!r} must be >= 0 (0: all).')
  for key in ('batch_size', 'num_train_steps', 'eval_every_steps', 'log_every_steps',
              'checkpoint_every_steps', 'eval_batch_size', 'steps_per_dispatch'):
    _positive_int(key, config[key])
  if config.parallelism not in PARALLELISMS:
    raise ValueError(f'parallelism={config.parallelism!r}; allowed: {", ".join(PARALLELISMS)}.')
  if config.num_devices < 0:
    raise ValueError(f'num_devices={config.num_devices!r} must be >= 0 (0: all local devices).')
  parse_compiler_options(config.compiler_options)
  if num_devices is not None and config.batch_size % num_devices:
    raise ValueError(
        f'batch_size={config.batch_size} is not divisible by the {num_devices} devices '
        'it is split over; use a multiple of the device count (or set num_devices).')
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name={opt.name!r}; allowed: {", ".join(OPTIMIZERS)}.')
  if not opt.learning_rate > 0:
    raise ValueError(f'optimizer.learning_rate={opt.learning_rate!r} must be > 0.')
  if not 0 <= opt.momentum < 1:
    raise ValueError(f'optimizer.momentum={opt.momentum!r} must be in [0, 1).')
  if not 0 < opt.decay_rate <= 1:
    raise ValueError(f'optimizer.decay_rate={opt.decay_rate!r} must be in (0, 1].')
  _positive_int('optimizer.decay_steps', opt.decay_steps)
  if opt.weight_decay < 0:
    raise ValueError(f'optimizer.weight_decay={opt.weight_decay!r} must be >= 0.')
  if opt.trainable not in TRAINABLE:
    raise ValueError(f'optimizer.trainable={opt.trainable!r}; allowed: {", ".join(TRAINABLE)}.')
  if opt.trainable == 'batch_norm' and config.model.normalizer == 'none':
    raise ValueError("optimizer.trainable='batch_norm' trains only the normalizers' gamma and "
                     "beta, but model.normalizer='none'; allowed: any other normalizer.")

  m = config.model
  from bn_research import models  # local import: models import flax modules
  if m.name not in models.MODELS:
    raise ValueError(f'model.name={m.name!r}; allowed: {", ".join(sorted(models.MODELS))}.')
  if m.normalizer not in normalization.NORMALIZERS:
    raise ValueError(f'model.normalizer={m.normalizer!r}; allowed: '
                     f'{", ".join(normalization.NORMALIZERS)}.')
  if m.normalizer == 'virtual_batch_norm' and m.virtual_batch_size <= 0:
    raise ValueError("model.normalizer='virtual_batch_norm' needs model.virtual_batch_size "
                     f'> 0, got {m.virtual_batch_size!r}.')
  if m.virtual_batch_size < 0:
    raise ValueError(f'model.virtual_batch_size={m.virtual_batch_size!r} must be >= 0.')
  if m.virtual_batch_size and m.normalizer in ('layer_norm', 'group_norm'):
    raise ValueError(f'model.virtual_batch_size={m.virtual_batch_size!r} does not apply to '
                     f'model.normalizer={m.normalizer!r} (per-example statistics); allowed: 0.')
  if m.virtual_batch_size and m.normalizer != 'none':
    per_device = config.batch_size // (num_devices or 1)
    if per_device % m.virtual_batch_size:
      raise ValueError(
          f'model.virtual_batch_size={m.virtual_batch_size} does not divide the per-device '
          f'batch of {per_device} (batch_size={config.batch_size} over {num_devices or 1} devices).')
  if not m.bn_epsilon > 0:
    raise ValueError(f'model.bn_epsilon={m.bn_epsilon!r} must be > 0.')
  if not 0 <= m.bn_momentum <= 1:
    raise ValueError(f'model.bn_momentum={m.bn_momentum!r} must be in [0, 1].')
  if not 0 <= m.dropout_rate < 1:
    raise ValueError(f'model.dropout_rate={m.dropout_rate!r} must be in [0, 1).')
  if m.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f'model.dtype={m.dtype!r}; allowed: float32, bfloat16, float16.')
  models.validate_model_config(m)

  if config.data.name == 'imagenet2012':
    from bn_research.data import imagenet
    imagenet.validate_imagenet_config(config.data)
  else:
    from bn_research import data
    data.validate_data_config(config.data)

  if config.probe.enabled:
    _positive_int('probe.num_examples', config.probe.num_examples)
    for p in config.probe.percentiles:
      if not 0 <= p <= 100:
        raise ValueError(f'probe.percentiles contains {p!r}; each must be in [0, 100].')


def check_workdir_parent(workdir: str) -> None:
  parent = os.path.dirname(os.path.abspath(workdir))
  if not os.path.isdir(parent):
    raise ValueError(f'--workdir={workdir!r}: its parent directory {parent!r} does not exist.')
