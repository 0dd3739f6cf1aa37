"""The Section 4.2 ablation at any batch size: what scales with B, what stays the paper's.

At batch B the configs keep BN's statistics over ghost batches of 32, multiply the
batch-32 rate by B/32, optionally warm it up (Goyal et al. 2017), and fix steps,
cadences and the decay period in images. The warmup schedule is checked against its
closed form in float64, in the optimizer and in a training run's logged rates.
"""

import math

import numpy as np
import pytest

from tests import helpers

MODELS = ('inception', 'bn_baseline', 'bn_x5', 'bn_x30', 'bn_x5_sigmoid',
          'inception_x5', 'inception_sigmoid')
# Keys that count steps: at 8x the batch, 1/8 of the steps see the same images.
STEP_KEYS = ('num_train_steps', 'eval_every_steps', 'log_every_steps',
             'checkpoint_every_steps', 'optimizer.decay_steps')


def _config(module, arg):
  if module == 'imagenet':
    from configs import imagenet_inception as m
  else:
    from configs import inception_small as m
  return m.get_config(arg)


@pytest.mark.parametrize('module', ['imagenet', 'small'])
@pytest.mark.parametrize('model', MODELS)
def test_batch_256_is_the_batch_32_recipe_scaled(module, model):
  base = helpers.flat(_config(module, f'model={model}'))
  big = helpers.flat(_config(module, f'model={model},batch=256'))
  assert base['batch_size'] == 32 and big['batch_size'] == 256
  assert base['model.virtual_batch_size'] == 0  # batch 32: one batch of 32
  assert big['model.virtual_batch_size'] == 32  # ghost batches of the paper's 32
  assert big['optimizer.learning_rate'] == pytest.approx(8 * base['optimizer.learning_rate'])
  for key in STEP_KEYS:
    assert big[key] == max(1, round(base[key] / 8)), key
  if module == 'small':  # Algorithm 2's estimate stays over 640 images
    assert base['eval.population_batches'] * 32 == 640
    assert big['eval.population_batches'] == round(640 / 256)
  # Nothing else changes: the rest is the paper's recipe.
  changed = {k for k in base if base[k] != big[k]}
  expected = {'batch_size', 'model.virtual_batch_size', 'optimizer.learning_rate',
              'eval.population_batches', *STEP_KEYS}
  assert changed <= expected, changed - expected
  assert big['optimizer.warmup_steps'] == 0


def test_lr_scaling_none_keeps_the_papers_rate():
  c = _config('imagenet', 'model=bn_x30,batch=256,lr_scaling=none')
  assert c.optimizer.learning_rate == pytest.approx(0.045)
  assert c.model.virtual_batch_size == 32


def test_warmup_in_epochs_starts_at_the_batch_32_rate():
  """bn_x30 at B=1024 with 5 epochs of warmup: Goyal et al.'s recipe on ImageNet."""
  c = _config('imagenet', 'model=bn_x30,batch=1024,warmup=5')
  assert c.optimizer.learning_rate == pytest.approx(0.045 * 32)  # 1.44
  assert c.optimizer.warmup_steps == round(5 * 1_281_167 / 1024)
  assert c.optimizer.warmup_from == pytest.approx(32 / 1024)
  from bn_research import optim
  schedule = optim.learning_rate_schedule(c.optimizer)
  assert float(schedule(0)) == pytest.approx(0.045, rel=1e-6)
  w, d = c.optimizer.warmup_steps, c.optimizer.decay_steps
  assert float(schedule(w)) == pytest.approx(1.44 * 0.96 ** (w / d), rel=1e-5)
  small = _config('small', 'model=bn_x5,batch=128,warmup=2')
  assert small.optimizer.warmup_steps == round(2 * 60_000 / 128)


def _closed_form(t, *, lr, rate, decay_steps, staircase, warmup, start):
  """float64: lr * rate ** (t / decay_steps) * (start + (1 - start) * min(t, W) / W)."""
  t = np.asarray(t, np.float64)
  exponent = np.floor(t / decay_steps) if staircase else t / decay_steps
  ramp = start + (1 - start) * np.minimum(t, warmup) / warmup if warmup else 1.0
  return lr * rate ** exponent * ramp


