"""Moved to `bn_research.rundir`, the one owner of the run directory."""
# TEMPORARY: lead removes after the engine merge (train.py and vmap_sweep.py import it).

from bn_research.rundir import Checkpointer, load_latest  # pylint: disable=unused-import
