r"""BN's regularising effect on a small conv net: training vs validation curves, BN vs no BN.

    python -m experiments.conv_bn_regularization --workdir=runs/conv_bn

Trains `configs/small_cnn.py` twice, with BN (`bn`) and without (`baseline`), batch 32,
same initial seed and optimizer, for a fixed number of epochs, through the engine
(`bn_research.train.train_and_evaluate`), each into its own run directory
(`DIR/bn`, `DIR/baseline`). Once per epoch the engine logs the training loss and
accuracy (the running mean over that epoch's mini-batches, the network in training
mode, as Keras-style curves are) and evaluates on the held-out split (Fashion-MNIST's
or CIFAR-10's test set, here called validation). Then writes

    DIR/conv_bn_regularization.png   loss and accuracy per epoch: training (dashed) and
                                     validation (solid), both networks
    DIR/conv_bn_regularization.json  per network: the curves, final and best validation
                                     accuracy, minimum validation loss and its epoch,
                                     how far validation loss rose after it and whether
                                     that counts as turning upward; the accuracy gap

Data: Fashion-MNIST by default (offline: Debian's `dataset-fashion-mnist` package, or a
prepared TFDS directory), `--data=cifar10` from a prepared TFDS directory,
`--data=synthetic` for tests. `--train_examples=N` trains on a fixed random subset of N
training examples (written once as IDX files under DIR/data/ and read back through
`data.source=idx`), so that overfitting shows within a few CPU minutes; the held-out
split is always complete. (Synthetic data is generated with N training examples.)
Re-running resumes or skips finished networks. DIR/conv_bn_regularization.md holds the
summary as a table.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from bn_research import checks
from bn_research import experiment
from bn_research import launch
from bn_research import plan as plan_lib
from configs import small_cnn

NETWORKS = ('bn', 'baseline')
LABELS = {'bn': 'BN', 'baseline': 'no BN'}
# Validation loss "turns upward" when its last value is this fraction above its minimum.
UPWARD_FRACTION = 0.05

NAME = 'conv_bn_regularization'
WORKDIR = 'runs/conv_bn'
HOW, PARALLEL = 'inline', 1
FLAGS = {
    'epochs': experiment.Flag(int, 15, 'Training epochs per network.', checks.Int(1)),
    'steps': experiment.Flag(int, None, 'Stop each network after this many steps '
                             '(default: epochs x steps per epoch); for quick checks.',
                             checks.Int(1)),
    'data': experiment.Flag(str, 'fashion_mnist', 'fashion_mnist, cifar10 or synthetic.',
                            checks.Choice(small_cnn.DATASETS)),
    'data_dir': experiment.Flag(str, '', "The dataset's directory (data.data_dir): a TFDS "
                                "data_dir, or IDX files; '' = the defaults (TFDS_DATA_DIR, "
                                "Debian's Fashion-MNIST)."),
    'train_examples': experiment.Flag(int, 6000, 'Train on this many training examples (a '
                                      'fixed random subset); 0: all. Synthetic data: '
                                      'generate this many.', checks.Int(0)),
    'lr': experiment.Flag(float, None, "Learning rate for both networks (default: the "
                          "config's).", checks.Float(0.0, low_open=True)),
    'seed': experiment.Flag(int, 0, 'Seed of both networks (initialisation, batch order) '
                            'and of the training subset.',
                            checks.Int(0, checks.SEED_LIMIT - 1)),
}


def subset_dir(workdir: str, name: str, train_examples: int, seed: int) -> str:
  return os.path.join(workdir, 'data', f'{name}_train{train_examples}_seed{seed}')


def write_training_subset(data_config, directory: str, train_examples: int,
                          seed: int) -> None:
  """Writes `train_examples` random training examples and the whole held-out split as
  IDX files (uint8 pixels, as the sources store them) into `directory`."""
  from bn_research import data as data_lib  # pylint: disable=g-import-not-at-top
  if os.path.isdir(directory) and not data_lib.idx.missing_idx_files(directory):
    return
  ds = data_lib.load_dataset(data_config)
  if train_examples > len(ds.train_labels):
    raise ValueError(f'--train_examples={train_examples}: {ds.name} has only '
                     f'{len(ds.train_labels)} training examples.')
  keep = np.sort(np.random.default_rng(seed).permutation(len(ds.train_labels))[:train_examples])
  os.makedirs(directory, exist_ok=True)
  as_uint8 = lambda images: np.round(images * 255.0).astype(np.uint8)
  for prefix, images, labels in (('train', ds.train_images[keep], ds.train_labels[keep]),
                                 ('t10k', ds.test_images, ds.test_labels)):
    data_lib.write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte'),
                       as_uint8(images))
    data_lib.write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte'),
                       labels.astype(np.uint8))


def uses_subset(args) -> bool:
  """Whether the runs read a training subset written by `prepare` (not synthetic data,
  which is generated with --train_examples examples)."""
  return bool(args.train_examples) and args.data != 'synthetic'


def network_overrides(net: str, args) -> dict:
  """The typed overrides of one network: seed, data, learning rate, and an epoch's steps
  as the evaluation and logging cadence (`small_cnn.set_epochs`)."""
  base = plan_lib.load(spec_of(net, args))
  num_train = (args.train_examples or base.data.num_train if args.data == 'synthetic'
               else args.train_examples or small_cnn.TRAIN_EXAMPLES[args.data])
  per_epoch = small_cnn.steps_per_epoch(num_train, base.batch_size)
  steps = args.epochs * per_epoch
  if args.steps is not None:
    steps = min(steps, args.steps)
  out = {'seed': args.seed, 'data.data_dir': args.data_dir,
         'num_train_steps': steps, 'log_every_steps': per_epoch,
         'eval_every_steps': per_epoch, 'checkpoint_every_steps': steps}
  if args.lr is not None:
    out['optimizer.learning_rate'] = args.lr
  if args.data == 'synthetic' and args.train_examples:
    out['data.num_train'] = args.train_examples
  return out


def spec_of(net: str, args) -> str:
  return os.path.join(launch.REPO, 'configs',
                      f'small_cnn.py:{net},data={args.data},epochs={args.epochs}')


def plan(args) -> list[plan_lib.Run]:
  """Both networks, identical but for BN; CIFAR-10 must be prepared first."""
  if uses_subset(args) and args.train_examples > small_cnn.TRAIN_EXAMPLES[args.data]:
    raise ValueError(f'--train_examples={args.train_examples}: {args.data} has only '
                     f'{small_cnn.TRAIN_EXAMPLES[args.data]} training examples.')
  if args.data == 'cifar10':
    from bn_research.data import tfds_source  # pylint: disable=g-import-not-at-top
    prepared, reason = tfds_source.check_prepared('cifar10', args.data_dir)
    if prepared is None:
      raise ValueError(f'--data=cifar10: {reason}. Prepare it where TensorFlow and the '
                       'network are available (`tfds build cifar10 '
                       '--file_format=array_record --data_dir=DIR`) and pass --data_dir=DIR.')
  return [plan_lib.make_run(net, os.path.join(args.workdir, net), spec_of(net, args),
                            {**network_overrides(net, args), **args.overrides})
          for net in NETWORKS]


def prepare(args, runs: Sequence[plan_lib.Run]) -> list[plan_lib.Run]:
  """Writes the training subset (once; kept for re-runs) and returns the runs re-made to
  read it (data.source=idx), which their config checks allow only once it exists."""
  if not uses_subset(args):
    return list(runs)
  directory = subset_dir(args.workdir, args.data, args.train_examples, args.seed)
  write_training_subset(runs[0].config.data, directory, args.train_examples, args.seed)
  return [plan_lib.make_run(run.name, run.workdir, run.spec,
                            {**dict(run.overrides), 'data.source': 'idx',
                             'data.data_dir': directory})
          for run in runs]


def summarize_network(run: experiment.RunRecord, steps_per_epoch: int) -> dict:
  """Per-epoch curves of one run and what they show."""
  curves = {}
  for key, metric in (('train_loss', 'train_loss'), ('train_accuracy', 'train_accuracy'),
                      ('val_loss', 'eval_loss'), ('val_accuracy', 'eval_accuracy')):
    curves[key] = [[s / steps_per_epoch, v] for s, v in run.curve(metric)]
  val_loss = np.array([v for _, v in curves['val_loss']] or [np.nan])
  val_acc = [v for _, v in curves['val_accuracy']]
  i_min = int(np.nanargmin(val_loss)) if np.isfinite(val_loss).any() else 0
  rise = float(val_loss[-1] / val_loss[i_min] - 1) if np.isfinite(val_loss[-1]) else None
  return {
      **curves,
      'status': run.status.get('status'),
      'final_val_accuracy': val_acc[-1] if val_acc else None,
      'best_val_accuracy': max(val_acc) if val_acc else None,
      'min_val_loss': float(val_loss[i_min]),
      'epoch_of_min_val_loss': curves['val_loss'][i_min][0] if curves['val_loss'] else None,
      'final_val_loss': float(val_loss[-1]),
      'val_loss_rise_after_min': rise,
      'val_loss_turns_upward': bool(rise is not None and rise > UPWARD_FRACTION),
      'final_train_loss': curves['train_loss'][-1][1] if curves['train_loss'] else None,
  }


def summarize(records: Sequence[experiment.RunRecord], args) -> dict:
  """Both networks' curves and numbers, the gap between them, and the data they saw."""
  config = records[0].run.config
  steps_per_epoch = config.eval_every_steps
  out = {r.name: summarize_network(r, steps_per_epoch) for r in records}
  bn, base = out['bn'], out['baseline']
  if bn['final_val_accuracy'] is not None and base['final_val_accuracy'] is not None:
    out['val_accuracy_gap_final'] = bn['final_val_accuracy'] - base['final_val_accuracy']
    out['val_accuracy_gap_best'] = bn['best_val_accuracy'] - base['best_val_accuracy']
  description = records[0].data
  out['data'] = {k: description.get(k) for k in ('dataset', 'source', 'location',
                                                  'num_train', 'num_test', 'image_shape')}
  out['upward_fraction'] = UPWARD_FRACTION
  out.update(epochs=args.epochs, steps=config.num_train_steps,
             steps_per_epoch=steps_per_epoch, train_examples=args.train_examples,
             batch_size=config.batch_size, learning_rate=config.optimizer.learning_rate)
  return out


