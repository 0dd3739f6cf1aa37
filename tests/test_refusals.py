"""Config values a run cannot honour are refused in one line before anything is written
(issue 21.7): counts of test examples beyond the test set actually loaded, and config
file arguments that a config file divides by."""

from __future__ import annotations

import pytest

from tests import helpers

TINY = ['--config=configs/mnist_mlp.py:bn,source=synthetic', '--config.num_train_steps=10',
        '--config.data.image_size=8', '--config.data.num_train=128',
        '--config.data.num_test=64']


def _assert_one_line_exit_2(proc, *needles) -> None:
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if 'error' in line]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert all(n in errors[0] for n in needles), errors[0]


@pytest.mark.parametrize('key', ['probe.num_examples', 'num_eval_examples'])
def test_more_test_examples_than_the_test_set_holds_is_refused(tmp_path, key):
  workdir = tmp_path / 'run'
  proc = helpers.run_main(TINY + [f'--workdir={workdir}', f'--config.{key}=65'])
  _assert_one_line_exit_2(proc, f'{key}=65', 'test set has 64 examples')
  assert not workdir.exists()


def test_the_whole_test_set_is_allowed(tmp_path):
  proc = helpers.run_main(TINY + [f'--workdir={tmp_path / "run"}',
                                  '--config.probe.num_examples=64',
                                  '--config.num_eval_examples=64'])
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize('arg', ['batch=0', 'batch=-32', 'steps=0'])
def test_a_zero_size_config_argument_is_one_line_not_a_division_error(tmp_path, arg):
  workdir = tmp_path / 'run'
  proc = helpers.run_main([f'--config=configs/imagenet_inception.py:{arg}',
                           f'--workdir={workdir}'])
  key, value = arg.split('=')
  _assert_one_line_exit_2(proc, f"{key}='{value}'", 'integer >= 1')
  assert 'ZeroDivisionError' not in proc.stderr and not workdir.exists()
