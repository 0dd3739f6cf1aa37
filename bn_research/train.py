"""The training engine's public entry points (the engine itself is `bn_research/engine/`).

    from bn_research import train
    train.train_and_evaluate(config, workdir)          # a plain run (K = 1)
    train.train_members(base, [(workdir, {key: value}), ...])   # K vmapped members
"""

from bn_research.engine.api import SweepError
from bn_research.engine.api import check_sweepable
from bn_research.engine.api import member_config
from bn_research.engine.api import train_and_evaluate
from bn_research.engine.api import train_members
from bn_research.engine.loop import Interrupted
from bn_research.engine.state import SWEEPABLE
from bn_research.engine.state import TrainState

__all__ = ['SWEEPABLE', 'SweepError', 'Interrupted', 'TrainState', 'check_sweepable',
           'member_config', 'train_and_evaluate', 'train_members']
