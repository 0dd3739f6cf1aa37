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
split is always complete. (Synthetic data is generated with N training examples.) Re-running resumes or skips finished networks.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined when run as a program, so that tests can import several experiments."""
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_integer('epochs', 15, 'Training epochs per network.')
  flags.DEFINE_integer('steps', None, 'Stop each network after this many steps '
                       '(default: epochs x steps per epoch); for quick checks.')
  flags.DEFINE_string('data', 'fashion_mnist', 'fashion_mnist, cifar10 or synthetic.')
  flags.DEFINE_string('data_dir', '', "The dataset's directory (data.data_dir): a TFDS "
                      "data_dir, or IDX files; '' = the defaults (TFDS_DATA_DIR, Debian's "
                      'Fashion-MNIST).')
  flags.DEFINE_integer('train_examples', 6000, 'Train on this many training examples (a '
                       'fixed random subset); 0: all. Synthetic data: generate this many.')
  flags.DEFINE_float('lr', None, "Learning rate for both networks (default: the config's).")
  flags.DEFINE_integer('seed', 0, 'Seed of both networks (initialisation, batch order) and '
                       'of the training subset.')
  flags.DEFINE_bool('overwrite', False, 'Passed on to both runs.')


NETWORKS = ('bn', 'baseline')
# Validation loss "turns upward" when its last value is this fraction above its minimum.
UPWARD_FRACTION = 0.05


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


def network_configs(*, data: str, epochs: int, steps: Optional[int],
                    train_examples: int, lr: Optional[float], seed: int,
                    data_dir: str = '') -> dict:
  """{network: config} for both networks; validated, nothing loaded or written."""
  from bn_research import config as config_lib  # pylint: disable=g-import-not-at-top
  from configs import small_cnn  # pylint: disable=g-import-not-at-top
  out = {}
  for net in NETWORKS:
    c = small_cnn.get_config(f'{net},data={data},epochs={epochs}')
    c.seed = seed
    c.data.data_dir = data_dir
    if lr is not None:
      c.optimizer.learning_rate = lr
    if data == 'synthetic' and train_examples:
      c.data.num_train = train_examples
    num_train = (c.data.num_train if data == 'synthetic'
                 else train_examples or small_cnn.TRAIN_EXAMPLES[data])
    small_cnn.set_epochs(c, epochs, num_train)
    if steps is not None:
      c.num_train_steps = min(c.num_train_steps, steps)
      c.checkpoint_every_steps = c.num_train_steps
    config_lib.validate_config(c)
    out[net] = c
  return out


def run(workdir: str, *, data: str = 'fashion_mnist', epochs: int = 15,
        steps: Optional[int] = None, train_examples: int = 6000,
        lr: Optional[float] = None, seed: int = 0, data_dir: str = '',
        overwrite: bool = False) -> dict:
  """Trains both networks, then writes the figure and the JSON summary; returns it."""
  t0 = time.time()
  configs = network_configs(data=data, epochs=epochs, steps=steps,
                            train_examples=train_examples, lr=lr, seed=seed,
                            data_dir=data_dir)
  if train_examples and data != 'synthetic':
    directory = subset_dir(workdir, data, train_examples, seed)
    write_training_subset(configs['bn'].data, directory, train_examples, seed)
    for c in configs.values():
      c.data.source, c.data.data_dir = 'idx', directory
  from bn_research import train  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  os.makedirs(workdir, exist_ok=True)
  for net, c in configs.items():
    logging.info('training %s: %d steps, %d per epoch', net, c.num_train_steps,
                 c.eval_every_steps)
    result = train.train_and_evaluate(c, os.path.join(workdir, net), overwrite=overwrite)
    if result.get('status') not in ('done', 'diverged'):
      raise SystemExit(f'{net}: run ended with status {result.get("status")!r}')
  summary = summarize(workdir, configs['bn'].eval_every_steps)
  summary.update(epochs=epochs, steps=configs['bn'].num_train_steps,
                 steps_per_epoch=configs['bn'].eval_every_steps,
                 train_examples=train_examples,
                 batch_size=configs['bn'].batch_size,
                 learning_rate=configs['bn'].optimizer.learning_rate,
                 wall_seconds=round(time.time() - t0, 1))
  with open(os.path.join(workdir, 'conv_bn_regularization.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  plot(summary, os.path.join(workdir, 'conv_bn_regularization.png'))
  return summary


def summarize_network(run, steps_per_epoch: int) -> dict:
  """Per-epoch curves of one run and what they show."""
  from bn_research.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  curves = {}
  for key, metric in (('train_loss', 'train_loss'), ('train_accuracy', 'train_accuracy'),
                      ('val_loss', 'eval_loss'), ('val_accuracy', 'eval_accuracy')):
    steps, values = runs_lib.metric_series(run, metric)
    curves[key] = [[s / steps_per_epoch, v] for s, v in zip(steps, values)]
  val_loss = np.array([v for _, v in curves['val_loss']] or [np.nan])
  val_acc = [v for _, v in curves['val_accuracy']]
  i_min = int(np.nanargmin(val_loss)) if np.isfinite(val_loss).any() else 0
  rise = float(val_loss[-1] / val_loss[i_min] - 1) if np.isfinite(val_loss[-1]) else None
  return {
      **curves,
      'status': (run.status or {}).get('status'),
      'final_val_accuracy': val_acc[-1] if val_acc else None,
      'best_val_accuracy': max(val_acc) if val_acc else None,
      'min_val_loss': float(val_loss[i_min]),
      'epoch_of_min_val_loss': curves['val_loss'][i_min][0] if curves['val_loss'] else None,
      'final_val_loss': float(val_loss[-1]),
      'val_loss_rise_after_min': rise,
      'val_loss_turns_upward': bool(rise is not None and rise > UPWARD_FRACTION),
      'final_train_loss': curves['train_loss'][-1][1] if curves['train_loss'] else None,
  }


def summarize(workdir: str, steps_per_epoch: int) -> dict:
  from bn_research.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  out = {net: summarize_network(runs_lib.load_run(os.path.join(workdir, net)),
                                steps_per_epoch) for net in NETWORKS}
  bn, base = out['bn'], out['baseline']
  if bn['final_val_accuracy'] is not None and base['final_val_accuracy'] is not None:
    out['val_accuracy_gap_final'] = bn['final_val_accuracy'] - base['final_val_accuracy']
    out['val_accuracy_gap_best'] = bn['best_val_accuracy'] - base['best_val_accuracy']
  with open(os.path.join(workdir, 'bn', 'data.json')) as f:
    description = json.load(f)
  out['data'] = {k: description.get(k) for k in ('dataset', 'source', 'location',
                                                  'num_train', 'num_test', 'image_shape')}
  out['upward_fraction'] = UPWARD_FRACTION
  return out


def plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
  from bn_research.experiment import COLORS as colors  # pylint: disable=g-import-not-at-top
  names = {'bn': 'BN', 'baseline': 'no BN'}
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def print_table(summary: dict) -> None:
  print('| network  | final val acc | best val acc | min val loss (epoch) | final val loss '
        '| turns upward |')
  print('|----------|---------------|--------------|----------------------|----------------'
        '|--------------|')
  for net in NETWORKS:
    s = summary[net]
    at_min = f'{s["min_val_loss"]:.4f} ({s["epoch_of_min_val_loss"]:g})'
    print(f'| {net:<8} | {s["final_val_accuracy"]:<13.4f} | {s["best_val_accuracy"]:<12.4f} '
          f'| {at_min:<20} '
          f'| {s["final_val_loss"]:<14.4f} | {str(s["val_loss_turns_upward"]):<12} |')
  if 'val_accuracy_gap_final' in summary:
    print(f'validation accuracy, BN - no BN: final {summary["val_accuracy_gap_final"]:+.4f}, '
          f'best {summary["val_accuracy_gap_best"]:+.4f}')


def parse_flags() -> dict:
  """The run's arguments from the flags; ValueError naming the bad flag."""
  from configs import small_cnn  # pylint: disable=g-import-not-at-top
  cli.check_workdir(FLAGS.workdir)
  if FLAGS.data not in small_cnn.DATASETS:
    raise ValueError(f'--data={FLAGS.data!r}; allowed: {", ".join(small_cnn.DATASETS)}.')
  if FLAGS.epochs < 1:
    raise ValueError(f'--epochs={FLAGS.epochs} must be >= 1.')
  if FLAGS.steps is not None and FLAGS.steps < 1:
    raise ValueError(f'--steps={FLAGS.steps} must be >= 1.')
  if FLAGS.train_examples < 0:
    raise ValueError(f'--train_examples={FLAGS.train_examples} must be >= 0 (0: all).')
  if FLAGS.lr is not None and not FLAGS.lr > 0:
    raise ValueError(f'--lr={FLAGS.lr} must be > 0.')
  kwargs = dict(data=FLAGS.data, epochs=FLAGS.epochs, steps=FLAGS.steps,
                train_examples=FLAGS.train_examples, lr=FLAGS.lr, seed=FLAGS.seed,
                data_dir=FLAGS.data_dir)
  network_configs(**kwargs)  # the configs' own checks, before any work
  if FLAGS.data == 'cifar10':
    from bn_research.data import tfds_source  # pylint: disable=g-import-not-at-top
    prepared, reason = tfds_source.check_prepared('cifar10', FLAGS.data_dir)
    if prepared is None:
      raise ValueError(f'--data=cifar10: {reason}. Prepare it where TensorFlow and the '
                       'network are available (`tfds build cifar10 '
                       '--file_format=array_record --data_dir=DIR`) and pass --data_dir=DIR.')
  return kwargs


def main(argv: Sequence[str]) -> None:
  kwargs = cli.parse_or_exit('conv_bn_regularization', argv, parse_flags)
  logging.set_verbosity(logging.INFO)
  with cli.one_line_errors('conv_bn_regularization'):
    summary = run(FLAGS.workdir, overwrite=FLAGS.overwrite, **kwargs)
  print_table(summary)
  print(f'wrote {FLAGS.workdir}/conv_bn_regularization.png and conv_bn_regularization.json '
        f'in {summary["wall_seconds"]} s')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
