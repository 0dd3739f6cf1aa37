"""Launches one training run.

    python -m bn_research.main --config=configs/mnist_mlp.py:bn --workdir=/tmp/bn \
        [--config.optimizer.learning_rate=0.5 ...] [--overwrite]

Everything a run does is in the config; see `bn_research.train.train_and_evaluate`.
Re-running the same command in the same workdir resumes from the latest checkpoint.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with an argument: configs/x.py:arg.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the run\'s files.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'If the workdir holds a run of a different config, move it '
    'aside (renamed, never deleted) and start afresh.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_logger().addFilter(_quiet_libraries)
  from bn_research import train  # after flag parsing: keeps --help fast
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except ValueError as e:
    print(f'bn_research: error: {e}', file=sys.stderr)
    sys.exit(2)


def _quiet_libraries(record) -> bool:
  """Keeps INFO lines from our own code; libraries (orbax is chatty) speak at WARNING+."""
  return record.levelno >= std_logging.WARNING or '/bn_research/' in record.pathname \
      or '/experiments/' in record.pathname or '/scripts/' in record.pathname


def run():
  logging.set_verbosity(logging.INFO)
  try:
    app.run(main)
  except flags.Error as e:  # unknown --config.key etc., raised while parsing
    print(f'bn_research: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()
