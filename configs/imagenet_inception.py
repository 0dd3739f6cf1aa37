r"""BN-Inception on ImageNet: the paper's Section 4.2 models (Figures 2 and 3).

    python -m bn_research.main --config=configs/imagenet_inception.py:model=bn_x30 \
        --workdir=gs-or-local/bn_x30 --config.data.data_dir=/data/tfds
    python -m bn_research.main \
        --config=configs/imagenet_inception.py:model=bn_x30,batch=1024,warmup=5 \
        --workdir=gs-or-local/bn_x30_b1024 --config.data.data_dir=/data/tfds

Arguments: `model=` one of inception, bn_baseline, bn_x5, bn_x30, bn_x5_sigmoid,
inception_x5, inception_sigmoid (the table is in configs/common.py); optional
`batch=` (global batch, a multiple of 32; default 32 as in the paper),
`lr_scaling=` (linear, the default, or none), `warmup=` (epochs of linear warmup,
default 0) and `steps=` (training steps at that batch).

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

Many devices (`batch=B`, `common.apply_batch`): BN's statistics stay over 32 examples
(ghost batches, `model.virtual_batch_size=32`), the learning rate is the batch-32 rate
x B/32 (Goyal et al. 2017; `lr_scaling=none` keeps the paper's rate), `warmup=W` climbs
linearly from the batch-32 rate to the scaled one over W epochs, and the step count,
the decay period and every cadence are fixed in images, so they are the same epochs
at any B. At B = 1024 with BN-x30 (a rate of 1.44) Goyal et al.'s 5 epochs of warmup
is `warmup=5`. The per-device batch must also be a multiple of 32 (checked when the
run starts, against the device count).
"""

import ml_collections

from bn_research.config import base_config
from bn_research.data.imagenet import imagenet_data_config
from configs import common

IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_BATCH = common.PAPER_BATCH
BASE_LR = 0.0015
BASE_L2 = 4e-5
BASE_DROPOUT = 0.4
# The batch-32 cadences (log every 1,000 steps, evaluate every 50,000, checkpoint every
# 20,000) as images, so that they fall on the same epochs at any batch size.
CADENCE_IMAGES = {'log_every_steps': 1_000 * PAPER_BATCH,
                  'eval_every_steps': 50_000 * PAPER_BATCH,
                  'checkpoint_every_steps': 20_000 * PAPER_BATCH}


def get_config(arg: str = 'model=bn_x30') -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, model=('bn_x30', common.INCEPTION_MODELS),
                          batch=(PAPER_BATCH, common.PositiveInt),
                          steps=(None, common.PositiveInt),
                          lr_scaling=('linear', ('linear', 'none')), warmup=0.0)
  model = args.model
  common.check_batch(args.batch)
  c = base_config()
  # The paper's Figure 2 runs Inception for 31M steps; BN models converge in far fewer.
  paper_steps = 31_000_000 if model.startswith('inception') else 15_000_000
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

  c.data = imagenet_data_config()
  c.probe.enabled = False

  # The batch-32 recipe, then scaled to the batch (rate, ghost batches, cadences).
  common.apply_inception_model(
      c, model, base_learning_rate=BASE_LR, base_weight_decay=BASE_L2,
      base_decay_steps=round(8 * IMAGENET_TRAIN_IMAGES / PAPER_BATCH),
      base_dropout=BASE_DROPOUT)
  common.apply_batch(c, args.batch,
                     cadence_images={**CADENCE_IMAGES,
                                     'num_train_steps': paper_steps * PAPER_BATCH},
                     images_per_epoch=IMAGENET_TRAIN_IMAGES, lr_scaling=args.lr_scaling,
                     warmup_epochs=args.warmup)
  if args.steps is not None:
    c.num_train_steps = args.steps
  return c
