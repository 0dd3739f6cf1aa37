"""Which log lines a command shows: INFO from this project, WARNING and above from libraries
(orbax logs every checkpoint step at INFO). `--verbosity=1` (absl's flag) shows them all."""

import logging as std_logging

from absl import logging

_OURS = ('/bn_research/', '/scripts/', '/experiments/')


def _keep(record) -> bool:
  return (record.levelno >= std_logging.WARNING or logging.get_verbosity() > 0
          or any(part in record.pathname for part in _OURS))


def quiet_library_logs() -> None:
  """Installs the filter on absl's logger (once)."""
  logger = logging.get_absl_logger()
  if _keep not in logger.filters:
    logger.addFilter(_keep)
