"""Checkpoints of the whole train state with orbax, so a killed run resumes exactly."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores train-state pytrees under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    # Async: training goes on while the files are written; `wait` before exiting.
    self._manager.save(int(step), args=ocp.args.StandardSave(state))

  def restore(self, like: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, shapes, dtypes and shardings of `like`."""
    step = self._manager.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_latest(workdir: str) -> Optional[Any]:
  """The latest checkpoint of a run as a plain pytree of NumPy arrays (for analysis)."""
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  step = manager.latest_step()
  if step is None:
    return None
  tree = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return jax.tree_util.tree_map(jax.device_get, tree)
