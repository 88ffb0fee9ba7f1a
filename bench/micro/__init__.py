"""In-process microbenchmarks (pytest-benchmark): `.venv/bin/pytest bench/micro`."""
