#!/usr/bin/env bash
# The test command: set up what is missing, then lint, type-check and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --for-tests
.venv/bin/ruff check sidecar devtools tests bench
.venv/bin/ruff format --check sidecar devtools tests bench scripts
.venv/bin/mypy sidecar devtools tests bench
exec .venv/bin/pytest -q "$@"
