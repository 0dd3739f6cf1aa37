r"""K members as one program vs K separate programs, through the engine's own layouts.

    python -m scripts.bench_sweep [--mlp_k=8] [--inception_k=4] [--steps=2000]
        [--inception_steps=20] [--devices=8] [--skip_devices]

For each model (the Figure 1 MLP on synthetic 28x28 data, 500 steps per dispatch; the
small BN-Inception of `configs/inception_small.py` on synthetic data, one step per
dispatch), K learning rates log-spaced in [0.01, 1]:

* sequential: K plain programs (`engine.programs.JitProgram(vmapped=False)`), one per
  learning rate, each compiled and trained in turn, as K separate runs would be;
* one program: the K members vmapped (`JitProgram(vmapped=True)`), one compile.

Compile (the first dispatch, less one chunk's run time) and training (member-steps/s
over the later dispatches) are reported apart, and their ratio. Evaluation,
checkpoints and files are left out: both sides share that code.

Then, in a fresh process with `--devices` forced CPU devices, the MLP's K members are
spread over a members x data mesh and trained: the mesh and the rate are printed (on one
CPU the forced devices share the cores, so the rate shows that the spread program runs,
not a speed-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

from bn_research import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MLP_K = flags.DEFINE_integer('mlp_k', 8, 'Members (learning rates) of the MLP.')
_INCEPTION_K = flags.DEFINE_integer('inception_k', 4, 'Members of the small Inception.')
_STEPS = flags.DEFINE_integer('steps', 2000, 'Training steps per MLP member.')
_INCEPTION_STEPS = flags.DEFINE_integer('inception_steps', 20,
                                        'Training steps per Inception member.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Forced CPU devices for the spread run.')
_SKIP_DEVICES = flags.DEFINE_bool('skip_devices', False, 'Skip the spread run.')
_SPREAD = flags.DEFINE_bool('spread_child', False, 'Internal: run the spread part here.')


def learning_rates(k: int) -> list[float]:
  import numpy as np
  return [float(f'{x:.3g}') for x in np.geomspace(0.01, 1.0, k)]


def mlp_config(steps: int):
  sys.path.insert(0, REPO)
  from configs import mnist_mlp
  c = mnist_mlp.get_config(f'bn,source=synthetic,steps={steps}')
  c.probe.enabled = False
  return c


def inception_config(steps: int):
  sys.path.insert(0, REPO)
  from configs import inception_small
  return inception_small.get_config(f'model=bn_x5,data=synthetic,steps={steps}')


def _time_program(program, steps: int, per_dispatch: int) -> tuple[float, float]:
  """(compile seconds, member-steps per second) of a program trained for `steps`."""
  import jax
  state = program.init()
  t = time.perf_counter()
  state, outputs = program.dispatch(state, program.prepare(0, per_dispatch))
  program.wait(outputs)
  first = time.perf_counter() - t
  chunks = max(1, steps // per_dispatch - 1)
  t = time.perf_counter()
  for i in range(chunks):
    state, outputs = program.dispatch(state, program.prepare((i + 1) * per_dispatch,
                                                             per_dispatch))
  jax.block_until_ready(state.params)
  seconds = time.perf_counter() - t
  per_chunk = seconds / chunks
  return max(first - per_chunk, 0.0), program.num_members * chunks * per_dispatch / seconds


def compare(config, k: int, steps: int) -> dict:
  """Sequential K plain programs vs one K-member program, on one device."""
  import jax
  from bn_research import inputs
  from bn_research import train
  from bn_research.engine import programs, state as state_lib
  lrs = learning_rates(k)
  data = inputs.load_run_data(config)
  devices = jax.devices()[:1]
  per = config.steps_per_dispatch
  seq_compile, seq_seconds = 0.0, 0.0
  for lr in lrs:
    c = train.member_config(config, {'optimizer.learning_rate': lr})
    program = programs.JitProgram(c, data, devices, hparams={}, num_members=1, vmapped=False)
    comp, rate = _time_program(program, steps, per)
    seq_compile += comp
    seq_seconds += steps / rate
  members = [train.member_config(config, {'optimizer.learning_rate': lr}) for lr in lrs]
  program = programs.JitProgram(
      config, data, devices, num_members=k, vmapped=True,
      hparams=state_lib.stack_hparams(members, ['optimizer.learning_rate']))
  one_compile, one_rate = _time_program(program, steps, per)
  seq_rate = k * steps / seq_seconds
  return dict(k=k, steps=steps, sequential_compile_s=seq_compile,
              one_program_compile_s=one_compile, sequential_member_steps_per_s=seq_rate,
              one_program_member_steps_per_s=one_rate, compile_ratio=seq_compile / one_compile,
              steps_ratio=one_rate / seq_rate)


def spread(k: int, steps: int) -> dict:
  """K MLP members on all (forced) devices: the mesh they get and the rate."""
  import jax
  from bn_research import inputs
  from bn_research import train
  from bn_research.engine import programs, state as state_lib
  config = mlp_config(steps)
  config.batch_size = 64  # splits over a data axis of up to 8 devices
  members = [train.member_config(config, {'optimizer.learning_rate': lr})
             for lr in learning_rates(k)]
  program = programs.JitProgram(
      config, inputs.load_run_data(config), jax.devices(), num_members=k, vmapped=True,
      hparams=state_lib.stack_hparams(members, ['optimizer.learning_rate']))
  compile_s, rate = _time_program(program, steps, config.steps_per_dispatch)
  return dict(devices=jax.device_count(), mesh=program.mesh, k=k, compile_s=compile_s,
              member_steps_per_s=rate)


def _row(name: str, r: dict) -> str:
  return (f'| {name} | {r["k"]} | {r["sequential_compile_s"]:.1f} s | '
          f'{r["one_program_compile_s"]:.1f} s | {r["compile_ratio"]:.1f}x | '
          f'{r["sequential_member_steps_per_s"]:,.0f} | {r["one_program_member_steps_per_s"]:,.0f} | '
          f'{r["steps_ratio"]:.2f}x |')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from bn_research import launch
  for flag in (_MLP_K, _INCEPTION_K, _STEPS, _INCEPTION_STEPS, _DEVICES):
    launch.exit_on_bad_flags('bench_sweep', lambda f=flag: launch.check_positive_flag(
        f.name, f.value, 'a positive integer', optional=False))
  if _SPREAD.value:
    print('SPREAD' + json.dumps(spread(_MLP_K.value, _STEPS.value)))
    return
  import jax
  print(f'device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), '
        f'{os.cpu_count()} CPU cores')
  mlp = compare(mlp_config(_STEPS.value), _MLP_K.value, _STEPS.value)
  inc = compare(inception_config(_INCEPTION_STEPS.value), _INCEPTION_K.value,
                _INCEPTION_STEPS.value)
  print('| model | K | compile, K programs | compile, one program | ratio | '
        'member-steps/s, K programs | member-steps/s, one program | ratio |')
  print('|---|---|---|---|---|---|---|---|')
  print(_row('MLP 784-100-100-100, BN', mlp))
  print(_row('BN-Inception small (width 1/8, 28x28)', inc))
  if not _SKIP_DEVICES.value:
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={_DEVICES.value}',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, '-m', 'scripts.bench_sweep', '--spread_child',
                           f'--mlp_k={_MLP_K.value}', f'--steps={_STEPS.value}'],
                          env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
      sys.exit(f'bench_sweep: the spread run failed:\n{proc.stderr[-2000:]}')
    out = json.loads(proc.stdout.split('SPREAD')[-1])
    print(f'\nspread: {out["k"]} MLP members on {out["devices"]} forced CPU devices, mesh '
          f'{out["mesh"]}: compile {out["compile_s"]:.1f} s, '
          f'{out["member_steps_per_s"]:,.0f} member-steps/s')


if __name__ == '__main__':
  launch.run_app(main)