def plot(summary: dict):
  """Loss and accuracy per epoch, training (dashed) and validation (solid)."""
  fig, axes = experiment.figure(2, width=6.0, height=4.4)
  colors, names = experiment.COLORS, LABELS
  for ax, what in zip(axes, ('loss', 'accuracy')):
    for net in NETWORKS:
      for split, style in (('train', '--'), ('val', '-')):
        curve = np.asarray(summary[net][f'{split}_{what}'])
        if len(curve):
          label = f'{names[net]}, {"training" if split == "train" else "validation"}'
          ax.plot(curve[:, 0], curve[:, 1], style, color=colors[net], marker='.',
                  label=label)
    ax.set_xlabel('epoch')
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_title('loss (training: running mean over the epoch)')
  axes[1].set_title('accuracy')
  d = summary['data']
  fig.suptitle(f'small conv net with and without BN on {d.get("dataset")} '
               f'({d.get("num_train")} train / {d.get("num_test")} validation), batch '
               f'{summary["batch_size"]}, lr {summary["learning_rate"]:g}')
  fig.tight_layout()
  return fig


def table(summary: dict) -> str:
  """Per network: final and best validation accuracy, the loss minimum and the rise."""
  rows = []
  for net in NETWORKS:
    s = summary[net]
    rows.append([LABELS[net], s['final_val_accuracy'], s['best_val_accuracy'],
                 s['min_val_loss'], s['epoch_of_min_val_loss'], s['final_val_loss'],
                 s['val_loss_turns_upward'], s['status']])
  text = experiment.markdown_table(
      ['network', 'final val acc', 'best val acc', 'min val loss', 'at epoch',
       'final val loss', 'turns upward', 'status'], rows)
  if 'val_accuracy_gap_final' in summary:
    text += (f'\n\nValidation accuracy, BN - no BN: final '
             f'{summary["val_accuracy_gap_final"]:+.4f}, best '
             f'{summary["val_accuracy_gap_best"]:+.4f}.')
  return text


if __name__ == '__main__':
  experiment.main(__name__)
