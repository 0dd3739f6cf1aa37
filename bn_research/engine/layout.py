"""What the loop drives (`Program`) and the pieces every layout shares: compiling
interruptibly, the outputs a chunk leaves on the devices, and host rows of evaluation
and probe results. The layouts themselves are `programs.JitProgram` and
`pmap_program.PmapProgram`.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

PMAP_AXIS = 'batch'


def mesh_shape(num_members: int, num_devices: int) -> dict[str, int]:
  """{'members': M, 'data': D}: members spread over as many devices as divide evenly.

  M = gcd(K, devices): 8 members on 8 devices -> 8 x 1 (one each); 16 on 8 -> 8 x 1
  (two each); 4 on 8 -> 4 x 2 (data parallelism inside each member); 3 on 8 -> 1 x 8.
  """
  members = math.gcd(num_members, num_devices)
  return {'members': members, 'data': num_devices // members}


class Program:
  """What the loop drives. Subclasses fill in the layout.

  Training never waits on the host: `prepare` produces a chunk's inputs and puts them
  on the devices (the loop calls it for chunk k+1 right after dispatching chunk k, so
  the host's work overlaps the device's), `dispatch` only enqueues, and what it
  returns stays on the devices until the loop asks `read` for it at a log, eval or
  checkpoint step. Long phases (evaluation, population statistics, compilation) call
  `check_stop` between their pieces, so a signal ends them within seconds.
  """

  num_members: int
  mesh: dict[str, int]
  layout: str
  check_stop: Callable[[], None] = staticmethod(lambda: None)

  def init(self) -> Any:
    """The members' step-0 state, placed."""
    raise NotImplementedError

  def place(self, members: Sequence[Any]) -> Any:
    """Per-member host TrainStates -> the program's placed state."""
    raise NotImplementedError

  def split(self, state: Any) -> list[Any]:
    """The program's state -> per-member host TrainStates (NumPy leaves)."""
    raise NotImplementedError

  def prepare(self, start: int, num_steps: int) -> Any:
    """The inputs of steps start..start+num_steps, on the devices as `dispatch` takes them."""
    raise NotImplementedError

  def dispatch(self, state: Any, chunk: Any) -> tuple[Any, Any]:
    """Enqueues a prepared chunk's steps: (state, outputs), both left on the devices."""
    raise NotImplementedError

  def read(self, outputs: Sequence[Any]) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Chunks' outputs -> per chunk (metrics (K, n) each, params finite (K,)), on the host.

    All chunks are fetched in one transfer.
    """
    return [with_member_axis(m, f) for m, f in jax.device_get(list(outputs))]

  def wait(self, outputs: Any) -> None:
    """Blocks until a chunk's outputs are computed (no transfer)."""
    jax.block_until_ready(outputs)

  def evaluate(self, state: Any) -> list[dict]:
    raise NotImplementedError

  def probe(self, state: Any) -> Optional[list[dict]]:
    return None

  def measure(self, state: Any, step: int) -> Optional[list[dict]]:
    """Santurkar et al.'s measurements at `step` (config `measure.*`), or None."""
    return None


def with_member_axis(metrics: dict, finite: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Host metrics (K, n) and finiteness (K,): a single member's (n,) / () get the axis."""
  metrics = {k: np.asarray(v) for k, v in metrics.items()}
  finite = np.asarray(finite)
  if finite.ndim == 0:
    metrics = {k: v[None] for k, v in metrics.items()}
    finite = finite[None]
  return metrics, finite


def compile_interruptibly(compile_fn: Callable[[], Any], check_stop: Callable[[], None],
                          *, poll_seconds: float = 0.2) -> Any:
  """Runs `compile_fn` (an XLA compilation) in a thread, calling `check_stop` meanwhile.

  A compilation holds the main thread in C++ for up to minutes, where Python signal
  handlers cannot run; waiting on it here lets `check_stop` raise as soon as SIGTERM or
  SIGINT arrives. An abandoned compilation finishes in its daemon thread, unused.
  """
  result: list = []
  error: list = []

  def work():
    try:
      result.append(compile_fn())
    except BaseException as e:  # pylint: disable=broad-except
      error.append(e)

  thread = threading.Thread(target=work, name='bn_research-compile', daemon=True)
  thread.start()
  while thread.is_alive():
    thread.join(poll_seconds)
    check_stop()
  if error:
    raise error[0]
  return result[0]


class Compiled:
  """A jitted function compiled ahead of time per argument shape, interruptibly.

  Calls go straight to the compiled executable (no tracing, no cache lookup by JAX);
  a shape not seen before is compiled with `compile_interruptibly`.
  """

  def __init__(self, jitted: Callable, program: Program):
    self._jitted = jitted
    self._program = program
    self._executables: dict = {}

  def __call__(self, *args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
    executable = self._executables.get(key)
    if executable is None:
      executable = compile_interruptibly(lambda: self._jitted.lower(*args).compile(),
                                         lambda: self._program.check_stop())
      self._executables[key] = executable
    return executable(*args)




def outputs_pair(run_chunk: Callable) -> Callable:
  """run_chunk returning (state, (metrics, finite)): what the program keeps on the
  devices until the loop reads it is one value."""
  def fn(*args):
    state, metrics, finite = run_chunk(*args)
    return state, (metrics, finite)
  return fn


# The eval step's sums, in the order `eval_rows` reads them.
EVAL_SUMS = ('loss_sum', 'correct', 'correct_top5', 'count')


def eval_rows(totals: np.ndarray) -> list[dict]:
  """(4, K) sums of loss, top-1 and top-5 hits, count -> one row per member."""
  count = np.maximum(totals[3], 1.0)
  return [{'eval_loss': float(totals[0, k] / count[k]),
           'eval_accuracy': float(totals[1, k] / count[k]),
           'eval_top5_accuracy': float(totals[2, k] / count[k])}
          for k in range(totals.shape[1])]


def probe_rows(values: np.ndarray, percentiles: Sequence[float]) -> list[dict]:
  return [{f'act_p{q:g}': float(v) for q, v in zip(percentiles, row)} for row in values]
