"""The input-normalisation experiment: gradient descent on bowls against its closed form."""

import math
import os

import numpy as np
import pytest

from experiments import input_normalization as exp
from tests import helpers


def closed_form_steps(curvatures, start, lr, tol):
  """Along curvature a a coordinate is (1 - lr a)^n times its start: the smallest n
  with |1 - lr a|^n |w0| < tol, for every coordinate."""
  steps = 0
  for a, w0 in zip(curvatures, start):
    c = abs(1 - lr * a)
    if abs(w0) >= tol:
      steps = max(steps, math.floor(math.log(tol / abs(w0)) / math.log(c)) + 1)
  return steps


@pytest.mark.parametrize('lr', [0.9, 0.3, 0.05])
def test_steps_on_both_bowls_match_the_contraction_closed_form(lr):
  start = (-8.0, 4.0)
  for name, curvatures in exp.BOWLS.items():
    path = exp.gradient_descent(exp.bowl(curvatures), start, lr, 2000)
    want = closed_form_steps(curvatures, start, lr, 0.01)
    assert exp.steps_to_reach(path, 0.01) == want, (name, lr)
    np.testing.assert_allclose(path[want], [(1 - lr * a) ** want * w for a, w in
                                            zip(curvatures, start)], rtol=1e-3, atol=1e-6)
  # The flat direction (curvature 1/10) sets the pace of the elongated bowl.
  assert closed_form_steps(exp.BOWLS['elongated'], start, lr, 0.01) > closed_form_steps(
      exp.BOWLS['round'], start, lr, 0.01)


def test_a_loss_that_oscillates_across_the_target_has_not_reached_it():
  assert exp.steps_to_stay_below(np.array([3.0, 0.5, 2.0, 0.4, 0.3]), 1.0) == 3
  assert exp.steps_to_stay_below(np.array([3.0, 0.5, 2.0]), 1.0) is None
  assert exp.steps_to_stay_below(np.array([0.5, 0.4]), 1.0) == 0


def _job(tmp_path, *args):
  proc = helpers.run_module('experiments.input_normalization', [f'--workdir={tmp_path}', *args])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return helpers.read_json(tmp_path / 'input_normalization.json')


def test_experiment_writes_figure_and_summary(tmp_path):
  summary = _job(tmp_path, '--lr=0.9', '--max_steps=200', '--steps=60',
                 '--mlp_lrs=0.01,0.1,30')
  steps = closed_form_steps(exp.BOWLS['elongated'], (-8.0, 4.0), 0.9, 0.01)
  assert summary['quadratic']['elongated']['steps_to_tol'] == steps
  # The figure's trajectory: the path up to the step it reached the tolerance.
  path = summary['series']['paths']['elongated']
  assert len(path) == steps + 1 and path[0] == [-8.0, 4.0]
  assert os.path.getsize(tmp_path / 'input_normalization.png') > 10_000
  assert '| elongated | 0.1, 2 |' in (tmp_path / 'input_normalization.md').read_text()
  mlp = summary['mlp']
  # lr 30 diverges on raw features (inputs up to ~40): a result, not a crash.
  assert mlp['unnormalised']['diverged'][2] and mlp['unnormalised']['final_mse'][2] is None
  assert mlp['normalised']['best_final_mse'] < mlp['unnormalised']['best_final_mse']
  curves = summary['series']['curves']
  assert summary['series']['curve_steps'] == list(range(61))
  assert curves['normalised'][1][-1] == pytest.approx(mlp['normalised']['final_mse'][1])
  assert curves['unnormalised'][2][-1] is None


@pytest.mark.parametrize('flag, fragment', [
    ('--mlp_lrs=0.1,-1', '--mlp_lrs=-1.0 is invalid: must be a finite number > 0'),
    ('--lr=inf', '--lr=inf'), ('--lr=nan', '--lr=nan'), ('--tol=inf', '--tol=inf'),
    ('--target=-1', '--target=-1'), ('--start=1', '--start'), ('--start=1,inf', '--start'),
    ('--set=seed=1', 'no config to override'),
])
def test_a_bad_flag_is_refused_in_one_line_before_anything(tmp_path, flag, fragment):
  workdir = tmp_path / 'job'
  proc = helpers.run_module('experiments.input_normalization', [f'--workdir={workdir}', flag])
  assert proc.returncode == 2, proc.stderr[-2000:]
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith('input_normalization: error: ') and fragment in line, line
  assert not workdir.exists()


def test_when_every_rate_diverges_no_best_rate_is_named(tmp_path):
  # Rates far past 2 / curvature diverge on raw and on standardised features alike.
  summary = _job(tmp_path, '--max_steps=20', '--steps=30', '--mlp_lrs=1e4,1e6')
  for kind in ('unnormalised', 'normalised'):
    assert summary['mlp'][kind]['diverged'] == [True, True]
    assert summary['mlp'][kind]['best_lr'] is None
    assert summary['mlp'][kind]['best_steps_to_target'] is None
  assert os.path.getsize(tmp_path / 'input_normalization.png') > 10_000
  assert 'every rate diverged' in (tmp_path / 'input_normalization.md').read_text()
