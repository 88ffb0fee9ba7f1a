"""ext_authz translation: a CheckRequest becomes the RequestAttrs the engine judges, and a
Decision becomes the CheckResponse Envoy acts on. Nothing else happens here."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.rpc import code_pb2

from sidecar.envoy.authz import (
    BODY_HEADER,
    METADATA_NAMESPACE,
    OVERWRITE,
    attrs_from_check,
    check_response,
    check_response_bytes,
)
from sidecar.headers import clean
from sidecar.model import Decision, Identity, Reason

ALICE = Identity(kind="user", subject="u-1", email="alice@example.com", groups=("ml", "eng"))


def check_request(
    *,
    method: str = "POST",
    path: str = "/openai/v1/chat/completions",
    headers: dict[str, str] | None = None,
    header_map: Sequence[tuple[str, str | bytes]] = (),
    body: str = "",
    raw_body: bytes = b"",
    request_id: str = "",
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.id = method, path, request_id
    http.headers.update(headers or {})
    for key, value in header_map:
        entry = http.header_map.headers.add()
        entry.key = key
        if isinstance(value, bytes):
            entry.raw_value = value
        else:
            entry.value = value
    http.body, http.raw_body = body, raw_body
    return request


# -- CheckRequest → RequestAttrs ------------------------------------------------------


def test_method_path_headers_and_body_are_carried_over() -> None:
    attrs = attrs_from_check(
        check_request(
            headers={"Authorization": "Bearer t", "X-Request-Id": "rid-1"},
            raw_body=b'{"model": "gpt-4o"}',
            request_id="envoy-7",
        )
    )
    assert (attrs.method, attrs.path) == ("POST", "/openai/v1/chat/completions")
    assert attrs.headers == {"authorization": "Bearer t", "x-request-id": "rid-1"}
    assert attrs.body == b'{"model": "gpt-4o"}'
    assert attrs.request_id == "rid-1"
    assert attrs.model_hint == ""


def test_duplicate_headers_are_joined_with_a_comma_as_envoy_does() -> None:
    attrs = attrs_from_check(
        check_request(
            header_map=[
                ("X-Sidecar-Model", "gpt-4o"),
                ("x-sidecar-model", "cheap"),
                ("Accept", "a/b"),
            ]
        )
    )
    assert attrs.headers == {"x-sidecar-model": "gpt-4o,cheap", "accept": "a/b"}


def test_header_map_values_sent_raw_are_decoded_and_joined_with_the_map() -> None:
    attrs = attrs_from_check(
        check_request(
            headers={"x-tag": "one"},
            header_map=[("x-tag", b"two"), ("x-bin", b"caf\xc3\xa9"), ("x-bad", b"\xff")],
        )
    )
    assert attrs.headers["x-tag"] == "one,two"
    assert attrs.headers["x-bin"] == "café"
    # Undecodable bytes cannot pass as something else: they become U+FFFD.
    assert attrs.headers["x-bad"] == "\ufffd"


def test_a_body_sent_as_text_is_read_as_utf8_bytes() -> None:
    attrs = attrs_from_check(check_request(body='{"model": "modèle"}'))
    assert attrs.body == '{"model": "modèle"}'.encode()


def test_the_raw_body_wins_over_the_text_body() -> None:
    attrs = attrs_from_check(check_request(body="text", raw_body=b"raw"))
    assert attrs.body == b"raw"


def test_envoys_id_stands_in_when_the_request_has_no_x_request_id() -> None:
    assert attrs_from_check(check_request(request_id="envoy-7")).request_id == "envoy-7"
    assert (
        attrs_from_check(
            check_request(headers={"x-request-id": ""}, request_id="envoy-7")
        ).request_id
        == "envoy-7"
    )


def test_a_check_request_with_nothing_in_it_becomes_empty_attributes() -> None:
    attrs = attrs_from_check(external_auth_pb2.CheckRequest())
    assert (attrs.method, attrs.path, dict(attrs.headers), attrs.body, attrs.request_id) == (
        "",
        "",
        {},
        None,
        "",
    )


# -- Decision → CheckResponse ---------------------------------------------------------


def allowed(**fields: object) -> Decision:
    return Decision(allowed=True, http_status=200, reason="ok", identity=ALICE, **fields)  # type: ignore[arg-type]


def headers_of(options: Iterable[Any]) -> list[tuple[str, str, int]]:
    return [(o.header.key, o.header.value, o.append_action) for o in options]


def metadata(response: external_auth_pb2.CheckResponse) -> dict[str, object]:
    return dict(json_format.MessageToDict(response.dynamic_metadata)[METADATA_NAMESPACE])


def test_an_allowed_decision_overwrites_the_upstream_headers_and_removes_the_empty_ones() -> None:
    response = check_response(
        allowed(
            headers={"x-sidecar-user": "alice@example.com", "x-sidecar-route": ""},
            remove_headers=("cookie", "authorization"),
            response_headers={"x-sidecar-budget-remaining": "0.090000"},
            upstream_secrets={"authorization": "Bearer sk-provider"},
        )
    )
    assert response.status.code == code_pb2.OK
    ok = response.ok_response
    assert headers_of(ok.headers) == [
        ("x-sidecar-user", "alice@example.com", OVERWRITE),
        ("authorization", "Bearer sk-provider", OVERWRITE),
    ]
    # An empty value is a removal, so a client-sent value of that header cannot survive.
    assert list(ok.headers_to_remove) == ["authorization", "cookie", "x-sidecar-route"]
    assert headers_of(ok.response_headers_to_add) == [
        ("x-sidecar-budget-remaining", "0.090000", OVERWRITE)
    ]
    assert not response.HasField("denied_response")


def test_control_characters_in_header_values_become_spaces() -> None:
    response = check_response(allowed(headers={"x-sidecar-user": "a\r\nx-evil: 1\x00\x7f"}))
    [(_, value, _)] = headers_of(response.ok_response.headers)
    assert value == "a  x-evil: 1  "


def test_the_body_rewrite_is_asked_for_only_when_ext_proc_must_change_the_body() -> None:
    rewrite = check_response(allowed(), "ext_proc")
    assert (BODY_HEADER, "rewrite", OVERWRITE) in headers_of(rewrite.ok_response.headers)
    assert "body" not in metadata(rewrite)
    lua = check_response(allowed(), "insert_usage_option")
    assert BODY_HEADER not in [k for k, _, _ in headers_of(lua.ok_response.headers)]
    assert metadata(lua)["body"] == "insert_usage_option"
    assert BODY_HEADER not in [
        k for k, _, _ in headers_of(check_response(allowed()).ok_response.headers)
    ]


def test_metadata_names_the_caller_the_model_and_the_prompt_tokens() -> None:
    response = check_response(allowed(model="gpt-4o", input_tokens=42))
    assert metadata(response) == {
        "decision": "ok",
        "kind": "user",
        "subject": "u-1",
        "email": "alice@example.com",
        "groups": "ml,eng",
        "token_name": "",
        "model": "gpt-4o",
        "input_tokens": 42.0,
    }


def test_metadata_of_an_anonymous_refusal_has_only_the_decision() -> None:
    refused = Decision(allowed=False, http_status=401, reason="missing_credentials")
    assert metadata(check_response(refused)) == {"decision": "missing_credentials"}


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        (400, "bad_request", code_pb2.INVALID_ARGUMENT),
        (401, "invalid_token", code_pb2.UNAUTHENTICATED),
        (403, "model_not_allowed", code_pb2.PERMISSION_DENIED),
        (429, "spend_limit_exceeded", code_pb2.RESOURCE_EXHAUSTED),
        (503, "store_unavailable", code_pb2.UNAVAILABLE),
        (418, "bad_request", code_pb2.UNKNOWN),
    ],
)
def test_a_refusal_is_answered_with_its_status_headers_and_body(
    status: int, reason: Reason, code: int
) -> None:
    body = json.dumps({"success": False, "error": {"type": reason}}).encode()
    response = check_response(
        Decision(
            allowed=False,
            http_status=status,
            reason=reason,
            body=body,
            headers={"content-type": "application/json", "retry-after": "30"},
            upstream_secrets={"authorization": "Bearer sk-provider"},
        )
    )
    assert response.status.code == code
    denied = response.denied_response
    assert denied.status.code == status
    assert headers_of(denied.headers) == [
        ("content-type", "application/json", OVERWRITE),
        ("retry-after", "30", OVERWRITE),
    ]
    assert json.loads(denied.body) == {"success": False, "error": {"type": reason}}
    # A refusal goes back to the client: no provider key in it, no upstream answer.
    assert "sk-provider" not in str(response)
    assert not response.HasField("ok_response")


# -- The wire bytes are the message the protobuf API builds -----------------------------


def _reference(decision: Decision, action: str = "") -> external_auth_pb2.CheckResponse:
    """The CheckResponse for `decision` built field by field with the protobuf API, as the
    sidecar once did: what the bytes it writes directly must parse to."""

    def add(options: Any, items: Iterable[tuple[str, str]]) -> None:
        for name, value in items:
            option = options.add()
            option.header.key = name
            option.header.value = value if value.isprintable() else clean(value)
            option.append_action = OVERWRITE

    response = external_auth_pb2.CheckResponse()
    fields = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    fields["decision"].string_value = decision.reason
    if decision.identity is not None:
        fields["kind"].string_value = decision.identity.kind
        fields["subject"].string_value = decision.identity.subject
        fields["email"].string_value = decision.identity.email
        fields["groups"].string_value = ",".join(decision.identity.groups)
        fields["token_name"].string_value = decision.identity.token_name
    if decision.model:
        fields["model"].string_value = decision.model
    if decision.input_tokens:
        fields["input_tokens"].number_value = decision.input_tokens
    if action == "insert_usage_option":
        fields["body"].string_value = action
    if decision.allowed:
        response.status.code = code_pb2.OK
        ok = response.ok_response
        add(ok.headers, ((k, v) for k, v in decision.headers.items() if v))
        add(ok.headers, decision.upstream_secrets.items())
        if action == "ext_proc":
            add(ok.headers, ((BODY_HEADER, "rewrite"),))
        ok.headers_to_remove.extend(
            sorted({*decision.remove_headers, *(k for k, v in decision.headers.items() if not v)})
        )
        add(ok.response_headers_to_add, decision.response_headers.items())
        return response
    codes = {
        400: code_pb2.INVALID_ARGUMENT,
        401: code_pb2.UNAUTHENTICATED,
        403: code_pb2.PERMISSION_DENIED,
        429: code_pb2.RESOURCE_EXHAUSTED,
        503: code_pb2.UNAVAILABLE,
    }
    response.status.code = codes.get(decision.http_status, code_pb2.UNKNOWN)
    denied = response.denied_response
    denied.status.code = decision.http_status
    add(denied.headers, decision.headers.items())
    denied.body = decision.body.decode()
    return response


LONG = "v" * 200  # a length past one varint byte
HUGE = "w" * 20_000  # past two
ROBOT = Identity(kind="service", subject="s-9", groups=(), token_name="nightly ✓")
SHAPES: list[tuple[Decision, str]] = [
    (allowed(), ""),
    (
        allowed(
            headers={
                "x-sidecar-email": "alice@example.com",
                "x-sidecar-groups": "",
                "x-sidecar-request-id": "a" * 32,
                "x-sidecar-model": "gpt-4o",
                "cookie": "a=1; b=ü",
                "x-long": LONG,
                "x-huge": HUGE,
                "x-evil": "a\r\nx-evil: 1\x00\x7f",
            },
            remove_headers=("cf-access-jwt-assertion", "x-sidecar-spoof"),
            response_headers={
                "x-ratelimit-limit-requests": "100",
                "x-ratelimit-remaining-requests": "99",
                "x-sidecar-budget-remaining": "0.090000",
            },
            upstream_secrets={"authorization": "Bearer sk-provider", "x-api-key": "k\n"},
            model="gpt-4o",
            provider="openai",
            input_tokens=123_456,
            request_id="a" * 32,
        ),
        "",
    ),
    (allowed(model="claude-ü", input_tokens=7, request_id="r"), "ext_proc"),
    (allowed(model="gpt-4o", request_id="r"), "insert_usage_option"),
    (Decision(allowed=True, http_status=200, reason="fallback", identity=ROBOT), ""),
    (Decision(allowed=False, http_status=401, reason="missing_credentials"), ""),
    (
        Decision(
            allowed=False,
            http_status=429,
            reason="spend_limit_exceeded",
            headers={"content-type": "application/json", "retry-after": "7", "x-long": LONG},
            body=b'{"success":false,"error":{"message":"' + HUGE.encode() + b'"}}',
            identity=ALICE,
            model="gpt-4o",
        ),
        "",
    ),
    (
        Decision(
            allowed=False,
            http_status=418,  # no gRPC code of its own: UNKNOWN
            reason="bad_request",
            headers={"x-bad": "\x00"},
            body="ü".encode(),
        ),
        "",
    ),
]


@pytest.mark.parametrize(("decision", "action"), SHAPES)
def test_the_written_response_is_the_message_the_protobuf_api_builds(
    decision: Decision, action: Any
) -> None:
    reference = _reference(decision, action)
    written = check_response_bytes(decision, action)
    assert external_auth_pb2.CheckResponse.FromString(written) == reference
    # Again, from the caller's part written once.
    assert check_response_bytes(decision, action) == written
    # Field by field too, which is what Envoy reads.
    parsed = external_auth_pb2.CheckResponse.FromString(written)
    assert parsed.WhichOneof("http_response") == reference.WhichOneof("http_response")
    assert headers_of(parsed.ok_response.headers) == headers_of(reference.ok_response.headers)
    assert metadata(parsed) == metadata(reference)


def test_long_values_a_client_chooses_are_never_kept_between_checks() -> None:
    # A careless or hostile client sends a new long cookie and model name on every call:
    # the answers stay right, and none of those values stays in memory after its answer.
    from sidecar.envoy import authz, check_wire

    for n in range(200):
        decision = allowed(
            headers={"cookie": f"k={n}" + "c" * 10_000, "x-sidecar-model": "m" * 5_000},
            model=f"model-{n}-" + "m" * 5_000,
        )
        parsed = external_auth_pb2.CheckResponse.FromString(check_response_bytes(decision))
        assert parsed == _reference(decision)
    kept = [
        *authz._OK_HEADERS._written.values(),
        *check_wire._entries.values(),
    ]
    assert all(len(field) <= check_wire.MAX_CACHED_BYTES for field in kept)
