"""The cache reader's public names in one place (kept for imports that predate the `cache/read/` package):
the streaming dataset, manifest opening, the row and column helpers. See kdcache/cache/read/ for each piece."""

from .codecs import collate
from .read.columns import lm_columns
from .read.dataset import CacheDataset, read_column, read_columns, read_vocab
from .read.expect import CacheMismatchError, check_expected
from .read.plan import MIXINGS, Unit, dist_info, mixing_weights
from .read.remote import HOLD_BYTES, READ_AHEAD, READ_AHEAD_BYTES, RangeFile, open_manifest
from .read.rows import Batch, Row

__all__ = ["Batch", "CacheDataset", "CacheMismatchError", "HOLD_BYTES", "MIXINGS", "READ_AHEAD", "READ_AHEAD_BYTES",
           "RangeFile", "Row", "Unit", "check_expected", "collate", "dist_info", "lm_columns", "mixing_weights",
           "open_manifest", "read_column", "read_columns", "read_vocab"]
