"""Measurements that write docs: `kdcache bench` (bench.py, lm_bench.py), `kdcache fidelity` (fidelity.py), the
stage-two profile (profile.py); generated doc sections (docsections.py)."""
