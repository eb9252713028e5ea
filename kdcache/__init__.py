"""kdcache: offline soft-label caching for knowledge distillation.

Stage one (`kdcache cache`) runs a teacher once and writes a sharded Parquet/Zarr cache; stage two streams that
cache to train many cheap students without loading the teacher again. The Python API (docs/api.md) is importable
from here: `from kdcache import open_split, distillation_loss`; it loads torch only when first used.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["CacheDataset", "CacheFormatError", "SampledTargets", "TopKTargets", "collate", "dense_kd_loss_per_row",
           "distillation_loss", "feature_loss", "find_cache", "kd_loss_per_row", "lm_distillation_loss", "manifest",
           "open_split",
           "read_column"]


def __getattr__(name: str) -> Any:
    # the API pulls in torch, pyarrow and zarr: import it on first use so that `kdcache --help` stays instant
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
