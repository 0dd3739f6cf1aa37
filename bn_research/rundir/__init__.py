"""The run directory: what a run writes into its workdir, and how it is read.

Three parts, one owner each:

* `files`: the names of a run's files, their readers (`read_config`, `read_status`,
  `read_description`, `read_metrics`, `run_files_present`) and the writer `RunFiles`;
* `lock`: `WorkdirLock` (one process per workdir), `move_aside` (--overwrite) and
  `lock_state` (whether a `running` run still has a live process);
* `checkpoints`: `Checkpointer` (orbax saves sealed by an integrity record, checked
  before they are restored) and `load_latest` for analysis.

No other module knows these file names. What to do with a workdir (start, resume, or
leave a finished run alone) is the engine's decision (`bn_research.engine.resume`),
made from what these readers report. Every error about a file is a one-line
`RunDirError` (a ValueError) naming the file and what to do about it.
"""

from bn_research.rundir.checkpoints import (INTEGRITY_FILE, Checkpointer, checkpoint_steps,
                                            load_latest, set_aside, verify)
from bn_research.rundir.files import (CHECKPOINT_DIR, CONFIG_FILE, DAMAGED_CHECKPOINT_DIR,
                                      DESCRIPTION_FILE, EVENTS_PREFIX, FINISHED_STATUSES,
                                      LOCK_FILE, METRICS_FILE, STATUS_FILE, STATUSES,
                                      SWEEP_FILE, SWEEP_OWN_FILES, RunDirError, RunFiles,
                                      _summary_writer_class, check_usable_dir,
                                      check_workdir_parent, config_differences,
                                      config_to_dict, flatten, is_run_dir, is_sweep_dir,
                                      read_config, read_description, read_metrics,
                                      read_status, read_sweep, run_files_present,
                                      status_record, write_json)
from bn_research.rundir.lock import (WorkdirLock, check_not_locked, lock_state,
                                     move_aside)