@pytest.mark.parametrize('staircase', [False, True])
@pytest.mark.parametrize('rate', [1.0, 0.5])
def test_warmup_schedule_matches_its_closed_form(staircase, rate):
  import ml_collections
  from bn_research import optim
  opt = ml_collections.ConfigDict({
      'learning_rate': 0.8, 'decay_rate': rate, 'decay_steps': 7, 'staircase': staircase,
      'warmup_steps': 12, 'warmup_from': 0.125})
  t = np.arange(40)
  got = np.asarray([float(optim.learning_rate_schedule(opt)(s)) for s in t])
  want = _closed_form(t, lr=0.8, rate=rate, decay_steps=7, staircase=staircase,
                      warmup=12, start=0.125)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(0.1)  # 0.125 * 0.8: the warmup's start
  opt.warmup_steps = 0  # no warmup: the plain decayed rate
  got = np.asarray([float(optim.learning_rate_schedule(opt)(s)) for s in t])
  np.testing.assert_allclose(got, _closed_form(t, lr=0.8, rate=rate, decay_steps=7,
                                               staircase=staircase, warmup=0, start=0),
                             rtol=1e-6)


def test_a_run_trains_with_the_warmed_up_rate(tmp_path):
  """The engine's logged rate (the last step of each log interval) is the closed form."""
  from bn_research import train
  c = helpers.tiny_mlp_config(**{'optimizer.warmup_steps': 25, 'optimizer.warmup_from': 0.2,
                                 'optimizer.decay_rate': 0.5, 'optimizer.decay_steps': 10})
  result = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert result['status'] == 'done'
  rows = [r for r in helpers.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
          if 'learning_rate' in r]
  assert [r['step'] for r in rows] == [10, 20, 30, 40]
  for r in rows:
    want = _closed_form(r['step'] - 1, lr=0.1, rate=0.5, decay_steps=10, staircase=False,
                        warmup=25, start=0.2)
    assert r['learning_rate'] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize('arg, words', [
    ('batch=100', ['batch=100', 'multiple of 32']),
    ('batch=16', ['batch=16', 'multiple of 32']),
    ('batch=0', ['batch=', '>= 1']),
    ('batch=64,warmup=-1', ['warmup=-1', '>= 0']),
    ('batch=32,warmup=2', ['warmup=2', 'no effect']),
    ('batch=64,lr_scaling=none,warmup=2', ['warmup=2', 'lr_scaling=none']),
])
@pytest.mark.parametrize('module', ['imagenet', 'small'])
def test_refusals_name_the_argument(module, arg, words):
  with pytest.raises(ValueError) as e:
    _config(module, f'model=bn_x30,{arg}')
  line = str(e.value)
  assert '\n' not in line and all(w in line for w in words), line


def test_a_per_device_batch_ghost_batches_cannot_tile_is_refused():
  """B = 64 on 4 devices is 16 per device: no ghost batch of 32 fits."""
  from bn_research import config as config_lib
  c = _config('small', 'model=bn_x5,batch=64,data=synthetic')
  config_lib.validate_config(c, num_devices=2)  # 32 per device: fine
  with pytest.raises(ValueError, match='virtual_batch_size=32 does not divide the per-device '
                     'batch of 16'):
    config_lib.validate_config(c, num_devices=4)


def test_bad_batch_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
  proc = helpers.run_main(['--config=configs/inception_small.py:model=bn_x5,batch=48',
                           f'--workdir={tmp_path / "run"}'])
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'batch=48' in lines[0] and 'multiple of 32' in lines[0]
  assert not (tmp_path / 'run').exists()


def test_ablation_batch_flag_reaches_the_config_and_is_checked(tmp_path):
  proc = helpers.run_module('experiments.inception_ablation',
                            [f'--workdir={tmp_path}', '--batch=100', '--data=synthetic'])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'batch=100' in proc.stderr and not any(tmp_path.iterdir())
  proc = helpers.run_module('experiments.inception_ablation',
                            [f'--workdir={tmp_path}', '--batch=64', '--data=synthetic',
                             '--models=bn_x5', '--print_commands'])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'model=bn_x5,data=synthetic,batch=64' in proc.stdout


def test_progress_in_images_and_paper_steps():
  from configs import common
  p = common.progress(1000, 256)
  assert p == {'images': 256_000, 'paper_steps': 8000.0}
  assert math.isclose(common.progress(3, 32)['paper_steps'], 3)
