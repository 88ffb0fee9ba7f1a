"""A request id is never a free pass: replayed, reused or chosen by the client, an id
that already holds a reservation does not admit a request past a full budget."""

from __future__ import annotations

import grpc
import httpx
from google.rpc import code_pb2

from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.proto_gen.sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.security.conftest import REPLAY_MODEL, check, micros, user
from tests.security.test_metering_evasion import MODEL, price
from tests.support.ledger import charged

CHAT_PATH = "/authz/openai/v1/chat/completions"


def authz(stack: Stack, token: str, request_id: str) -> httpx.Response:
    return httpx.post(
        stack.admin_url + CHAT_PATH,
        timeout=10,
        headers={
            "authorization": f"Bearer {token}",
            "x-sidecar-model": REPLAY_MODEL,
            "x-request-id": request_id,
        },
    )


def test_replayed_id_on_authz_is_decided_afresh(stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint(user("replayer"), [])
    first = authz(stack, token, "free-pass")
    assert first.status_code == 200, first.text
    # The budget ($0.003) is now held by that request ($0.002); another one must wait...
    assert authz(stack, token, "another-id").status_code == 429
    # ...and so must the same id, sent again: it is not the reservation it once named.
    for _ in range(3):
        replay = authz(stack, token, "free-pass")
        assert replay.status_code == 429, replay.text
    # The id the sidecar keys the reservation by is its own, never the client's.
    assert first.headers["x-sidecar-request-id"] != "free-pass"


def test_client_id_cannot_collide_with_another_callers(stack: Stack, issuer: DevIssuer) -> None:
    victim = issuer.mint(user("victim"), [])
    attacker = issuer.mint(user("attacker"), [])
    assert authz(stack, victim, "shared-id").status_code == 200
    # The attacker names the victim's id: decided on its own budget, not the victim's pass.
    mine = authz(stack, attacker, "shared-id")
    assert mine.status_code == 200
    assert authz(stack, attacker, "shared-id").status_code == 429


def test_id_replayed_after_its_usage_was_reported_is_refused(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("committed")
    token = issuer.mint(email, [])
    body = {"model": REPLAY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"authorization": f"Bearer {token}", "x-request-id": "spent-id"}
    admitted = check(stack, headers, body)
    assert admitted.status.code == code_pb2.OK
    (minted,) = [
        h.header.value
        for h in admitted.ok_response.headers
        if h.header.key == "x-sidecar-request-id"
    ]
    report = sidecar_pb2.ReportUsageRequest(
        request_id=minted, model=REPLAY_MODEL, provider="openai", input_tokens=100, output_tokens=3
    )  # $0.003: the whole budget
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        done = stub.ReportUsage(
            report, timeout=10, metadata=(("authorization", f"Bearer {stack.admin_token}"),)
        )
    assert done.status == sidecar_pb2.REPORT_STATUS_COMMITTED
    # The budget is spent; neither the client's id nor the sidecar's buys another call.
    assert check(stack, headers, body).status.code == code_pb2.RESOURCE_EXHAUSTED
    replayed = {**headers, "x-request-id": minted, "x-sidecar-request-id": minted}
    assert check(stack, replayed, body).status.code == code_pb2.RESOURCE_EXHAUSTED


def test_duplicated_sidecar_headers_through_envoy_change_nothing(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("doubled")
    stack.clear_seen()
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    headers = [
        ("authorization", f"Bearer {issuer.mint(email)}"),
        ("x-sidecar-request-id", "victim-1"),
        ("x-sidecar-request-id", "victim-2"),
        ("x-sidecar-model", "cheap-model"),
        ("x-sidecar-model", "cheaper-model"),
        ("x-request-id", "one"),
        ("x-request-id", "two"),
    ]
    response = httpx.post(
        stack.envoy_url + "/openai/v1/chat/completions", json=body, headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    (arrived,) = stack.seen()
    # Neither copy of either header reached the provider as the client sent it.
    assert "x-sidecar-request-id" not in arrived["headers"]
    assert arrived["headers"]["x-sidecar-model"] == MODEL
    usage = expected_usage("openai_chat", body)
    row = charged(stack, email)
    assert row["requests"] == 1 and micros(row["cost_usd"]) == price(usage)
