"""Reading a cache: the streaming dataset (dataset.py), its epoch plan (plan.py), remote ranged I/O (remote.py),
other teachers of the same rows (companions.py), row views (rows.py) and per-head columns (columns.py).
`kdcache.cache.reader` re-exports the public names."""
