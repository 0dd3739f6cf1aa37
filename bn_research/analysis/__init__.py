"""Reading run directories and summarizing their training curves.

`runs` loads what `bn_research.main` writes (config, metrics, status);
`curves` turns metric curves into the numbers compared across runs.
"""

from bn_research.analysis import curves
from bn_research.analysis import runs

__all__ = ['curves', 'runs']
