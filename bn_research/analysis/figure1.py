"""Figure 1's claims, measured: speed, final accuracy, steadiness of the sigmoid input.

The paper states, for the MNIST network with and without BN (Section 4.1):
* BN trains faster (reaches the baseline's best test accuracy in fewer steps);
* BN ends with the higher test accuracy;
* BN's sigmoid input is steadier over training, in its mean (the median here) and in
  its spread (p15..p85), while the baseline's drifts.

"Steadier" is measured two ways on the probed percentiles after the first tenth of
training (the early transient of both networks is excluded): the total drift from then
to the end, and the jitter, the mean absolute change from one evaluation to the next.
A claim holds when BN's number is the better one on every measure it names.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from bn_research.analysis import curves


def steadiness(percentiles: Sequence[Sequence[float]], *, skip_fraction: float = 0.1
               ) -> dict:
  """Drift and jitter of the median and of the p15..p85 spread.

  Args:
    percentiles: rows [step, p15, p50, p85], steps increasing.
    skip_fraction: the leading fraction of training left out.

  Returns:
    {'from_step', 'median_drift', 'spread_drift', 'median_jitter', 'spread_jitter'}:
    drifts are end minus start (signed), jitters mean |change| between evaluations.
  """
  p = np.asarray(percentiles, np.float64)
  if len(p) < 2:
    raise ValueError(f'steadiness needs at least 2 probe rows, got {len(p)}.')
  first = p[0, 0] + skip_fraction * (p[-1, 0] - p[0, 0])
  p = p[p[:, 0] >= first]
  median, spread = p[:, 2], p[:, 3] - p[:, 1]
  return {'from_step': int(p[0, 0]),
          'median_drift': float(median[-1] - median[0]),
          'spread_drift': float(spread[-1] - spread[0]),
          'median_jitter': float(np.mean(np.abs(np.diff(median)))) if len(p) > 1 else 0.0,
          'spread_jitter': float(np.mean(np.abs(np.diff(spread)))) if len(p) > 1 else 0.0}


def network_numbers(accuracy: Sequence[Sequence[float]],
                    percentiles: Sequence[Sequence[float]], target: float) -> dict:
  """Per network: final and max accuracy, steps to reach `target`, steadiness."""
  steps = [int(s) for s, _ in accuracy]
  values = [float(a) for _, a in accuracy]
  return {'final_test_accuracy': values[-1], 'max_test_accuracy': max(values),
          'steps_to_baseline_max': curves.steps_to_target(steps, values, target),
          **steadiness(percentiles)}


def claims(bn: Mapping[str, float], baseline: Mapping[str, float]) -> list[dict]:
  """Each paper claim with `holds` and the numbers it was decided on."""
  def faster():
    a, b = bn['steps_to_baseline_max'], baseline['steps_to_baseline_max']
    return a is not None and b is not None and a < b, f'{a} vs {b} steps'

  def higher():
    a, b = bn['final_test_accuracy'], baseline['final_test_accuracy']
    return a > b, f'{a:.4f} vs {b:.4f}'

  def steadier(what):
    drift = abs(bn[f'{what}_drift']) < abs(baseline[f'{what}_drift'])
    jitter = bn[f'{what}_jitter'] < baseline[f'{what}_jitter']
    return drift and jitter, (
        f'|drift| {abs(bn[f"{what}_drift"]):.3f} vs {abs(baseline[f"{what}_drift"]):.3f}, '
        f'jitter {bn[f"{what}_jitter"]:.3f} vs {baseline[f"{what}_jitter"]:.3f}')

  out = []
  for claim, decide in (
      ("BN trains faster (reaches the baseline's max test accuracy in fewer steps)", faster),
      ('BN ends with the higher test accuracy', higher),
      ("BN's sigmoid input is steadier in its mean (median: drift and jitter)",
       lambda: steadier('median')),
      ("BN's sigmoid input is steadier in its spread (p15..p85: drift and jitter)",
       lambda: steadier('spread'))):
    holds, numbers = decide()
    out.append({'claim': claim, 'holds': bool(holds), 'numbers': f'BN vs baseline: {numbers}'})
  return out
