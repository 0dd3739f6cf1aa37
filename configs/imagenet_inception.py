r"""BN-Inception on ImageNet: the paper's Section 4.2 models (Figures 2 and 3).

    python -m bn_research.main --config=configs/imagenet_inception.py:model=bn_x30 \
        --workdir=gs-or-local/bn_x30 --config.data.data_dir=/data/tfds

Arguments: `model=` one of inception, bn_baseline, bn_x5, bn_x30, bn_x5_sigmoid,
inception_x5, inception_sigmoid (the table is in configs/common.py); optional
`batch=` (global batch; default 32 as in the paper) and `steps=`.

Numbers the paper gives: SGD with momentum 0.9, batch 32, initial learning rates
0.0015 (Inception, BN-Baseline), 0.0075 (x5) and 0.045 (x30), and the 4.2.1 changes.
Numbers it does not give, and where they come from:
* L2 weight decay 4e-5 for the unaccelerated models: TF-slim's Inception arg scope
  (`inception_arg_scope(weight_decay=0.00004)`); BN-x5/x30 use 1/5 of it.
* Learning-rate schedule: GoogLeNet's (Szegedy et al. 2014, Sec. 6) "decrease the
  learning rate by 4% every 8 epochs": exponential decay 0.96 every 8 epochs of
  1,281,167 images = 320,292 steps at batch 32; "6x faster" is every 53,382 steps.
* Dropout 0.4 before the classifier: GoogLeNet's main classifier (Sec. 5).
* BN epsilon 1e-3 and moving-average decay 0.9997 as in TF-slim's inception_v2 scope.

Many devices: the paper's statistics are over 32 examples. With a global batch B > 32
this config sets `model.virtual_batch_size=32` (ghost batches), so BN sees the paper's
batch-32 statistics at any B, and scales the learning rate linearly with B/32 (Goyal
et al. 2017); pass `lr_scaling=none` to keep the paper's rate.
"""

import ml_collections

from bn_research.config import base_config
from bn_research.data.imagenet import imagenet_data_config
from configs import common

IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_BATCH = 32
BASE_LR = 0.0015
BASE_L2 = 4e-5
BASE_DROPOUT = 0.4


def get_config(arg: str = 'model=bn_x30') -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, model=('bn_x30', common.INCEPTION_MODELS),
                          batch=(PAPER_BATCH, common.PositiveInt),
                          steps=(None, common.PositiveInt),
                          lr_scaling=('linear', ('linear', 'none')))
  model, batch = args.model, args.batch
  c = base_config()
  c.batch_size = batch
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
  # The paper's Figure 2 runs Inception for 31M steps; BN models converge in far fewer.
  default_steps = 31_000_000 if model.startswith('inception') else 15_000_000
  c.num_train_steps = (args.steps if args.steps is not None
                       else default_steps * PAPER_BATCH // batch)
  c.eval_every_steps = 50_000
  c.log_every_steps = 1_000
  c.checkpoint_every_steps = 20_000
  c.eval_batch_size = 1024
  c.steps_per_dispatch = 1

  c.optimizer.name = 'momentum'
  c.optimizer.momentum = 0.9
  c.optimizer.decay_rate = 0.96
  c.model.name = 'inception'
  c.model.bn_epsilon = 1e-3
  c.model.bn_momentum = 0.9997
  c.model.small_inputs = False
  c.model.width_multiplier = 1.0
  if batch > PAPER_BATCH:
    if batch % PAPER_BATCH:
      raise ValueError(f'batch={batch} must be a multiple of the paper\'s {PAPER_BATCH} '
                       'so that ghost batches of 32 tile it.')
    c.model.virtual_batch_size = PAPER_BATCH

  c.data = imagenet_data_config()
  c.probe.enabled = False

  scale = batch / PAPER_BATCH if args.lr_scaling == 'linear' else 1.0
  common.apply_inception_model(
      c, model, base_learning_rate=BASE_LR * scale, base_weight_decay=BASE_L2,
      base_decay_steps=8 * steps_per_epoch, base_dropout=BASE_DROPOUT)
  return c
