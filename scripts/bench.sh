#!/usr/bin/env bash
# The benchmark command: set up the virtualenv, then run every row of bench/run.py on
# loopback (it installs wrk and redis-server from Debian itself when they are missing).
# Arguments go to bench.run: --quick for a one-round smoke run, --memory to measure the
# 100k-user RSS again. Results: bench/results/latest.md and latest.json.
set -euo pipefail
cd "$(dirname "$0")/.."
SIDECAR_SETUP_BENCH=1 bash scripts/setup.sh
exec .venv/bin/python -m bench.run "$@"
