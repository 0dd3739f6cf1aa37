"""What every experiment's command line does with bad input: one line, exit code 2."""

from __future__ import annotations

from typing import Callable, Sequence

from bn_research import launch
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


def apply_override(c, assignment: str) -> None:
  """Applies '--set=a.b=value' to config c, the value parsed as sweeps parse theirs;
  ValueError naming the assignment for an unknown key or a value of the wrong type."""
  from bn_research import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  key, eq, text = assignment.partition('=')
  if not eq or not sweep_lib.has_key(c, key):
    raise ValueError(f'--set={assignment!r}: ' + (f'no config key {key!r}.' if eq else
                                                  'expected key=value.'))
  try:
    c.update_from_flattened_dict({key: sweep_lib.parse_value(text)})
  except (TypeError, ValueError) as e:
    raise ValueError(f'--set={assignment!r}: {e}') from None
