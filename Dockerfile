# The sidecar's container image: `sidecar serve` on a slim Python, as a non-root user, with a
# read-only root filesystem. Envoy is not in it: run the envoyproxy/envoy image beside it
# (deploy/k8s/deployment.yaml). Build: docker build -t llm-spend-sidecar:0.1.0 .
#
# tests/integration/test_container_recipe.py runs the build stage's commands, in order, in a
# fresh virtualenv and starts the result the way this image's ENTRYPOINT does; keep the
# install steps as plain COPY and RUN lines it can follow.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m venv /opt/sidecar
RUN /opt/sidecar/bin/pip install --upgrade pip
# Not editable and without the test extras: only the package and its runtime dependencies.
# (pip's cache stays in this stage; only /opt/sidecar reaches the image.)
RUN /opt/sidecar/bin/pip install .
# xds-protos ships an older copy of opentelemetry/proto that can overwrite the
# opentelemetry-proto package's files; the OTLP trace exporter needs the package's own.
RUN /opt/sidecar/bin/pip install --force-reinstall --no-deps "opentelemetry-proto==$(/opt/sidecar/bin/pip show opentelemetry-proto | sed -n 's/^Version: //p')"

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/sidecar /opt/sidecar
# State (the fail-open spool, a SQLite store, temporary files such as the metrics of
# `--workers`) lives only under /var/lib/llm-sidecar: mount a volume there and the root
# filesystem can be read-only. The config is mounted read-only at /etc/llm-sidecar.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/llm-sidecar --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/lib/llm-sidecar /etc/llm-sidecar \
    && chown sidecar:sidecar /var/lib/llm-sidecar
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/var/lib/llm-sidecar \
    SIDECAR_CONFIG=/etc/llm-sidecar/sidecar.yaml \
    SIDECAR_HEALTHZ_URL=http://127.0.0.1:9002/healthz
USER 10001:10001
WORKDIR /var/lib/llm-sidecar
VOLUME ["/var/lib/llm-sidecar"]
# 9001: gRPC (ext_authz, ext_proc, health) for the Envoy beside it; 9002: HTTP (admin API,
# /authz, dashboard, /healthz, /readyz, /metrics).
EXPOSE 9001 9002
# Liveness only (the process answers); readiness, which includes the store, is /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SIDECAR_HEALTHZ_URL'], timeout=2)"]
ENTRYPOINT ["sidecar", "serve"]
