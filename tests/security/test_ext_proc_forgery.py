"""Only Envoy can report usage: an ext_proc stream or an access log record sent to the gRPC
port by anyone else cannot move a charge, and with mTLS neither can be sent at all."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from google.rpc import code_pb2
from structlog.testing import capture_logs

from devtools.config import demo_config
from devtools.envoy_config import SidecarMtls
from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from sidecar.model import TokenUsage
from sidecar.proto_gen.sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar.server import listen_grpc
from tests.security.certs import Authority, Issued
from tests.security.conftest import (
    check,
    check_request,
    micros,
    openai_client,
    user,
)
from tests.support.ledger import charged, eventually
from tests.support.prices import genai_micros

MODEL = "gpt-4o-mini"
MESSAGES: Any = [{"role": "user", "content": "Write a short line about budgets."}]
CHAT = "/openai/v1/chat/completions"


def price(usage: TokenUsage) -> int:
    return genai_micros(usage, MODEL, "openai")


def _headers(values: dict[str, str]) -> pb.HttpHeaders:
    return pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
        )
    )


def forged_stream(claimed: dict[str, str]) -> list[pb.ProcessingRequest]:
    """What an attacker on the gRPC port sends: a finished exchange with a tiny usage."""
    body = {"model": MODEL, "messages": MESSAGES}
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    return [
        pb.ProcessingRequest(
            request_headers=_headers({":path": CHAT, ":method": "POST", **claimed})
        ),
        pb.ProcessingRequest(
            request_body=pb.HttpBody(body=json.dumps(body).encode(), end_of_stream=True)
        ),
        pb.ProcessingRequest(
            response_headers=_headers({":status": "200", "content-type": "application/json"})
        ),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=json.dumps(usage).encode(), end_of_stream=True)
        ),
    ]


def send_forged(port: int, claimed: dict[str, str]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_processor_pb2_grpc.ExternalProcessorStub(channel)
        for _ in stub.Process(iter(forged_stream(claimed)), timeout=10):
            pass


def send_forged_record(port: int, request_id: str) -> None:
    """A metering record as Envoy's access log would send it: a finished call, tiny usage."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    meta = entry.common_properties.metadata.filter_metadata["sidecar.metering"].fields
    meta["rid"].string_value = request_id
    meta["path"].string_value = CHAT
    meta["content_type"].string_value = "application/json"
    meta["c1"].string_value = json.dumps(
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    )
    meta["chunks"].number_value = 1
    meta["done"].bool_value = True
    entry.response.response_code.value = 200
    entry.common_properties.time_to_last_upstream_tx_byte.nanos = 1
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.append(entry)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(iter([message]), timeout=10)


def test_forged_usage_stream_cannot_lower_a_real_charge(stack: Stack, issuer: DevIssuer) -> None:
    email = user("forger")
    stack.clear_seen()
    client = openai_client(
        stack, issuer.mint(email), **{"x-request-id": "my-own-id", "x-fake-delay-ms": "200"}
    )
    finished = threading.Event()

    def call() -> None:
        list(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=8, stream=True
            )
        )
        finished.set()

    worker = threading.Thread(target=call)
    worker.start()
    try:
        # While the real call streams, its reservation is open: forge its completion with
        # every id the attacker could know: its own, and the one the provider was sent.
        (arrived,) = eventually(lambda: stack.seen() or None, what="the call to arrive")
        known = {"my-own-id", arrived["headers"].get("x-request-id", "")}
        # The sidecar's reservation id reaches neither the provider nor the client.
        assert "x-sidecar-request-id" not in arrived["headers"]
        for request_id in known:
            send_forged(
                stack.grpc_port,
                {
                    "x-request-id": request_id,
                    "x-sidecar-request-id": request_id,
                    "x-sidecar-model": MODEL,
                    "x-sidecar-provider": "openai",
                },
            )
            send_forged_record(stack.grpc_port, request_id)
    finally:
        worker.join(timeout=60)
    assert finished.is_set()
    usage = expected_usage("openai_chat", {"messages": MESSAGES, "max_tokens": 8})
    row = charged(stack, email)
    assert row["requests"] == 1 and micros(row["cost_usd"]) == price(usage)
    assert (row["input_tokens"], row["output_tokens"]) == (usage.total_input, 8)


