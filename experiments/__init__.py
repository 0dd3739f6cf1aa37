"""The project's jobs: one per module, each `python -m experiments.<job>`."""

import sys

# `python -m experiments.<job>` imports this package first (sys.argv[0] is '-m' while
# the job's module is located): a signal during the job's own imports is recorded from
# here, and the driver's start-up ends it in one line (bn_research/signals.py).
if sys.argv and sys.argv[0] == '-m':
  from bn_research import signals  # pylint: disable=g-import-not-at-top
  signals.record_until_started('experiments')
