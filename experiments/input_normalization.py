r"""Why normalised inputs make gradient descent faster: an elongated vs a round bowl.

    python -m experiments.input_normalization --workdir=runs/input_normalization

Part 1: plain gradient descent, one learning rate, one start, on
f(x, y) = x^2/20 + y^2 (elongated: curvatures 1/10 and 2) and f(x, y) = x^2 + y^2
(round: curvature 2 in both directions). Along a direction of curvature a, one step
multiplies the coordinate by (1 - lr a), so after n steps it is (1 - lr a)^n times its
start: the flat direction of the elongated bowl sets the pace. Reported: the steps until
|x| < tol and |y| < tol.

Part 2: the same effect in a network: a small tanh MLP (plain JAX + optax, full-batch
gradient descent) regressing a smooth function of synthetic features whose scales and
offsets differ by orders of magnitude, fed raw or standardised (per-feature mean 0,
variance 1 on the training set). Both from the same initial weights, over a grid of
learning rates (one vmapped program per input kind); reported: the steps until the
mean squared error falls (and stays) below `target` times the label's variance, per rate and at
each input kind's best rate.

Writes DIR/input_normalization.png (both bowls with their trajectories over the
contours; the MLP's loss curves) and DIR/input_normalization.json. Runs in seconds.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
import optax

MLP_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined when run as a program, so that tests can import several experiments."""
  flags.DEFINE_string('workdir', None, 'Output directory (figure and JSON).')
  flags.DEFINE_float('lr', 0.9, 'Gradient descent learning rate for both bowls.')
  flags.DEFINE_list('start', ['-8', '4'], 'Start point x,y for both bowls.')
  flags.DEFINE_float('tol', 0.01, 'Converged when |x| and |y| are below this.')
  flags.DEFINE_integer('max_steps', 1000, 'Gradient descent steps on the bowls.')
  flags.DEFINE_integer('steps', 5000, 'Full-batch gradient descent steps of the MLP.')
  flags.DEFINE_list('mlp_lrs', [f'{lr:g}' for lr in MLP_LRS],
                    'Learning rates of the MLP, each run for both input kinds.')
  flags.DEFINE_float('target', 0.05, 'MLP target: MSE below target x Var(label).')
  flags.DEFINE_integer('seed', 0, 'Seed of the MLP data and initial weights.')


# The two bowls: f(x, y) = 0.5 * (a_x x^2 + a_y y^2), curvatures (a_x, a_y).
BOWLS = {'elongated': (0.1, 2.0),   # x^2/20 + y^2
         'round': (2.0, 2.0)}       # x^2 + y^2
# Synthetic MLP features: z ~ N(0, 1), fed as scale * z + offset.
FEATURE_SCALES = (0.3, 1.0, 3.0, 10.0)
FEATURE_OFFSETS = (0.0, 0.0, 0.0, 5.0)
NUM_EXAMPLES = 512
HIDDEN = 32


def bowl(curvatures: Sequence[float]) -> Callable[[jax.Array], jax.Array]:
  a = jnp.asarray(curvatures, jnp.float32)
  return lambda w: 0.5 * jnp.sum(a * w * w)


def gradient_descent(f: Callable[[jax.Array], jax.Array], start: Sequence[float],
                     lr: float, num_steps: int) -> np.ndarray:
  """Plain gradient descent w <- w - lr grad f(w); returns the (num_steps + 1, dim) path."""
  grad = jax.grad(f)

  def step(w, _):
    w = w - lr * grad(w)
    return w, w

  w0 = jnp.asarray(start, jnp.float32)
  _, path = jax.lax.scan(step, w0, None, length=num_steps)
  return np.concatenate([np.asarray(w0)[None], np.asarray(path)])


def steps_to_reach(path: np.ndarray, tol: float) -> Optional[int]:
  """First step at which every coordinate is below tol in magnitude (None: never)."""
  inside = np.all(np.abs(path) < tol, axis=-1)
  return int(np.argmax(inside)) if inside.any() else None


# ---- part 2: an MLP on raw vs standardised features ------------------------------------

