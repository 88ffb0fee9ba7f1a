"""The floor: a `grpc.aio` ext_authz server that allows everything and does nothing else.

It is what any Python ext_authz costs before it decides anything (the gRPC hop, protobuf
parsing of the CheckRequest with its body, one event loop), built with the same server
options as `sidecar serve`, so the sidecar rows are read as a ratio to it. With
`--ext-proc` it also serves a pass-through ext_proc (one empty answer per message) and an
access log service that reads and drops the records, the floor for the metering row.
With `--answer FILE` it answers every Check with the CheckResponse in FILE (serialized, as
`sidecar serve` answers: the bytes, no message built): the sidecar's own allow, so that
what Envoy spends on that answer (its headers, removals and metadata) is measured apart
from what the sidecar spends deciding it.

    python -m bench.noop_authz --port 9101 [--ext-proc] [--answer FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from google.rpc import code_pb2, status_pb2

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return _OK


class NoopProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind in ("request_headers", "response_headers"):
                yield pb.ProcessingResponse(**{kind: pb.HeadersResponse()})
            elif kind in ("request_body", "response_body"):
                yield pb.ProcessingResponse(**{kind: pb.BodyResponse()})
            else:
                yield pb.ProcessingResponse(**{kind: pb.TrailersResponse()})


class NoopAccessLog(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> Any:
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


def add_answering(answer: bytes, server: grpc.aio.Server) -> None:
    """Serve Check answering `answer`, registered as `sidecar serve` registers its own."""

    async def check(request: external_auth_pb2.CheckRequest, context: object) -> bytes:
        return answer

    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=None,
        )
    }
    service = "envoy.service.auth.v3.Authorization"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


async def serve(address: str, ext_proc: bool, answer: bytes | None = None) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    if answer is None:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    else:
        add_answering(answer, server)
    if ext_proc:
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(NoopAccessLog(), server)
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ext-proc", action="store_true", help="serve ext_proc too")
    parser.add_argument("--answer", type=Path, help="answer every Check with this CheckResponse")
    args = parser.parse_args()
    answer = args.answer.read_bytes() if args.answer else None
    asyncio.run(serve(f"{args.host}:{args.port}", args.ext_proc, answer))


if __name__ == "__main__":
    main()
