r"""Compares training runs: one figure of a metric vs step, and a table.

Usage:
  python -m scripts.compare DIR [DIR ...] --out=FILE.png \
      [--metric=eval_accuracy] [--target=VALUE] [--mode=auto|max|min]

Each DIR is a run directory, or a sweep directory (with sweep.json) that
stands for its started runs; `SWEEP_DIR/*` works too (the sweep's own files
are skipped). Curves are labelled by the config keys that
differ between the runs (the directory name when none do). The table, as
markdown on stdout and as CSV in FILE.csv, has per run: the best value and
its step, the steps needed to reach the target (by default the first run's
best value, as in Figure 3 of the paper), the final value, and the status.
Runs still in progress are read as far as they got; a run whose status says
`running` but whose process is gone (killed: its lock names a dead process) is shown
as `killed`.
"""

from __future__ import annotations

from bn_research import signals  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  signals.record_until_started('compare')  # first: the imports below take seconds

import csv
import math
import os
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')  # Files only; no display on training machines.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from bn_research import launch  # pylint: disable=g-import-not-at-top
from bn_research.analysis import curves  # pylint: disable=g-import-not-at-top
from bn_research.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string('out', None, 'Figure path (.png); table goes to '
                           'the same path with .csv.')
_METRIC = flags.DEFINE_string('metric', 'eval_accuracy', 'Metric to compare.')
_TARGET = flags.DEFINE_float('target', None, 'Value to reach; default: the '
                             "first run's best value.")
_MODE = flags.DEFINE_enum('mode', 'auto', ['auto', 'max', 'min'],
                          'Whether higher (max) or lower (min) is better; '
                          'auto: min for metrics named like a loss or error.')


def _fmt(value: float | int | None, never: str = 'n/a') -> str:
  if value is None:
    return never
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def _column_names(maximize: bool) -> list[str]:
  word = 'max' if maximize else 'min'
  return ['run', f'{word} value', f'step of {word}', 'steps to target',
          'final value', 'status']


def markdown_table(rows: Sequence[curves.Summary], metric: str,
                   target: float | None, maximize: bool) -> str:
  """Formats summary rows as a markdown table with a heading line.

  Args:
    rows: From `curves.summarize`.
    metric: Metric name, for the heading.
    target: Target used, for the heading.
    maximize: Picks the max/min column names.

  Returns:
    The markdown text.
  """
  header = _column_names(maximize)
  lines = [f'Metric `{metric}`, target {_fmt(target)}', '',
           '| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  for r in rows:
    cells = [r.label.replace('|', '\\|'), _fmt(r.best_value),
             _fmt(r.best_step), _fmt(r.steps_to_target, 'never'),
             _fmt(r.final_value), r.status]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_csv(path: pathlib.Path, rows: Sequence[curves.Summary],
              maximize: bool) -> None:
  """Writes the table as CSV, numbers unrounded, plus the run directory."""
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(_column_names(maximize) + ['dir'])
    for r in rows:
      writer.writerow([
          r.label, '' if r.best_value is None else repr(r.best_value),
          '' if r.best_step is None else r.best_step,
          'never' if r.steps_to_target is None else r.steps_to_target,
          '' if r.final_value is None else repr(r.final_value), r.status,
          r.path])


def plot(path: pathlib.Path, loaded: Sequence[runs_lib.Run],
         rows: Sequence[curves.Summary], metric: str,
         target: float | None) -> None:
  """Draws every run's metric curve in one figure and saves it."""
  fig, ax = plt.subplots(figsize=(8, 5))
  for run, row in zip(loaded, rows):
    steps, values = runs_lib.metric_series(run, metric)
    if not steps:
      continue
    label = row.label if row.status == 'done' else f'{row.label} [{row.status}]'
    (line,) = ax.plot(steps, values, label=label)
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if row.status.startswith('diverged') and finite:
      # Mark where a diverged curve ends, so it is not mistaken for a short
      # run; its last values are often NaN, so mark the last finite one.
      ax.plot(*finite[-1], 'x', color=line.get_color(), markersize=10)
  if target is not None and math.isfinite(target):
    ax.axhline(target, color='gray', linestyle='--', linewidth=1,
               label=f'target {_fmt(target)}')
  ax.set_xlabel('step')
  ax.set_ylabel(metric)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def check_out_path(out: str) -> None:
  """ValueError (one line naming --out) unless the figure and its CSV can be written.

  Checked before any run is read, so that a typo costs nothing: the path must not be a
  directory, and its nearest existing parent must be a directory this process can
  write into (missing directories below it are created).
  """
  path = pathlib.Path(out)
  for target in (path, path.with_suffix('.csv')):
    if target.is_dir():
      raise ValueError(f'--out={out!r}: {str(target)!r} is a directory; give a file '
                       'path such as DIR/compare.png.')
  parent = path.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(f'--out={out!r}: {str(parent)!r} is a file, not a directory.')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'--out={out!r}: {str(parent)!r} is not writable; choose another '
                     'path or fix its permissions.')


def compare(dirs: Sequence[str], out: str, metric: str = 'eval_accuracy',
            target: float | None = None, mode: str = 'auto'
            ) -> tuple[list[curves.Summary], float | None, str]:
  """Loads runs, writes the figure and CSV, and returns the table.

  Args:
    dirs: Run or sweep directories.
    out: Figure path; the CSV goes beside it with suffix .csv.
    metric: Metric key.
    target: Value to reach, default the first run's best.
    mode: 'max', 'min' or 'auto' (from the metric name).

  Returns:
    (rows, target used, markdown table).

  Raises:
    NotARunDirError: Naming a directory that is not a run or sweep.
    ValueError: If no run has logged `metric`, the target is not a finite number,
      or `out` cannot be written (all before anything is written).
  """
  if target is not None and not math.isfinite(target):
    raise ValueError(f'--target={target}; allowed: a finite number (omit it to use the '
                     "first run's best value).")
  check_out_path(out)
  maximize = curves.infer_maximize(metric) if mode == 'auto' else mode == 'max'
  loaded = [runs_lib.load_run(d) for d in runs_lib.expand_run_dirs(dirs)]
  if not any(runs_lib.metric_series(r, metric)[0] for r in loaded):
    seen = sorted(set().union(*(runs_lib.available_metrics(r) for r in loaded)))
    raise ValueError(f'no run has logged {metric!r}; logged metrics: '
                     f'{", ".join(seen) or "none yet"}')
  rows, used_target = curves.summarize(loaded, metric, target, maximize)
  out_path = pathlib.Path(out)
  try:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    plot(out_path, loaded, rows, metric, used_target)
    write_csv(out_path.with_suffix('.csv'), rows, maximize)
  except OSError as e:  # e.g. a full disk, or a parent made read-only meanwhile
    raise ValueError(f'--out={out!r} cannot be written ({e.strerror or e}).') from None
  return rows, used_target, markdown_table(rows, metric, used_target, maximize)


def main(argv: Sequence[str]) -> None:
  signals.started('compare')
  signals.end_in_one_line('compare')
  if len(argv) < 2:
    raise app.UsageError('give at least one run or sweep directory')
  if not _OUT.value:
    raise app.UsageError('--out=FILE.png is required')
  try:
    _, _, table = compare(argv[1:], _OUT.value, _METRIC.value, _TARGET.value,
                          _MODE.value)
  except ValueError as e:  # NotARunDirError and rundir's RunDirError included.
    print(f'compare: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(table)


if __name__ == '__main__':
  launch.run_app(main)
