"""JAX's persistent compilation cache, on by default for runs launched from the command line.

A run compiles a handful of programs (the initialiser, the training chunk, the eval and
probe functions): about 2.5 s per MNIST run on a 2-core CPU and 30 s or more for
Inception. With the cache, a repeated run (a resumed job, the same config again, a
sweep's next seed with the same shapes) loads them from disk instead. Keys cover the
program, the compile options, the JAX/XLA version and the device, so a stale entry
is never used; the directory is capped in size, least recently used entries first.

`enable(path)` must run before the first compilation. The default location is
`$JAX_COMPILATION_CACHE_DIR` if set, else `$XDG_CACHE_HOME/bn_research/jax` (that is
`~/.cache/bn_research/jax`); 'none' turns the cache off.
"""

from __future__ import annotations

import os
from typing import Optional

# Whole directory, all entries: least recently used entries are evicted past this.
MAX_BYTES = 1 << 30


def default_dir() -> str:
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'bn_research', 'jax')


def enable(path: Optional[str]) -> Optional[str]:
  """Points JAX's persistent compilation cache at `path` ('' / 'none': leave it off).

  Returns the directory used, or None when the cache is off.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not path or path.lower() == 'none':
    # JAX itself reads $JAX_COMPILATION_CACHE_DIR; 'none' must win over it.
    jax.config.update('jax_compilation_cache_dir', None)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  jax.config.update('jax_compilation_cache_dir', path)
  # Every program, however quick to compile: the small ones add up at start-up.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
  return path
