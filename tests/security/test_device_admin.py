"""Device login never makes an administrator: CLI and service tokens are for LLM calls.

The attack: an admin is talked into approving a device code the attacker started; the CLI
token the attacker receives copies the admin's groups and used to pass every admin check.
"""

from __future__ import annotations

import grpc
import jwt
import pytest
from starlette.testclient import TestClient

from devtools.procs import LOOPBACK, free_port
from sidecar.grpc_api import SidecarApi
from sidecar.identity.device import Approver
from sidecar.proto_gen.sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.security.conftest import Site, admin_token, device_token

ADMIN_PATHS = [
    "/v1/service-tokens",
    "/v1/spend-limits",
    "/v1/usage",
    "/accounts/acme/ai-gateway/billing/spending-limit",
]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def token_names(client: TestClient) -> list[str]:
    listing = client.get("/v1/service-tokens", headers=admin_token())
    assert listing.status_code == 200, listing.text
    return [t["name"] for t in listing.json()["result"]]


def test_device_token_of_an_admin_approver_is_refused_by_the_admin_api(site: Site) -> None:
    client = site.client()
    stolen = device_token(client, site.admin_person())
    assert client.get("/v1/budgets/me", headers=bearer(stolen)).status_code == 200
    for path in ADMIN_PATHS:
        answer = client.get(path, headers=bearer(stolen))
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["success"] is False
    created = client.post(
        "/v1/service-tokens",
        headers=bearer(stolen),
        json={"name": "backdoor", "groups": ["platform-admins"]},
    )
    assert created.status_code == 403, created.text
    assert "backdoor" not in token_names(client)


def test_service_token_in_an_admin_group_is_not_an_admin(site: Site) -> None:
    client = site.client()
    made = client.post(
        "/v1/service-tokens",
        headers=admin_token(),
        json={"name": "pipeline", "groups": ["platform-admins"]},
    )
    assert made.status_code == 201, made.text
    issued = made.json()["result"]
    service = {
        "cf-access-client-id": issued["client_id"],
        "cf-access-client-secret": issued["client_secret"],
    }
    assert client.get("/v1/budgets/me", headers=service).status_code == 200
    assert client.get("/v1/service-tokens", headers=service).status_code == 403
    again = client.post("/v1/service-tokens", headers=service, json={"name": "second"})
    assert again.status_code == 403
    assert token_names(client) == ["pipeline"]


def test_access_jwt_person_in_an_admin_group_is_still_an_admin(site: Site) -> None:
    client = site.client()
    jwt = site.issuer.mint("root@example.com", ["platform-admins"])
    assert client.get("/v1/service-tokens", headers=bearer(jwt)).status_code == 200
    made = client.post("/v1/service-tokens", headers=bearer(jwt), json={"name": "ok"})
    assert made.status_code == 201, made.text
    assert (
        client.get(
            "/v1/service-tokens", headers=bearer(site.issuer.mint("dev@example.com", ["eng"]))
        ).status_code
        == 403
    )


async def test_grpc_admin_api_refuses_a_device_token_of_an_admin(site: Site) -> None:
    login = site.services.device_login
    assert login is not None
    stolen = await login.mint(
        Approver("root-sub", "root@example.com", ("platform-admins",), login.issuer), 3600
    )
    server = grpc.aio.server()
    sidecar_pb2_grpc.add_SidecarServicer_to_server(SidecarApi(site.services), server)
    port = free_port()
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    request = sidecar_pb2.ReportUsageRequest(
        request_id="r-1", model="gpt-4o-mini", provider="openai", input_tokens=1_000_000
    )
    try:
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.ReportUsage(
                    request, metadata=[("authorization", f"Bearer {stolen}")], timeout=10
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            answer = await stub.ReportUsage(
                request,
                metadata=[("authorization", f"Bearer {admin_token()['authorization'][7:]}")],
                timeout=10,
            )
            assert answer.status == sidecar_pb2.REPORT_STATUS_UNKNOWN
    finally:
        await server.stop(None)


def test_approval_page_says_what_is_granted_to_whom_and_warns(make_site: object) -> None:
    site = make_site(http={"trusted_proxies": ["10.0.0.0/8"]})  # type: ignore[operator]
    proxy = site.client(peer="10.0.0.2")
    started = proxy.post(
        "/device/code",
        data={"client_id": "x"},
        headers={"user-agent": "curl/8.5 (attacker box)", "x-forwarded-for": "203.0.113.66"},
    )
    assert started.status_code == 200, started.text
    page = proxy.get(
        "/device", params={"user_code": started.json()["user_code"]}, headers=site.admin_person()
    )
    assert page.status_code == 200, page.text
    text = page.text
    assert "203.0.113.66" in text, "the requesting client's address"
    assert "curl/8.5 (attacker box)" in text, "the requesting client's user agent"
    assert "1 hour" in text, "the token's lifetime"
    assert "root@example.com" in text, "as whom"
    assert "never carries admin rights" in text
    assert "Do not approve a code you did not start" in text


def test_admin_scope_claims_from_any_other_issuer_grant_nothing(site: Site) -> None:
    # An IdP token dressed up as an admin-scoped CLI token is an ordinary person's token.
    client = site.client()
    dressed = site.issuer.mint(
        "mallory@example.com", ["ml"], kind="cli", scope="admin", sid="anything"
    )
    assert client.get("/v1/budgets/me", headers=bearer(dressed)).status_code == 200
    for path in ADMIN_PATHS:
        assert client.get(path, headers=bearer(dressed)).status_code == 403, path


def test_plain_device_login_of_an_admin_never_carries_admin_scope(site: Site) -> None:
    client = site.client()
    token = device_token(client, site.admin_person())
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "scope" not in claims and claims["kind"] == "cli" and claims["sid"]
    # Asking for another scope at the token endpoint changes nothing.
    assert client.get("/v1/spend-limits", headers=bearer(token)).status_code == 403
    refused = client.post("/device/code", data={"client_id": "sidecar-cli", "scope": "root"})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"


def test_admin_code_approval_refused_for_a_non_admin_person(site: Site) -> None:
    client = site.client()
    started = client.post("/device/code", data={"client_id": "sidecar-cli", "scope": "admin"})
    code = started.json()["user_code"]
    member = site.person("bob@example.com", ["ml"])
    page = client.get("/device", params={"user_code": code}, headers=member)
    assert page.status_code == 403 and "ADMIN" in page.text and "csrf_token" not in page.text
    posted = client.post(
        "/device/approve",
        headers=member,
        data={"user_code": code, "action": "approve", "csrf_token": "x"},
    )
    assert posted.status_code == 403
    poll = client.post(
        "/device/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": started.json()["device_code"],
        },
    )
    assert poll.json()["error"] == "authorization_pending"
