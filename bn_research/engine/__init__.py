"""The training engine: K members of a model, one program, one loop.

  state.py     TrainState, run keys, the values a member sweep traces (SWEEPABLE)
  steps.py     the pure init / train / chunk / eval / probe functions
  layout.py    Program (what the loop drives) and what every layout shares
  programs.py  layouts (jit over a mesh, vmapped members on members x data) -> Program
  pmap_program.py  the pmap layout
  loop.py      the only training loop: chunk ends, divergence, cadence, periodic actions
  api.py       train_and_evaluate (a plain run), train_members (a member sweep)

`SweepError` lives here, without JAX, so that the run plan (`bn_research.plan`), which
raises it too, shares the class without importing the engine.
"""


class SweepError(ValueError):
  """A plan, sweep or sweep value that cannot run; the message is one line."""

