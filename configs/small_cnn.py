r"""A small conv net (conv-BN-ReLU-pool blocks, dense head), with or without BN, batch 32.

    python -m bn_research.main --config=configs/small_cnn.py:bn --workdir=/tmp/cnn_bn
    python -m bn_research.main --config=configs/small_cnn.py:baseline --workdir=/tmp/cnn_base

Argument: `bn` (BN after every convolution and dense hidden layer, no biases there) or
`baseline` (no BN), optionally followed by `,key=value` pairs:
`configs/small_cnn.py:bn,epochs=10,lr=0.01,data=cifar10`.

* data: fashion_mnist (default; offline through Debian's `dataset-fashion-mnist` IDX
  files, `apt-get install dataset-fashion-mnist`, or a prepared TFDS directory),
  cifar10 (a prepared TFDS directory: `tfds build cifar10 --file_format=array_record`)
  or synthetic (stand-in data for tests).
* Training and evaluation are counted in epochs: the engine logs the running training
  loss/accuracy and evaluates on the held-out split once per epoch
  (log_every_steps = eval_every_steps = steps per epoch).
* Same optimizer for both networks: SGD with momentum 0.9 at learning rate 0.01, no
  weight decay, no data augmentation (so that overfitting can show).
"""

import ml_collections

from bn_research.config import base_config
from configs import common

# Training-set sizes, to count epochs in steps.
TRAIN_EXAMPLES = {'fashion_mnist': 60_000, 'cifar10': 50_000, 'mnist': 60_000}
DATASETS = ('fashion_mnist', 'cifar10', 'synthetic')


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Steps of one pass over the training set (the last partial batch rolls over)."""
  return max(1, num_train // batch_size)


def set_epochs(c: ml_collections.ConfigDict, epochs: int, num_train: int) -> None:
  """Trains for `epochs` passes over `num_train` examples, logging and evaluating once
  per epoch and checkpointing at the end."""
  per_epoch = steps_per_epoch(num_train, c.batch_size)
  c.num_train_steps = epochs * per_epoch
  c.log_every_steps = c.eval_every_steps = per_epoch
  c.checkpoint_every_steps = c.num_train_steps


def get_config(arg: str = 'bn') -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, variant=('bn', ('bn', 'baseline')), epochs=15, lr=0.01,
                          data=('fashion_mnist', DATASETS), source='', seed=0)
  variant, data = args.variant, args.data

  c = base_config()
  c.batch_size = 32
  c.steps_per_dispatch = 1   # XLA:CPU runs convolutions slower inside a scan
  c.eval_batch_size = 1000

  c.optimizer.name = 'momentum'
  c.optimizer.learning_rate = args.lr
  c.optimizer.momentum = 0.9
  c.optimizer.decay_rate = 1.0

  c.model.name = 'small_cnn'
  c.model.normalizer = 'batch_norm' if variant == 'bn' else 'none'
  c.model.activation = 'relu'
  c.model.conv_features = (16, 32)
  c.model.hidden_sizes = (64,)

  c.seed = args.seed
  c.data.name = data
  c.data.source = args.source or ('tfds' if data == 'cifar10' else 'auto')
  if data == 'synthetic':
    c.data.source = 'synthetic'
    c.data.image_size = 16
    c.data.num_train = 2048
    c.data.num_test = 512
  num_train = c.data.num_train if data == 'synthetic' else TRAIN_EXAMPLES[data]
  set_epochs(c, args.epochs, num_train)
  return c
