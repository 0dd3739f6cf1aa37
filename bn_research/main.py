"""Launches one training run.

    python -m bn_research.main --config=configs/mnist_mlp.py:bn --workdir=/tmp/bn \
        [--config.optimizer.learning_rate=0.5 ...] [--overwrite]

Everything a run does is in the config; see `bn_research.train.train_and_evaluate`.
Re-running the same command in the same workdir resumes from the latest checkpoint.
"""

import sys

from bn_research import signals  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  # First: a signal during the imports and start-up below is one line, not a traceback.
  signals.record_until_started('bn_research')

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
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
_CACHE = flags.DEFINE_string(
    'compilation_cache_dir', None, "JAX's persistent compilation cache, so a repeated "
    'run skips compiling (default: $JAX_COMPILATION_CACHE_DIR, else '
    "~/.cache/bn_research/jax; 'none': off).")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from bn_research import log_filter  # pylint: disable=g-import-not-at-top
  log_filter.quiet_library_logs()
  from bn_research import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable(_CACHE.value if _CACHE.value is not None
                       else compile_cache.default_dir())
  from bn_research import train  # after flag parsing: keeps --help fast
  # The run installs its own handler (bn_research.engine.api) from here on.
  signals.started('bn_research', restore=False)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except ValueError as e:
    print(f'bn_research: error: {e}', file=sys.stderr)
    sys.exit(2)
  except train.Interrupted as e:
    # The state at e.step is saved and status.json says 'interrupted': the same
    # command resumes. Exit as a shell reports a death by that signal (130, 143).
    print(f'bn_research: {e}; re-run the same command to resume.', file=sys.stderr)
    sys.exit(128 + e.signum)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """Parses flags; a bad one (e.g. a misspelt --config.key) is one line and exit code 2."""
  from bn_research import config as config_lib  # pylint: disable=g-import-not-at-top
  for i, arg in enumerate(argv[1:], 1):
    # ml_collections' own errors for a missing config file or a directory are tracebacks.
    value = (arg.split('=', 1)[1] if arg.startswith(('--config=', '-config=')) else
             argv[i + 1] if arg in ('--config', '-config') and i + 1 < len(argv) else None)
    if value is not None:
      try:
        config_lib.check_config_path(value)
      except ValueError as e:
        print(f'bn_research: error: {e}', file=sys.stderr)
        sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises AttributeError/KeyError/TypeError too
    text = str(e)
    if 'Traceback' in text:  # an error raised inside a config file: keep its last line
      text = text.strip().splitlines()[-1]
    text = text.replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    where = f' (config overrides given: {" ".join(bad)})' if bad else ''
    print(f'bn_research: error: {type(e).__name__}: {text.strip()}{where}', file=sys.stderr)
    sys.exit(2)


def run():
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=parse_flags_or_exit)


if __name__ == '__main__':
  run()
