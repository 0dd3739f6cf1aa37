"""Summary numbers of training curves and labels for comparing runs.

The headline comparison of the paper (Figure 3) is how many steps each
variant needs to reach the baseline's best accuracy; `steps_to_target` and
`summarize` compute that, along with the best and final values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

from bn_research import rundir
from bn_research.analysis import runs as runs_lib


def steps_to_target(steps: Sequence[int], values: Sequence[float],
                    target: float, maximize: bool = True) -> int | None:
  """First step at which a curve reaches a target.

  Args:
    steps: Steps, increasing.
    values: Metric value at each step.
    target: Value to reach.
    maximize: If True the target is reached at value >= target, else at
      value <= target (for losses).

  Returns:
    The step, or None if the curve never reaches the target.
  """
  for step, value in zip(steps, values):
    if (value >= target) if maximize else (value <= target):
      return step
  return None


def best(steps: Sequence[int], values: Sequence[float],
         maximize: bool = True) -> tuple[float, int] | tuple[None, None]:
  """Best value of a curve and the first step where it occurs.

  NaN and infinite values (a diverging run) are ignored, since they would
  otherwise win a max or poison the comparison.

  Args:
    steps: Steps, increasing.
    values: Metric value at each step.
    maximize: Whether higher is better.

  Returns:
    (value, step), or (None, None) if the curve has no finite value.
  """
  best_value, best_step = None, None
  for step, value in zip(steps, values):
    if not runs_lib.is_finite(value):
      continue
    if best_value is None or (value > best_value if maximize
                              else value < best_value):
      best_value, best_step = value, step
  return best_value, best_step


def mean_curve(curves_by_seed: Sequence[tuple[Sequence[int], Sequence[float]]]
               ) -> tuple[list[int], list[float]]:
  """The mean over seeds of one metric, at the steps every seed recorded (a diverged
  seed's curve ends where it diverged, and so does the mean)."""
  common = sorted(set.intersection(*(set(steps) for steps, _ in curves_by_seed)))
  lookups = [dict(zip(steps, values)) for steps, values in curves_by_seed]
  return common, [sum(l[s] for l in lookups) / len(lookups) for s in common]


def outcome(statuses: Sequence[Mapping[str, Any]], max_accuracy: float | None,
            at_chance: float) -> str:
  """A model's outcome over its seeds' status.json records: "diverged" (every seed),
  "diverged in k/n seeds", "unfinished", "at chance" (its best accuracy below
  `at_chance`, e.g. 2x chance: a network that never learned, without any NaN) or
  "trains"."""
  diverged = [s for s in statuses if s.get('status') == 'diverged']
  if diverged:
    return ('diverged' if len(diverged) == len(statuses)
            else f'diverged in {len(diverged)}/{len(statuses)} seeds')
  if any(s.get('status') != 'done' for s in statuses):
    return 'unfinished'
  return 'at chance' if max_accuracy is None or max_accuracy < at_chance else 'trains'


def final_value(values: Sequence[float]) -> float | None:
  """Last recorded value of a curve (may be NaN for a diverged run)."""
  return values[-1] if values else None


# One definition of a config's flat keys for the engine and the analysis tools.
flatten = rundir.flatten


_MISSING = object()


def config_differences(configs: Sequence[Mapping[str, Any]]
                       ) -> list[dict[str, Any]]:
  """Keeps, per config, only the flattened keys whose values differ.

  Args:
    configs: Nested config dicts of the runs being compared.

  Returns:
    One dict per config with the differing keys in sorted order. A key absent
    from some configs counts as differing; the configs lacking it omit it.
  """
  flats = [flatten(c) for c in configs]
  keys = sorted(set().union(*flats)) if flats else []
  differing = []
  for key in keys:
    # JSON text compares lists and numbers the way they were written.
    seen = {json.dumps(f.get(key, _MISSING), sort_keys=True, default=repr)
            for f in flats}
    if len(seen) > 1:
      differing.append(key)
  return [{k: f[k] for k in differing if k in f} for f in flats]


def _format_label_value(value: Any) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (list, dict)):
    return json.dumps(value)
  return str(value)


def run_labels(configs: Sequence[Mapping[str, Any]],
               names: Sequence[str]) -> list[str]:
  """Labels runs by what differs between their configs.

  Args:
    configs: Nested config dicts of the runs.
    names: Directory names, used when configs do not tell runs apart.

  Returns:
    One label per run, e.g. "model.normalizer=batch_norm, seed=1"; the
    directory name when its config has no differing key; the directory name
    is appended when two labels would otherwise be the same.
  """
  labels = []
  for diff, name in zip(config_differences(configs), names):
    text = ', '.join(f'{k}={_format_label_value(v)}' for k, v in diff.items())
    labels.append(text or name)
  counts = {label: labels.count(label) for label in labels}
  return [f'{label} ({name})' if counts[label] > 1 and label != name else label
          for label, name in zip(labels, names)]


def infer_maximize(metric: str) -> bool:
  """Guesses whether higher is better from the metric name (losses: no)."""
  lowered = metric.lower()
  return not ('loss' in lowered or 'error' in lowered)


@dataclasses.dataclass
class Summary:
  """One row of the comparison table.

  Attributes:
    label: What distinguishes this run (see `run_labels`).
    path: Run directory.
    best_value: Max (or min when minimizing) value, None without data.
    best_step: First step of `best_value`.
    steps_to_target: First step reaching the target, None if never.
    final_value: Last value logged.
    final_step: Step of `final_value`.
    status: See `runs.status_label`.
  """

  label: str
  path: str
  best_value: float | None
  best_step: int | None
  steps_to_target: int | None
  final_value: float | None
  final_step: int | None
  status: str


def default_target(first_run: runs_lib.Run, metric: str,
                   maximize: bool = True) -> float | None:
  """The paper's target: the best value the first (baseline) run reached."""
  steps, values = runs_lib.metric_series(first_run, metric)
  return best(steps, values, maximize)[0]


def summarize(runs: Sequence[runs_lib.Run], metric: str,
              target: float | None = None,
              maximize: bool = True) -> tuple[list[Summary], float | None]:
  """Builds the comparison table rows for a set of runs.

  Args:
    runs: Loaded runs; the first is the baseline for the default target.
    metric: Metric key to compare, e.g. "eval_accuracy".
    target: Value to reach; default is the first run's best value.
    maximize: Whether higher is better.

  Returns:
    (rows in the order of `runs`, the target used or None if there was none).
  """
  if target is None and runs:
    target = default_target(runs[0], metric, maximize)
  labels = run_labels([r.config for r in runs], [r.name for r in runs])
  rows = []
  for run, label in zip(runs, labels):
    steps, values = runs_lib.metric_series(run, metric)
    best_value, best_step = best(steps, values, maximize)
    reached = (None if target is None or math.isnan(target)
               else steps_to_target(steps, values, target, maximize))
    rows.append(Summary(
        label=label, path=str(run.path), best_value=best_value,
        best_step=best_step, steps_to_target=reached,
        final_value=final_value(values),
        final_step=steps[-1] if steps else None,
        status=runs_lib.status_label(run)))
  return rows, target
