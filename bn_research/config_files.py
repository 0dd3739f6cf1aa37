"""Loading a config the way the command line names it: `configs/x.py[:arg]` plus
`--config.KEY=VALUE` overrides. The one loader for `bn_research.main`, the sweeps and
the experiments; it reads no argv of its own.
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections


def config_path(spec: str) -> str:
  """The file part of a config spec, checked: ValueError naming it unless it is a file."""
  path = spec.split(':', 1)[0]
  if not path:
    raise ValueError(f'--config={spec!r} names no file; give configs/<name>.py[:arg].')
  if os.path.isdir(path):
    raise ValueError(f'--config={spec!r}: {path!r} is a directory; give a config file, '
                     'e.g. configs/mnist_mlp.py.')
  if not os.path.isfile(path):
    raise ValueError(f'--config={spec!r}: {path!r} does not exist; give a config file, '
                     'e.g. configs/mnist_mlp.py.')
  return path


def one_line(error: BaseException) -> str:
  """An error from loading a config (which may carry a config file's whole traceback)
  as one line: its type and last meaningful line."""
  text = str(error).strip()
  if 'Traceback' in text:  # raised inside a config file: its last line names the error
    return ' '.join(text.splitlines()[-1].split())
  text = ' '.join(text.replace('\\n', '\n').split()).replace("\\'", "'")
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections: an unknown key
    return f'no config key {text}; check the spelling of the --config.KEY overrides'
  return f'{type(error).__name__}: {text}'


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `configs/x.py[:arg]` with `--config.KEY=VALUE` overrides, as `main` does.

  ml_collections parses every override with the config field's type.

  Args:
    spec: the config spec given to --config (`path.py` or `path.py:arg`).
    overrides: `--config.KEY=VALUE` arguments.

  Returns:
    The resolved config (locked: an unknown key cannot be added later).

  Raises:
    ValueError: one line naming the spec or override at fault: a missing config file or
      a directory, a bad config argument, an unknown key or an untypable value.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_path(spec)
  argv = ['load_config', f'--config={spec}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
    return flag_values.config
  except Exception as e:  # absl/ml_collections raise many kinds for a bad override
    given = f' (overrides given: {" ".join(overrides)})' if overrides else ''
    raise ValueError(f'--config={spec}: {one_line(e)}{given}') from None
