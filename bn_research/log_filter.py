"""Which log lines a command shows: INFO from this project, WARNING and above from libraries
(orbax logs every checkpoint step at INFO). `--verbosity=1` (absl's flag) shows them all."""

import logging as std_logging

from absl import logging

_OURS = ('/bn_research/', '/scripts/', '/experiments/')


def _keep(record) -> bool:
  return (record.levelno >= std_logging.WARNING or logging.get_verbosity() > 0
          or any(part in record.pathname for part in _OURS))


def quiet_library_logs() -> None:
  """Installs the filter (once) on absl's logger and on absl's handler, which also
  prints the records of Python loggers such as JAX's (its backend probe lines)."""
  for target in (logging.get_absl_logger(), logging.get_absl_handler()):
    if _keep not in target.filters:
      target.addFilter(_keep)
