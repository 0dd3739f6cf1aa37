"""What every experiment's command line does with bad input: one line, exit code 2."""

from __future__ import annotations

import sys
from typing import Callable, Sequence


def check_workdir(workdir: str | None) -> None:
  """--workdir is given and its parent exists; ValueError otherwise."""
  from bn_research import config as config_lib  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise ValueError('--workdir is required.')
  config_lib.check_workdir_parent(workdir)


def parse_or_exit(program: str, argv: Sequence[str], parse: Callable[[], dict]) -> dict:
  """Returns `parse()` (the run's arguments, from the parsed flags). Stray arguments
  or a ValueError from `parse` print `program: error: ...` on stderr and exit with 2,
  before anything is computed or written."""
  try:
    if len(argv) > 1:
      raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')
    return parse()
  except ValueError as e:
    print(f'{program}: error: {e}', file=sys.stderr)
    sys.exit(2)


def quiet_library_logs() -> None:
  """Keeps INFO lines from this project only, for experiments that train in-process
  (orbax logs every checkpoint at INFO), as `bn_research.main` does."""
  try:
    from bn_research.log_filter import quiet_library_logs as quiet  # pylint: disable=g-import-not-at-top
  except ImportError:  # before the engine rewrite (bn_research/engine) is merged
    from bn_research.vmap_sweep import quiet_library_logs as quiet  # pylint: disable=g-import-not-at-top
  quiet()
