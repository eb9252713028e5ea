"""Stage one: run a teacher once per task and write its cache (build.py), one module per teacher head."""
