"""Bad input everywhere: the admin API and the Check path get fuzzed with malformed, wrong-
typed, huge and unicode input. Each gets a clear 4xx, nothing changes, nothing crashes."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.keys import DevIssuer
from devtools.stack import ADMIN_TOKEN, Stack

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
WRITES = [
    ("POST", "/v1/service-tokens"),
    ("DELETE", "/v1/service-tokens/{x}"),
    ("POST", "/v1/spend-limits"),
    ("PUT", "/v1/spend-limits/{x}"),
    ("DELETE", "/v1/spend-limits/{x}"),
    ("POST", "/accounts/acme/ai-gateway/billing/spending-limit"),
    ("POST", "/accounts/{x}/ai-gateway/billing/spending-limit"),
    ("POST", "/v1/organizations/billing/spending-caps"),
    ("POST", "/v1/simulate"),
]
SNAPSHOT = [
    "/v1/service-tokens",
    "/v1/spend-limits",
    "/accounts/acme/ai-gateway/billing/spending-limit",
    "/v1/organizations/billing/spending-caps",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["daily", "fixed", "sliding", "monthly", "ml", "", "é🙂\u202e", "a" * 300]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)
# Objects shaped like the real bodies, with wrong values: the likeliest to slip through.
field_names = st.sampled_from(
    [
        "name",
        "groups",
        "expires",
        "amount",
        "duration",
        "strategy",
        "budget_usd",
        "window",
        "filter",
        "split",
        "action",
        "alerts",
        "monthly_spending_budget",
        "hard_spending_cap",
        "hard_cap_enabled",
        "spending_alert_thresholds",
        "spending_alerts_enabled",
        "identity",
        "model",
        "metadata",
    ]
)
shaped = st.dictionaries(field_names, json_values, max_size=6)
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b'{"a":',
            b"\xff\xfe",
            b'{"name": "x"}' * 3,
            b"{" * 5000,
            b'{"name": "' + b"x" * 70_000 + b'"}',
        ]
    ),
)


def snapshot(client: httpx.Client) -> list[Any]:
    out = []
    for path in SNAPSHOT:
        result = client.get(path).json()["result"]
        if isinstance(result, dict):
            # Spend moves with traffic; only configuration must stay put.
            result = {
                k: v
                for k, v in result.items()
                if "current_spending" not in k
                and k not in ("percentage_used", "alert_thresholds_triggered")
            }
        out.append(result)
    return out


def check_envelope(response: httpx.Response, context: Any) -> None:
    assert response.status_code < 500, (context, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert body["success"] is False, context
        assert body["errors"] and body["errors"][0]["message"], context


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    target=st.sampled_from(WRITES),
    body=st.one_of(shaped, json_values),
    segment=st.text(max_size=20),
)
def test_admin_api_json_fuzz(
    stack: Stack, target: tuple[str, str], body: Any, segment: str
) -> None:
    method, path = target
    path = path.replace("{x}", quote(segment or "x", safe=""))
    with httpx.Client(base_url=stack.admin_url, headers=ADMIN, timeout=10) as client:
        before = snapshot(client)
        response = client.request(
            method,
            path,
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        check_envelope(response, (method, path, body))
        if response.status_code >= 400:
            assert snapshot(client) == before, (method, path, body)
        elif method != "GET":
            # A valid write: undo it so later examples start from the same state.
            undo(client, method, path, response)


def undo(client: httpx.Client, method: str, path: str, response: httpx.Response) -> None:
    result = response.json()["result"]
    if path == "/v1/service-tokens" and method == "POST":
        client.delete(f"/v1/service-tokens/{result['id']}")
    elif path == "/v1/spend-limits" and method == "POST":
        client.delete(f"/v1/spend-limits/{result['name']}")
    elif path.endswith("spending-limit"):
        client.delete(path)
    elif path.endswith("spending-caps"):
        client.post(
            path,
            json={
                "monthly_spending_budget": None,
                "hard_spending_cap": None,
                "hard_cap_enabled": False,
            },
        )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(target=st.sampled_from(WRITES), body=raw_bodies)
def test_admin_api_raw_body_fuzz(stack: Stack, target: tuple[str, str], body: bytes) -> None:
    method, path = target
    path = path.replace("{x}", "x")
    with httpx.Client(base_url=stack.admin_url, headers=ADMIN, timeout=10) as client:
        before = snapshot(client)
        response = client.request(method, path, content=body)
        check_envelope(response, (method, path, body[:50]))
        if response.status_code >= 400:
            assert snapshot(client) == before


def test_an_admin_body_naming_a_member_twice_is_refused_and_changes_nothing(stack: Stack) -> None:
    body = (
        b'{"name": "twice", "budget_usd": 1, "budget_usd": 1000,'
        b' "window": {"fixed": "daily"}, "action": "block"}'
    )
    with httpx.Client(base_url=stack.admin_url, headers=ADMIN, timeout=10) as client:
        before = snapshot(client)
        json_type = {"content-type": "application/json"}
        response = client.post("/v1/spend-limits", content=body, headers=json_type)
        assert response.status_code == 400, response.text
        check_envelope(response, body)
        assert "the member 'budget_usd' appears twice" in response.json()["errors"][0]["message"]
        assert snapshot(client) == before
        # The same rule, each member once, is taken: the refusal was the duplicate.
        once = body.replace(b' "budget_usd": 1,', b"")
        created = client.post("/v1/spend-limits", content=once, headers=json_type)
        assert created.status_code == 201, created.text
        client.delete("/v1/spend-limits/twice")


header_names = st.sampled_from(
    [
        "authorization",
        "Authorization",
        "AUTHORIZATION",
        "cf-access-jwt-assertion",
        "Cf-Access-Jwt-Assertion",
        "cf-access-client-id",
        "cf-access-client-secret",
        "cookie",
        "cf-aig-metadata",
        "x-sidecar-email",
        "X-Sidecar-Route",
        "content-type",
        "x-request-id",
    ]
)
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    st.sampled_from(
        [
            "Bearer ",
            "Bearer a.b.c",
            "Bearer " + "e" * 9_000,
            "Basic Zm9vOmJhcg==",
            "CF_Authorization=",
            "CF_Authorization=x.y.z; a=b",
            '{"a":1}',
            "eyJhbGciOiJub25lIn0.e30.",
            "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x",
        ]
    ),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    body=st.one_of(raw_bodies, shaped.map(lambda d: json.dumps(d).encode())),
    with_token=st.booleans(),
)
def test_check_path_fuzz(
    stack: Stack, issuer: DevIssuer, headers: list[tuple[str, str]], body: bytes, with_token: bool
) -> None:
    # HTTP itself forbids surrounding whitespace in values: the client would refuse to send.
    pairs = [(name, value.strip() or "x") for name, value in headers]
    if with_token:
        pairs.append(("authorization", f"Bearer {issuer.mint('fuzz@example.com')}"))
    response = httpx.post(
        stack.envoy_url + "/openai/v1/chat/completions", content=body, headers=pairs, timeout=20
    )
    # 413 and 431 are Envoy's own answers to a body over 1 MiB and to headers over its
    # 60 KiB limit; nothing may fail on the server side.
    assert response.status_code in (200, 400, 401, 403, 413, 429, 431), (
        response.status_code,
        pairs,
        body[:80],
        response.text[:200],
    )
    if response.status_code in (400, 401, 403, 429):
        assert response.json()["success"] is False
