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

Neither part trains an engine run, so the job's plan is empty and its summary is its
computation. Writes DIR/input_normalization.png (both bowls with their trajectories
over the contours; the MLP's loss curves), DIR/input_normalization.json (the numbers,
and under `series` the trajectories and the loss curves, at most 501 points each, that
the figure draws) and DIR/input_normalization.md. Runs in seconds.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_research import checks
from bn_research import experiment

MLP_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
# The MLP's loss curves are kept for the figure at this many points at most.
CURVE_POINTS = 501

NAME = 'input_normalization'
WORKDIR = 'runs/input_normalization'
HOW, PARALLEL = 'inline', 1
_POSITIVE = checks.Float(0.0, low_open=True)
FLAGS = {
    'lr': experiment.Flag(float, 0.9, 'Gradient descent learning rate for both bowls.',
                          _POSITIVE),
    'start': experiment.Flag('floats', (-8.0, 4.0), 'Start point x,y for both bowls.'),
    'tol': experiment.Flag(float, 0.01, 'Converged when |x| and |y| are below this.',
                           _POSITIVE),
    'max_steps': experiment.Flag(int, 1000, 'Gradient descent steps on the bowls.',
                                 checks.Int(1)),
    'steps': experiment.Flag(int, 5000, 'Full-batch gradient descent steps of the MLP.',
                             checks.Int(1)),
    'mlp_lrs': experiment.Flag('floats', MLP_LRS, 'Learning rates of the MLP, each run for '
                               'both input kinds.', _POSITIVE),
    'target': experiment.Flag(float, 0.05, 'MLP target: MSE below target x Var(label).',
                              _POSITIVE),
    'seed': experiment.Flag(int, 0, 'Seed of the MLP data and initial weights.',
                            checks.Int(0, checks.SEED_LIMIT - 1)),
}


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

def plan(args) -> list:
  """No engine runs: both parts are computed by `summarize`. Checks what the flag
  declarations cannot: two finite start coordinates, and no --set (no config)."""
  if len(args.start) != 2 or not all(map(math.isfinite, args.start)):
    raise ValueError(f'--start={",".join(map(str, args.start))!r} is invalid: must be 2 '
                     'finite numbers x,y.')
  if args.overrides:
    raise ValueError(f'--set={next(iter(args.overrides))}=...: this job trains no engine '
                     'run, so there is no config to override; its flags are listed by '
                     '--help.')
  return []


def _finite_or_none(values) -> list:
  return [float(v) if np.isfinite(v) else None for v in values]


def summarize(records, args) -> dict:
  """Runs both parts; the summary, with the series the figure draws under `series`."""
  del records  # no engine runs
  lr, start, tol, max_steps = args.lr, tuple(args.start), args.tol, args.max_steps
  steps, mlp_lrs, target, seed = args.steps, tuple(args.mlp_lrs), args.target, args.seed
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
  shown = {name: paths[name][:(summary['quadratic'][name]['steps_to_tol']
                               if summary['quadratic'][name]['steps_to_tol'] is not None
                               else max_steps) + 1] for name in BOWLS}
  at = np.unique(np.linspace(0, steps, min(steps + 1, CURVE_POINTS)).round().astype(int))
  summary['series'] = {
      'paths': {name: [_finite_or_none(p) for p in path] for name, path in shown.items()},
      'curve_steps': at.tolist(), 'label_variance': float(np.var(y)),
      'curves': {kind: [_finite_or_none(c[at]) for c in cs] for kind, cs in curves.items()}}
  return summary


def table(summary: dict) -> str:
  """Steps to the tolerance on both bowls; per input kind, the MLP's best rate."""
  q, m = summary['quadratic'], summary['mlp']
  lines = [f'Gradient descent, lr {q["lr"]:g} from {q["start"]}, steps to |x|,|y| < '
           f'{q["tol"]:g} (of at most {q["max_steps"]}):', '',
           experiment.markdown_table(['bowl', 'curvatures', 'steps to tolerance', 'diverged'],
                                     [[name, ', '.join(f'{a:g}' for a in q[name]['curvatures']),
                                       q[name]['steps_to_tol'], q[name]['diverged']]
                                      for name in BOWLS]),
           '', f'tanh MLP, {m["steps"]} full-batch steps; target MSE < '
           f'{m["target_relative_mse"]:g} Var(label):', '']
  rows = []
  for kind in ('unnormalised', 'normalised'):
    k = m[kind]
    rows.append([kind, 'every rate diverged' if k['best_lr'] is None else f'{k["best_lr"]:g}',
                 k['best_steps_to_target'], k['best_final_mse'], sum(k['diverged'])])
  lines.append(experiment.markdown_table(
      ['inputs', 'best lr', 'steps to target', 'final MSE', 'rates diverged'], rows))
  return '\n'.join(lines)


def plot(summary: dict):
  """Both bowls with their trajectories over the contours; the MLP's loss curves."""
  q, series = summary['quadratic'], summary['series']
  fig, axes = experiment.figure(3, width=16 / 3, height=4.6)
  span = 1.25 * max(abs(v) for v in q['start'])
  gx, gy = np.meshgrid(np.linspace(-span, span, 300), np.linspace(-span / 2, span / 2, 200))
  for ax, name in zip(axes[:2], BOWLS):
    ax_, ay_ = BOWLS[name]
    ax.contour(gx, gy, 0.5 * (ax_ * gx ** 2 + ay_ * gy ** 2), levels=15, cmap='Greys',
               linewidths=0.7)
    n = q[name]['steps_to_tol']
    shown = np.array(series['paths'][name], dtype=float)
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
  label_var, at = series['label_variance'], series['curve_steps']
  for kind, curves in series['curves'].items():
    c = np.array(curves, dtype=float)  # None (diverged) as nan: not drawn
    best = None if m[kind]['best_lr'] is None else m['lrs'].index(m[kind]['best_lr'])
    for i, curve in enumerate(c):
      if i != best:
        ax.plot(at, curve / label_var, color=colors[kind], alpha=0.15, lw=0.8)
    if best is None:  # every rate diverged: no curve to single out
      continue
    hit = m[kind]['best_steps_to_target']
    ax.plot(at, c[best] / label_var, color=colors[kind], lw=2,
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
  return fig


if __name__ == '__main__':
  experiment.main(__name__)
