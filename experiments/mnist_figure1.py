r"""Figure 1 of the paper: MNIST, BN vs baseline, test accuracy and activations over time.

    python -m experiments.mnist_figure1 --workdir=runs/figure1

Trains both networks of `configs/mnist_mlp.py` (50,000 steps of batch 60 each), side by
side on the machine's cores, each into its own run directory (`DIR/bn`, `DIR/baseline`,
in the engine's format), then writes

    DIR/figure1.png   (a) test accuracy vs step, (b) baseline and (c) BN: the 15th, 50th
                      and 85th percentiles of the input to one sigmoid of the last
                      hidden layer vs step, on one y-scale
    DIR/figure1.json  per network: test_accuracy [[step, acc]], final_test_accuracy,
                      percentiles [[step, p15, p50, p85]]; plus "data"

and prints a summary table. Re-running resumes or skips finished networks.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags

from bn_research import launch
from bn_research import rundir
from bn_research.analysis import figure1 as figure1_lib

_WORKDIR = flags.DEFINE_string('workdir', 'runs/figure1', 'Output directory.')
_STEPS = flags.DEFINE_integer('steps', None, 'Training steps per network (default: the '
                              "config's 50,000).")
_SOURCE = flags.DEFINE_string('source', None, "Data source: auto (default: MNIST via TFDS "
                              'if prepared, else the offline 5k sample), tfds, offline, '
                              'synthetic.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', None, 'Steps between evals and probes.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Passed on to both runs.')
_SET = flags.DEFINE_multi_string('set', [], 'Config override for both networks, '
                                  'e.g. --set=optimizer.learning_rate=0.5 (repeatable).')
_PIN_CORES = flags.DEFINE_bool('pin_cores', True, 'Pin each network\'s process to its own '
                                'share of the CPU cores (Linux), when there are enough.')
_SEQUENTIAL = flags.DEFINE_bool('sequential', False, 'Train the networks one after the '
                                'other instead of side by side.')

NETWORKS = ('bn', 'baseline')
PERCENTILE_KEYS = ('act_p15', 'act_p50', 'act_p85')
CONFIG = os.path.join(launch.REPO, 'configs', 'mnist_mlp.py')


def check_flags() -> None:
  """ValueError naming the first bad flag, before anything runs."""
  launch.check_positive_flag('steps', _STEPS.value, 'training steps per network')
  launch.check_positive_flag('eval_every', _EVAL_EVERY.value, 'steps between evaluations')


def run_command(network: str, workdir: str) -> list[str]:
  arg = network
  if _SOURCE.value:
    arg += f',source={_SOURCE.value}'
  cmd = [sys.executable, '-m', 'bn_research.main',
         f'--config={CONFIG}:{arg}', f'--workdir={workdir}']
  if _STEPS.value is not None:
    cmd += [f'--config.num_train_steps={_STEPS.value}']
    if _STEPS.value < 10_000:  # keep checkpoints inside short runs too
      cmd += [f'--config.checkpoint_every_steps={_STEPS.value}']
  if _EVAL_EVERY.value is not None:
    cmd += [f'--config.eval_every_steps={_EVAL_EVERY.value}',
            f'--config.log_every_steps={_EVAL_EVERY.value}',
            f'--config.steps_per_dispatch={_EVAL_EVERY.value}']
  cmd += [f'--config.{kv}' for kv in _SET.value]
  if _OVERWRITE.value:
    cmd += ['--overwrite']
  return cmd


def _load_matplotlib(result: launch.JobResult, still_running: int) -> None:
  """When one network has finished and the other still trains, a core is free: load
  the plotting library now instead of after (about 0.7 s of the job's wall time)."""
  if still_running and result.returncode == 0:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot  # pylint: disable=g-import-not-at-top,unused-import


def train_networks(root: str) -> None:
  """Runs both networks as separate processes, side by side, each on its own core(s).

  The MLP's matmuls are tiny: one XLA thread per process beats sharing threads.
  """
  jobs = [launch.Job(net, run_command(net, os.path.join(root, net)),
                     log=os.path.join(root, f'{net}.log')) for net in NETWORKS]
  results = launch.run_jobs(
      jobs, parallel=1 if _SEQUENTIAL.value else len(jobs),
      pin_cores=_PIN_CORES.value and not _SEQUENTIAL.value, single_thread=True,
      on_finish=_load_matplotlib)
  failed = [r.name for r in results if r.returncode != 0]
  for net in failed:
    with open(os.path.join(root, f'{net}.log'), errors='replace') as f:
      tail = f.read()[-3000:]
    print(f'--- {net} failed; end of {root}/{net}.log:\n{tail}', file=sys.stderr)
  if failed:
    raise SystemExit(f'training failed for: {", ".join(failed)}')


def summarize(root: str) -> dict:
  """Collects figure1.json from the two run directories, with the claims measured."""
  out = {}
  for net in NETWORKS:
    run_dir = os.path.join(root, net)
    rows = rundir.read_metrics(run_dir)
    acc = [[r['step'], r['eval_accuracy']] for r in rows if 'eval_accuracy' in r]
    pct = [[r['step']] + [r[k] for k in PERCENTILE_KEYS]
           for r in rows if all(k in r for k in PERCENTILE_KEYS)]
    status = rundir.read_status(run_dir) or {}
    out[net] = {'test_accuracy': acc, 'percentiles': pct,
                'status': status.get('status', 'unknown')}
  target = max(a for _, a in out['baseline']['test_accuracy'])
  for net in NETWORKS:
    out[net].update(figure1_lib.network_numbers(out[net]['test_accuracy'],
                                                out[net]['percentiles'], target))
  out['claims'] = figure1_lib.claims(out['bn'], out['baseline'])
  data = rundir.read_description(os.path.join(root, 'bn')) or {}
  out['data'] = {k: data.get(k) for k in ('dataset', 'display_name', 'source', 'num_train',
                                           'num_test', 'image_shape', 'is_mnist_sample',
                                           'warning', 'binarized')}
  cfg = rundir.read_config(os.path.join(root, 'bn')) or {}
  probe = cfg.get('probe', {})
  out['probe'] = {'layer': 'last hidden', 'unit': probe.get('unit'),
                  'num_examples': probe.get('num_examples'), 'mode': probe.get('mode'),
                  'percentiles': probe.get('percentiles')}
  out['eval'] = cfg.get('eval', {})
  return out


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colors = {'bn': 'tab:blue', 'baseline': 'tab:orange'}
  labels = {'bn': 'With BN', 'baseline': 'Without BN'}
  for net in NETWORKS:
    acc = np.asarray(summary[net]['test_accuracy'])
    if len(acc):
      axes[0].plot(acc[:, 0], acc[:, 1], color=colors[net], label=labels[net])
  axes[0].set_title('(a) test accuracy')
  axes[0].set_xlabel('training step')
  axes[0].set_ylim(0.0, 1.0)
  axes[0].grid(alpha=0.3)
  axes[0].legend(loc='lower right')
  pct = {net: np.asarray(summary[net]['percentiles']) for net in NETWORKS}
  lo = min(p[:, 1:].min() for p in pct.values() if len(p))
  hi = max(p[:, 1:].max() for p in pct.values() if len(p))
  pad = 0.05 * (hi - lo + 1e-6)
  for ax, net, title in ((axes[1], 'baseline', '(b) without BN'), (axes[2], 'bn', '(c) with BN')):
    p = pct[net]
    if len(p):
      ax.fill_between(p[:, 0], p[:, 1], p[:, 3], color=colors[net], alpha=0.2)
      for j, style in ((1, '--'), (2, '-'), (3, '--')):
        ax.plot(p[:, 0], p[:, j], style, color=colors[net])
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(f'{title}: sigmoid input, 15/50/85th pct')
    ax.set_xlabel('training step')
    ax.grid(alpha=0.3)
  data = summary['data']
  name = data.get('display_name') or data.get('dataset') or '?'
  title = f'Figure 1 reproduction on {name} (train / test)'
  if data.get('is_mnist_sample'):
    title += ' - the 5,000-image MNIST sample, NOT full MNIST'
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def print_table(summary: dict) -> None:
  data = summary['data']
  print(f'\nFigure 1 on {data.get("display_name") or data.get("dataset")}'
        + ('  [the MNIST sample, NOT full MNIST]' if data.get('is_mnist_sample') else ''))
  print('| network | final test acc | max test acc | steps to baseline max | median drift / '
        'jitter | p15..p85 spread drift / jitter |')
  print('|---|---|---|---|---|---|')
  for net in NETWORKS:
    s = summary[net]
    print(f'| {net} | {s["final_test_accuracy"]:.4f} | {s["max_test_accuracy"]:.4f} | '
          f'{s["steps_to_baseline_max"]} | {s["median_drift"]:+.3f} / {s["median_jitter"]:.3f} | '
          f'{s["spread_drift"]:+.3f} / {s["spread_jitter"]:.3f} |')
  print(f'(drift and jitter from step {summary["bn"]["from_step"]}, the end of the first '
        'tenth of training)\n')
  for c in summary['claims']:
    print(f'{"holds" if c["holds"] else "does not hold"}: {c["claim"]}; {c["numbers"]}')


def main(argv):
  del argv
  launch.exit_on_bad_flags('mnist_figure1', check_flags)
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  t0 = time.time()
  train_networks(root)
  summary = summarize(root)
  summary['wall_seconds'] = round(time.time() - t0, 2)
  with open(os.path.join(root, 'figure1.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  plot(summary, os.path.join(root, 'figure1.png'))
  print_table(summary)
  print(f'\nwrote {root}/figure1.png and {root}/figure1.json in {summary["wall_seconds"]} s')
  if summary['data'].get('warning'):
    print(f'WARNING: {summary["data"]["warning"]}')


if __name__ == '__main__':
  app.run(main)
