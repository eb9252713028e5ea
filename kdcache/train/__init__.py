"""Stage two: train students from caches without the teacher (loop.py), one module per teacher head."""
