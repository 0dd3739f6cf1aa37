"""Placing processes on CPU cores (Linux), for jobs that run several processes at once.

Left to the scheduler, the threads of two side-by-side XLA processes (each keeps a few
besides the one computing) migrate between cores and often share one: the Figure 1
job took 35-39 s unpinned against 27-28 s with each network pinned to its own core on
this project's 2-core machine.
"""

from __future__ import annotations

import os
from typing import Optional


def available_cores() -> list[int]:
  """The cores this process may run on, sorted; [] where affinity is not supported."""
  return sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []


def core_shares(cores: list[int], n: int) -> Optional[list[set[int]]]:
  """Splits `cores` into n disjoint, equal, contiguous shares (None if fewer than n)."""
  if len(cores) < n:
    return None
  per = len(cores) // n
  return [set(cores[i * per:(i + 1) * per]) for i in range(n)]