def test_usage_report_is_priced_at_the_reserved_model(stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint(user("reporter"))
    admitted = check(
        stack,
        {"authorization": f"Bearer {token}"},
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 5},
    )
    (minted,) = [
        h.header.value
        for h in admitted.ok_response.headers
        if h.header.key == "x-sidecar-request-id"
    ]
    cheaper = sidecar_pb2.ReportUsageRequest(
        request_id=minted, model="gpt-4.1-nano", provider="openai", input_tokens=10, output_tokens=5
    )
    with (
        grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        sidecar_pb2_grpc.SidecarStub(channel).ReportUsage(
            cheaper, timeout=10, metadata=(("authorization", f"Bearer {stack.admin_token}"),)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_listener_beyond_loopback_without_mtls_warns() -> None:
    server = grpc.aio.server()
    with capture_logs() as logs:
        listen_grpc(server, "127.0.0.1:0", None)
        assert not [e for e in logs if e["event"] == "grpc_listener_without_mtls"]
        listen_grpc(server, "0.0.0.0:0", None)
    assert [e["address"] for e in logs if e["event"] == "grpc_listener_without_mtls"] == [
        "0.0.0.0:0"
    ]
    await server.stop(None)


# --- mTLS through Envoy --------------------------------------------------------------------


class Pki:
    def __init__(self, directory: Path) -> None:
        sidecar_ca = Authority(directory, "sidecar-ca")
        envoy_ca = Authority(directory, "envoy-ca")
        rogue_ca = Authority(directory, "rogue-ca")
        self.sidecar_ca = sidecar_ca.cert
        self.envoy_ca = envoy_ca.cert
        self.server: Issued = sidecar_ca.issue("sidecar.internal", server=True)
        self.envoy: Issued = envoy_ca.issue("envoy", server=False)
        self.rogue: Issued = rogue_ca.issue("envoy", server=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, pki: Pki
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("mtls")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        f"sqlite:///{workdir}/s.db",
        listen={
            "grpc_tls": {
                "cert_file": str(pki.server.cert),
                "key_file": str(pki.server.key),
                "client_ca_file": str(pki.envoy_ca),
            }
        },
    )
    envoy_side = SidecarMtls(pki.envoy.cert, pki.envoy.key, pki.sidecar_ca)
    with running_stack(workdir, issuer, config, sidecar_mtls=envoy_side) as running:
        yield running


def _tls(pki: Pki, client: Issued | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.sidecar_ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


def test_envoy_with_its_certificate_is_served_and_charged(
    mtls_stack: Stack, issuer: DevIssuer
) -> None:
    email = user("mtls")
    completion = openai_client(mtls_stack, issuer.mint(email)).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6
    )
    assert completion.choices
    usage = expected_usage("openai_chat", {"messages": MESSAGES, "max_tokens": 6})
    assert micros(charged(mtls_stack, email)["cost_usd"]) == price(usage)


def test_peers_without_envoys_certificate_are_refused(
    mtls_stack: Stack, issuer: DevIssuer, pki: Pki
) -> None:
    headers = {"authorization": f"Bearer {issuer.mint(user('outsider'))}"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    options: dict[str, Any] = {"options": [("grpc.ssl_target_name_override", "sidecar.internal")]}
    for credentials in (None, _tls(pki, None), _tls(pki, pki.rogue)):
        target = f"127.0.0.1:{mtls_stack.grpc_port}"
        with pytest.raises(grpc.RpcError) as refused:
            if credentials is None:
                check(mtls_stack, headers, body)
            else:
                with grpc.secure_channel(target, credentials, **options) as channel:
                    stub = external_processor_pb2_grpc.ExternalProcessorStub(channel)
                    list(stub.Process(iter(forged_stream({})), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The right certificate is what makes the difference.
    with grpc.secure_channel(
        f"127.0.0.1:{mtls_stack.grpc_port}", _tls(pki, pki.envoy), **options
    ) as channel:
        stub_authz = external_auth_pb2_grpc.AuthorizationStub(channel)
        assert stub_authz.Check(check_request(headers, body), timeout=10).status.code == code_pb2.OK
