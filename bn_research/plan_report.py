"""What a running or finished plan looks like on the console: live progress and the
closing table, read back from the runs' directories (rundir readers).

`plan` re-exports these names; runs are `plan.Run`s (anything with `name`, `workdir`
and `config.num_train_steps`).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from bn_research import rundir


def label(run: Any, runs: Sequence[Any]) -> str:
  """The run's name, or `<directory>/<name>` where runs of other directories share it."""
  if sum(r.name == run.name for r in runs) == 1:
    return run.name
  return f'{os.path.basename(os.path.dirname(os.path.abspath(run.workdir)))}/{run.name}'


def progress_line(runs: Sequence[Any]) -> str:
  """'name: step S/N, test accuracy A | ...' for the runs being trained."""
  parts = []
  for run in runs:
    try:
      rows = rundir.read_metrics(run.workdir) if os.path.isdir(run.workdir) else []
    except rundir.RunDirError:
      rows = []
    step = rows[-1]['step'] if rows else 0
    acc = [r['eval_accuracy'] for r in rows if 'eval_accuracy' in r]
    parts.append(f'{label(run, runs)}: step {step}/{run.config.num_train_steps}'
                 + (f', test accuracy {acc[-1]:.4f}' if acc else ''))
  return ' | '.join(parts)


def results_table(runs: Sequence[Any]) -> str:
  """One line per run: its status, last step and last test accuracy (rundir readers)."""
  rows = []
  for run in runs:
    try:
      status = rundir.read_status(run.workdir) or {}
      metrics = rundir.read_metrics(run.workdir) if os.path.isdir(run.workdir) else []
    except rundir.RunDirError as e:
      status, metrics = {'status': f'unreadable: {e}'}, []
    acc = [m['eval_accuracy'] for m in metrics if 'eval_accuracy' in m]
    rows.append((run.name, str(status.get('status', 'new')), str(status.get('step', '-')),
                 f'{acc[-1]:.4f}' if acc else '-'))
  header = ('run', 'status', 'step', 'test accuracy')
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                   for row in [header] + rows)


def print_progress(runs: Sequence[Any]) -> None:
  """The live progress a command shows: one `progress_line` on stdout."""
  print(progress_line(runs), flush=True)
