"""Moved to `bn_research.rundir`, the one owner of the run directory."""
# TEMPORARY: lead removes after the engine merge (train.py and vmap_sweep.py import it).

from bn_research.rundir import (  # pylint: disable=unused-import
    STATUSES, RunFiles, _summary_writer_class, check_workdir, config_differences,
    config_to_dict, flatten, move_aside, read_status)
