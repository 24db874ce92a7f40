"""The data layer: loaders, preprocessing and prepared datasets (METHOD.md §1).

Typical use, from a notebook::

    from reaemb.data import DataConfig, prepare
    ds = prepare(DataConfig(dataset="ml-100k"), run="ml-100k")
    ds.n_users, ds.n_items, ds.stats["tail_items"]
"""

from .errors import DataError
from .loaders import DATASETS, RawData, load_raw, resolve_data_dir
from .prepared import (
    DataConfig,
    PreparedDataset,
    describe,
    load_prepared,
    prepare,
    preprocess,
    stats_table,
)
from .preprocess import (
    chronological_sequences,
    cooccurrence_counts,
    filter_rating,
    kcore,
    leave_one_out,
    remap_ids,
    share_threshold,
)

__all__ = [
    "DataError",
    "DATASETS",
    "RawData",
    "load_raw",
    "resolve_data_dir",
    "DataConfig",
    "PreparedDataset",
    "prepare",
    "preprocess",
    "load_prepared",
    "describe",
    "stats_table",
    "filter_rating",
    "kcore",
    "remap_ids",
    "chronological_sequences",
    "leave_one_out",
    "cooccurrence_counts",
    "share_threshold",
]
