"""`sidecar serve`: the gRPC server (ext_authz, ext_proc, health) and the HTTP server, in one
event loop per worker process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import structlog
import uvicorn
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sidecar import event_loop, tracing
from sidecar.config.models import GrpcTlsConfig
from sidecar.envoy.access_log import AccessLogServicer
from sidecar.envoy.authz import AuthorizationServicer
from sidecar.envoy.authz import add_to_server as add_authorization
from sidecar.envoy.ext_proc import ExternalProcessorServicer
from sidecar.envoy.unanswered import SharedUnanswered
from sidecar.grpc_api import SERVICE_NAME, SidecarApi
from sidecar.helper_threads import keep_helpers_placed
from sidecar.http.app import create_app
from sidecar.metering.exchange import drain_charges
from sidecar.proto_gen.sidecar.v1 import sidecar_pb2_grpc
from sidecar.services import build_services
from sidecar.store.sqlite_owned import OwnedSQLiteStore

log = structlog.get_logger("sidecar")
# In-flight checks and streams get this long to finish after SIGTERM.
DRAIN_SECONDS = 10.0
# A batch of metering records can carry bodies of up to 1 MiB each (sidecar/envoy/meter.lua).
MAX_RECEIVE_BYTES = 64 * 1024 * 1024


class _HttpServer(uvicorn.Server):
    """uvicorn without its signal handling: this process drains both servers itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def is_loopback(addr: str) -> bool:
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def listen_grpc(server: grpc.aio.Server, addr: str, tls: GrpcTlsConfig | None) -> None:
    """Open the gRPC port: plain, or TLS requiring a client certificate signed by the
    configured CA (mTLS). Whoever can open a stream here can ask for decisions and report
    usage, so beyond loopback only Envoy, holding its certificate, should be able to."""
    if tls is None:
        if not is_loopback(addr):
            log.warning(
                "grpc_listener_without_mtls",
                address=addr,
                hint="anyone who can reach this address can call ext_authz and "
                "ext_proc; set listen.grpc_tls to require Envoy's certificate",
            )
        server.add_insecure_port(addr)
        return
    credentials = grpc.ssl_server_credentials(
        [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
        root_certificates=Path(tls.client_ca_file).read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(addr, credentials)


async def serve(
    config_path: Path,
    grpc_addr: str | None,
    http_addr: str | None,
    http_sockets: list[socket.socket] | None = None,
    *,
    shared_store: bool = False,
) -> None:
    """`http_sockets`: listening sockets made by the caller (`sidecar/workers.py` shares one
    port between processes with SO_REUSEPORT, which uvicorn does not set itself).
    `shared_store`: this is one of several processes on the store (a SQLite file is then
    shared through SQLite's locking instead of owned by this process)."""
    tracing.configure()
    services = await build_services(config_path, store_owner=not shared_store)
    listen = services.ruleset.config.listen
    grpc_addr = grpc_addr or listen.grpc
    http_addr = http_addr or listen.http

    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    )
    authorization = AuthorizationServicer(services.engine)
    add_authorization(authorization, server)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessorServicer(services.engine), server
    )
    # A SQLite file this process owns has no other process to share unanswered calls with.
    shared = (
        None
        if isinstance(services.store, OwnedSQLiteStore)
        else SharedUnanswered(authorization.unanswered, services.store, services.engine.withdraw)
    )
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogServicer(services.engine, authorization.unanswered, shared), server
    )
    health_servicer = health.aio.HealthServicer()
    sidecar_pb2_grpc.add_SidecarServicer_to_server(SidecarApi(services), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listen_grpc(server, grpc_addr, listen.grpc_tls)
    await server.start()
    for name in (
        "",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "envoy.service.accesslog.v3.AccessLogService",
        SERVICE_NAME,
    ):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    host, _, port = http_addr.rpartition(":")
    http = _HttpServer(
        uvicorn.Config(
            create_app(services),
            host=host.strip("[]"),
            port=int(port),
            log_level="warning",
            access_log=False,
            lifespan="off",
            # X-Forwarded-For is read by the app, from configured proxies only
            # (http.trusted_proxies).
            proxy_headers=False,
        )
    )
    services.start_background()
    services.tasks.append(
        asyncio.get_running_loop().create_task(
            keep_helpers_placed(lambda: services.ruleset.config.overload.batch_helper_threads)
        )
    )
    if shared is not None:
        services.tasks.append(asyncio.get_running_loop().create_task(shared.run()))
    # Everything built so far (modules, genai-prices' data, compiled rules: ~80,000 objects)
    # lives as long as the process. A full collection walked all of it, a ~40 ms stall of
    # every request in flight, measured; frozen objects are never scanned again.
    gc.collect()
    gc.freeze()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, services.watcher.on_signal)
    http_task = loop.create_task(http.serve(sockets=http_sockets))
    log.info(
        "serving",
        grpc=grpc_addr,
        http=http_addr,
        store=services.ruleset.config.store.url.split("@")[-1],
        config=str(config_path),
        version=services.ruleset.version,
    )
    await stop.wait()

    log.info("draining", seconds=DRAIN_SECONDS)
    services.draining = True
    await health_servicer.enter_graceful_shutdown()
    # Calls admitted here may still be streaming through Envoy; their metering records
    # arrive when they end. Keep serving those (new Checks are refused, 503 with a retry)
    # until every one is charged or the drain time is up; then nothing of value is left in
    # flight but idle streams.
    engine = services.engine
    engine.draining = True
    deadline = loop.time() + DRAIN_SECONDS
    while engine.inflight.count() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await server.stop(1.0)
    # Records that arrived before the stop are charged before the store closes.
    await drain_charges()
    http.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await http_task
    await services.close()
    tracing.shutdown()
    log.info("stopped")


def run(config_path: Path, grpc_addr: str | None, http_addr: str | None) -> None:
    event_loop.run(serve(config_path, grpc_addr, http_addr))
