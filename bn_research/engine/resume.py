"""What to do with a run's workdir: start afresh, resume, or leave a finished run alone.

The decision is the engine's; the run directory (`bn_research.rundir`) only reports
what the workdir holds. A status.json that is missing is never reconstructed from the
other files: the run resumes from its newest good checkpoint and the loop, the one
place that defines `done` and `diverged`, writes it again (a finished run resumes at
its last step and trains nothing; a diverged one diverges again at the same step, as
resuming is exact).
"""

from __future__ import annotations

from absl import logging
import ml_collections

from bn_research import rundir

NEW, RESUME, DONE = 'new', 'resume', 'done'


def decide(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> str:
  """Decides what a run of `config` does with `workdir`. Writes nothing.

  Returns:
    'new' (nothing of a run there, or --overwrite of a different or unidentifiable run,
    which the engine moves aside first), 'resume' (the same config, not finished, or
    finished but its status.json gone), or 'done' (the same config, done or diverged).

  Raises:
    RunDirError: the workdir (or its parent) is not a writable directory; one of its
      files is corrupt; or, without overwrite, it holds a run of a different config,
      or run files (metrics, checkpoints, ...) whose config.json is gone.
  """
  rundir.check_workdir_parent(workdir)
  rundir.check_usable_dir(workdir)
  try:
    old = rundir.read_config(workdir)
  except rundir.RunDirError:
    if overwrite:
      return NEW
    raise
  if old is None:
    present = rundir.run_files_present(workdir)
    if present and not overwrite:
      raise rundir.RunDirError(
          f'--workdir={workdir!r} holds a run ({", ".join(present)}) but no '
          f'{rundir.CONFIG_FILE}, so it cannot be told whether this config may resume '
          f'it; restore {rundir.CONFIG_FILE}, choose another workdir, or pass --overwrite '
          'to move that run aside (renamed, never deleted).')
    return NEW
  diff = rundir.config_differences(old, rundir.config_to_dict(config))
  if diff and not overwrite:
    shown = ', '.join(diff[:6]) + (' ...' if len(diff) > 6 else '')
    raise rundir.RunDirError(
        f'--workdir={workdir!r} holds a run of a different config (differs in: {shown}); '
        'choose another workdir, or pass --overwrite to move that run aside.')
  if diff:
    return NEW
  status = rundir.read_status(workdir)
  if status is None:
    if rundir.checkpoint_steps(workdir):
      logging.warning('%s has no %s; resuming from its newest good checkpoint, which '
                      'writes it again.', workdir, rundir.STATUS_FILE)
    return RESUME
  return DONE if status.get('status') in rundir.FINISHED_STATUSES else RESUME
