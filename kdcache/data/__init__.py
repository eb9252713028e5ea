"""Stage one's task data: load a pipeline's rows into `datasets.Dataset`s with normalised columns (load.py), from
the sources a task names (sources.py, files.py), shaped into the task's splits (shape.py), with an augmented
transfer set (augment.py). The public names are importable from `kdcache.data`.

Every split comes back with columns `id` (str), the configured text field(s) (str) and `label` (int, -1 when
unlabelled), plus the label names. Built-in sources read real data offline (PyPI packages or ../shared/data);
`hub` and `files` are the same code path for a user's own data."""

from .load import load_task_data
from .shape import canonical_splits, carve_validation, infer_label_names
from .sources import CONLL_TAGS, SOURCES, TOKEN_SOURCES, package_dir, portable_origin, read_conll, shared_data_dir, \
    shared_data_root
from .task import DataError, TaskData, of_classes, stable_bucket, take_rows

__all__ = ["CONLL_TAGS", "DataError", "SOURCES", "TOKEN_SOURCES", "TaskData", "canonical_splits", "carve_validation",
           "infer_label_names", "load_task_data", "of_classes", "package_dir", "portable_origin", "read_conll",
           "shared_data_dir", "shared_data_root", "stable_bucket", "take_rows"]
