"""kdcache: offline soft-label caching for knowledge distillation.

Stage one (`kdcache cache`) runs a teacher once and writes a sharded Parquet/Zarr cache; stage two streams that
cache to train many cheap students without loading the teacher again.
"""

__version__ = "0.1.0"