def make_features(seed: int, n: int = NUM_EXAMPLES) -> tuple[np.ndarray, np.ndarray]:
  """(raw features (n, 4), labels (n,)): the label is a smooth function of the
  standardised features z; the raw features are z stretched and shifted per column."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, len(FEATURE_SCALES)))
  y = z @ np.array([1.0, -1.0, 0.5, 1.0]) + 0.5 * np.sin(2 * z[:, 0]) + 0.3 * z[:, 1] * z[:, 3]
  x = z * np.asarray(FEATURE_SCALES) + np.asarray(FEATURE_OFFSETS)
  return x.astype(np.float32), y.astype(np.float32)


def standardise(x: np.ndarray) -> np.ndarray:
  return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


def init_mlp(key: jax.Array, num_inputs: int) -> dict:
  k1, k2 = jax.random.split(key)
  return {'w1': jax.random.normal(k1, (num_inputs, HIDDEN)) / np.sqrt(num_inputs),
          'b1': jnp.zeros((HIDDEN,)),
          'w2': jax.random.normal(k2, (HIDDEN,)) / np.sqrt(HIDDEN),
          'b2': jnp.zeros(())}


def mse(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] + params['b2'] - y) ** 2)


def train_mlp(x: np.ndarray, y: np.ndarray, lrs: Sequence[float], steps: int,
              seed: int) -> np.ndarray:
  """Full-batch gradient descent from one initialisation at each rate (vmapped);
  returns the (len(lrs), steps + 1) loss curves (inf once a run is non-finite)."""
  params0 = init_mlp(jax.random.key(seed), x.shape[1])

  def one(lr):
    tx = optax.sgd(lr)

    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(mse)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params0, tx.init(params0)), None,
                                       length=steps)
    return jnp.concatenate([losses, mse(params, x, y)[None]])

  curves = np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(lrs, jnp.float32)), np.float64)
  # A diverged run stays diverged: nothing after its first non-finite loss counts.
  bad = np.cumsum(~np.isfinite(curves), axis=1) > 0
  return np.where(bad, np.inf, curves)


def steps_to_stay_below(curve: np.ndarray, level: float) -> Optional[int]:
  """First step from which the loss stays below level to the end (None: it never
  does): a curve that oscillates across the level has not reached it."""
  above = np.flatnonzero(~(curve < level))
  if not above.size:
    return 0
  return int(above[-1]) + 1 if above[-1] + 1 < len(curve) else None


# ---- the experiment ----------------------------------------------------------------------

def run(workdir: str, *, lr: float = 0.9, start: Sequence[float] = (-8.0, 4.0),
        tol: float = 0.01, max_steps: int = 1000, steps: int = 5000,
        mlp_lrs: Sequence[float] = MLP_LRS, target: float = 0.05,
        seed: int = 0) -> dict:
  """Runs both parts; writes the figure and JSON into workdir; returns the summary."""
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  summary: dict = {'quadratic': {'lr': lr, 'start': list(start), 'tol': tol,
                                 'max_steps': max_steps}}
  paths = {}
  for name, curvatures in BOWLS.items():
    paths[name] = gradient_descent(bowl(curvatures), start, lr, max_steps)
    summary['quadratic'][name] = {
        'curvatures': list(curvatures),
        'contraction_per_step': [abs(1 - lr * a) for a in curvatures],
        'steps_to_tol': steps_to_reach(paths[name], tol),
        'diverged': bool(not np.all(np.isfinite(paths[name]))
                         or np.abs(paths[name][-1]).max() > np.abs(start).max()),
    }
  e, r = (summary['quadratic'][k]['steps_to_tol'] for k in BOWLS)
  summary['quadratic']['ratio_elongated_to_round'] = e / r if e and r else None

  x_raw, y = make_features(seed)
  level = target * float(np.var(y))
  mlp = {'feature_scales': list(FEATURE_SCALES), 'feature_offsets': list(FEATURE_OFFSETS),
         'num_examples': NUM_EXAMPLES, 'hidden': HIDDEN, 'steps': steps,
         'lrs': list(mlp_lrs), 'target_relative_mse': target, 'target_mse': level}
  curves = {}
  for kind, x in (('unnormalised', x_raw), ('normalised', standardise(x_raw))):
    curves[kind] = train_mlp(x, y, mlp_lrs, steps, seed)
    hits = [steps_to_stay_below(c, level) for c in curves[kind]]
    finals = [float(c[-1]) if np.isfinite(c[-1]) else None for c in curves[kind]]
    # Best rate: the fastest to the target, else the lowest final loss.
    order = sorted(range(len(mlp_lrs)), key=lambda i: (
        hits[i] is None, hits[i] or 0, finals[i] if finals[i] is not None else math.inf))
    # Every rate diverged: there is no best rate to name.
    best = None if all(f is None for f in finals) else order[0]
    mlp[kind] = {'steps_to_target': hits, 'final_mse': finals,
                 'diverged': [f is None for f in finals],
                 'best_lr': None if best is None else mlp_lrs[best],
                 'best_steps_to_target': None if best is None else hits[best],
                 'best_final_mse': None if best is None else finals[best]}
  summary['mlp'] = mlp
  summary['wall_seconds'] = round(time.time() - t0, 2)
  with open(os.path.join(workdir, 'input_normalization.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  plot(summary, paths, curves, float(np.var(y)),
       os.path.join(workdir, 'input_normalization.png'))
  return summary


def plot(summary: dict, paths: dict, curves: dict, label_var: float, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  q = summary['quadratic']
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  span = 1.25 * max(abs(v) for v in q['start'])
  gx, gy = np.meshgrid(np.linspace(-span, span, 300), np.linspace(-span / 2, span / 2, 200))
  for ax, name in zip(axes[:2], BOWLS):
    ax_, ay_ = BOWLS[name]
    ax.contour(gx, gy, 0.5 * (ax_ * gx ** 2 + ay_ * gy ** 2), levels=15, cmap='Greys',
               linewidths=0.7)
    p = paths[name]
    n = q[name]['steps_to_tol']
    shown = p[:(n if n is not None else len(p) - 1) + 1]
    ax.plot(shown[:, 0], shown[:, 1], '.-', color='tab:red', ms=3, lw=0.8)
    ax.plot(*shown[0], 'o', color='k')
    ax.set_aspect('equal')
    ax.set_xlim(-span, span)
    ax.set_ylim(-span / 2, span / 2)
    formula = 'x²/20 + y²' if name == 'elongated' else 'x² + y²'
    ax.set_title(f'{formula}: {n if n is not None else "> " + str(q["max_steps"])} steps '
                 f'to |x|,|y| < {q["tol"]:g} (lr {q["lr"]:g})')
  ax = axes[2]
  m = summary['mlp']
  colors = {'unnormalised': 'tab:orange', 'normalised': 'tab:blue'}  # as no-BN / BN
  for kind, c in curves.items():
    best = None if m[kind]['best_lr'] is None else m['lrs'].index(m[kind]['best_lr'])
    for i, curve in enumerate(c):
      if i != best:
        ax.plot(curve / label_var, color=colors[kind], alpha=0.15, lw=0.8)
    if best is None:  # every rate diverged: no curve to single out
      continue
    hit = m[kind]['best_steps_to_target']
    ax.plot(c[best] / label_var, color=colors[kind], lw=2,
            label=f'{kind} inputs, best lr {m[kind]["best_lr"]:g}: '
                  f'{hit if hit is not None else "> " + str(m["steps"])} steps')
  ax.axhline(m['target_relative_mse'], color='k', ls=':', lw=1)
  ax.set_yscale('log')
  ax.set_ylim(1e-3, 1e2)
  ax.set_xlabel('gradient descent step (full batch)')
  ax.set_ylabel('MSE / Var(label)')
  ax.set_title('tanh MLP: raw vs standardised features (faint: other lrs)')
  ax.legend(loc='upper right', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_flags() -> dict:
  """The run's arguments from the flags; ValueError naming the bad flag."""
  cli.check_workdir(FLAGS.workdir)

  def floats(name, values, count=None, positive=False):
    try:
      out = [float(v) for v in values]
    except ValueError:
      raise ValueError(f'--{name}={",".join(values)!r}: expected numbers.') from None
    if not out or (count and len(out) != count) or not all(map(math.isfinite, out)) or (
        positive and min(out) <= 0):
      what = f'{count} finite numbers' if count else 'finite numbers'
      raise ValueError(f'--{name}={",".join(values)!r}: expected {what}'
                       f'{" > 0" if positive else ""}.')
    return out

  for name, value in (('lr', FLAGS.lr), ('tol', FLAGS.tol), ('target', FLAGS.target)):
    if not (value > 0 and math.isfinite(value)):
      raise ValueError(f'--{name}={value!r} is invalid: must be a finite number > 0.')
  for name, value in (('max_steps', FLAGS.max_steps), ('steps', FLAGS.steps)):
    if value < 1:
      raise ValueError(f'--{name}={value!r} must be >= 1.')
  return dict(lr=FLAGS.lr, start=floats('start', FLAGS.start, 2), tol=FLAGS.tol,
              max_steps=FLAGS.max_steps, steps=FLAGS.steps,
              mlp_lrs=floats('mlp_lrs', FLAGS.mlp_lrs, positive=True),
              target=FLAGS.target, seed=FLAGS.seed)


def main(argv: Sequence[str]) -> None:
  kwargs = cli.parse_or_exit('input_normalization', argv, parse_flags)
  with cli.one_line_errors('input_normalization'):
    summary = run(FLAGS.workdir, **kwargs)
  q, m = summary['quadratic'], summary['mlp']
  print(f'lr {q["lr"]:g}, start {q["start"]}: steps to |x|,|y| < {q["tol"]:g}: '
        f'elongated {q["elongated"]["steps_to_tol"]}, round {q["round"]["steps_to_tol"]}')
  for kind in ('unnormalised', 'normalised'):
    if m[kind]['best_lr'] is None:
      print(f'MLP, {kind} inputs: every learning rate diverged; no best rate.')
      continue
    print(f'MLP, {kind} inputs: best lr {m[kind]["best_lr"]:g}, steps to MSE < '
          f'{m["target_relative_mse"]:g} Var(y): {m[kind]["best_steps_to_target"]}, '
          f'final {m[kind]["best_final_mse"]}')
  print(f'wrote {FLAGS.workdir}/input_normalization.png and input_normalization.json in '
        f'{summary["wall_seconds"]} s')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
