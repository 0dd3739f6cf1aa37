r"""Runs a grid of training runs, one sub-directory per grid point.

Usage:
  python -m scripts.sweep --config=configs/<file>.py[:args] --workdir=DIR \
      --sweep=KEY=V1,V2,... [--sweep=KEY2=...] [--sweep_file=experiments/x.py] \
      [--config.key=value ...] [--print_commands] [--python=INTERPRETER] [--vmap | --parallel=N]

Each grid point runs as
  INTERPRETER -m bn_research.main --config=... --workdir=DIR/NAME \
      [--config.key=value ...] --config.KEY=V ...
one after another (`--parallel=N`: N at once, each pinned to its share of the CPU
cores with XLA single-threaded, output in DIR/NAME.log), where NAME is built from the point's values (e.g.
`optimizer.learning_rate=0.1,model.normalizer=batch_norm`). Re-running the
same command skips runs whose status is done or diverged and relaunches the
others, which the engine resumes from their checkpoints. `--print_commands`
prints the launch commands (one shell-quoted line each, finished runs left
out) instead of running them, e.g. to feed a cluster queue. Either way
DIR/sweep.json records the grid and run names; `scripts.compare DIR` reads it.

`--vmap` trains all grid points in this process as ONE compiled program, vmapped
over the swept values (`bn_research.train.train_members`), for any model and data:
the keys in `bn_research.train.SWEEPABLE` (learning rate, momentum, weight decay,
decay rate, init scale, dropout rate, BN momentum, seed), or their product. On several
devices the members are spread over a members x data mesh (8 points on 8 chips: one
each). Each point still gets its own run directory in the engine's format, and
re-running skips finished points and resumes the rest.

A `--sweep_file` is a Python file defining `SWEEP = {"key": [values]}` and
optionally `CONFIG = "configs/x.py:args"` (used when --config is not given).
A --sweep flag for a key the file also sweeps replaces the file's values.

How `--config.key=value` is handled: the overrides are taken out of argv before absl
sees the rest, parsed once into typed values (`sweep.parse_override`) and set, with the
grid's values, on the loaded config, where each is validated with its key's spec; only
the launch commands write them back as text (`plan.command`). SIGTERM or SIGINT stops
every run started (each saves and records `interrupted`) and exits 143 or 130.
"""

from __future__ import annotations

from bn_research import signals  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  signals.record_until_started('sweep')  # first: the imports below take seconds

import signal
import sys
from typing import Sequence

from absl import flags

from bn_research import launch
from bn_research import log_filter
from bn_research import sweep as sweep_lib

_CONFIG = flags.DEFINE_string(
    'config', None, 'Config spec, configs/<file>.py[:args].')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Sweep directory; each run goes in a sub-directory.')
_SWEEP = flags.DEFINE_multi_string(
    'sweep', [], 'KEY=V1,V2,... (repeatable); the grid is the product.')
_SWEEP_FILE = flags.DEFINE_string(
    'sweep_file', None, 'Python file defining SWEEP (and optionally CONFIG).')
_PRINT_COMMANDS = flags.DEFINE_bool(
    'print_commands', False,
    'Print one shell-quoted launch command per unfinished run; run nothing.')
_PYTHON = flags.DEFINE_string(
    'python', sys.executable, 'Interpreter in the launch commands.')
_VMAP = flags.DEFINE_bool(
    'vmap', False,
    'Train all grid points at once in this process as one program, vmapped over the '
    'swept values (keys that change numbers, not shapes; see bn_research.train.SWEEPABLE).')
_PARALLEL = flags.DEFINE_integer(
    'parallel', 1, 'Runs launched at once (separate processes; CPU: one core each).')

# Filled by `_parse_flags` before `main` runs.
_OVERRIDES: list[str] = []


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flags parser that first sets the `--config.*` overrides aside."""
  overrides, rest = sweep_lib.split_config_overrides(list(argv[1:]))
  _OVERRIDES[:] = overrides
  return flags.FLAGS([argv[0]] + rest)


# The sweep itself lives in the library, so that experiments run it without this CLI's flags.
sweep = sweep_lib.sweep


def _raise_interrupted(signum, frame):
  del frame
  raise launch.Interrupted(signum)


def main(argv: Sequence[str]) -> None:
  log_filter.quiet_library_logs()
  signals.started('sweep')
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _raise_interrupted)
  try:
    if len(argv) > 1:
      raise sweep_lib.SweepError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not _WORKDIR.value:
      raise sweep_lib.SweepError('--workdir is required')
    code = sweep(_CONFIG.value, _WORKDIR.value, _SWEEP.value,
                 _SWEEP_FILE.value, _OVERRIDES, _PRINT_COMMANDS.value,
                 _PYTHON.value, vmap=_VMAP.value, parallel=_PARALLEL.value)
  except launch.Interrupted as e:
    print(f'sweep: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except (ValueError, FileExistsError, NotADirectoryError) as e:
    print(f'sweep: error: {e}', file=sys.stderr)
    sys.exit(2)
  sys.exit(code)


if __name__ == '__main__':
  launch.run_app(main, flags_parser=_parse_flags)
