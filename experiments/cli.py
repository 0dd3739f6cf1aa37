"""What every experiment's command line does with bad input: one line, exit code 2."""

from __future__ import annotations

from typing import Callable, Sequence

from bn_research import launch
from bn_research.experiment import one_line_errors  # pylint: disable=unused-import
from bn_research.log_filter import quiet_library_logs  # pylint: disable=unused-import


def check_workdir(workdir: str | None) -> None:
  """--workdir is given and its parent exists; ValueError otherwise."""
  from bn_research import rundir  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise ValueError('--workdir is required.')
  rundir.check_workdir_parent(workdir)


def parse_or_exit(program: str, argv: Sequence[str], parse: Callable[[], dict]) -> dict:
  """Returns `parse()` (the run's arguments, from the parsed flags). Stray arguments
  or a ValueError from `parse` print `program: error: ...` on stderr and exit with 2,
  before anything is computed or written."""
  def check():
    if len(argv) > 1:
      raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')
    return parse()
  return launch.exit_on_bad_flags(program, check)
