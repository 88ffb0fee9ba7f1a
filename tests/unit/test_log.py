"""The redaction processor: credentials never survive into a log event."""

from __future__ import annotations

from sidecar.log import REDACTED, redact

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQ"


def test_secret_keys_and_jwt_shapes_are_redacted() -> None:
    event = redact(None, "info", {
        "event": "x",
        "authorization": "Bearer abc",
        "cookie": "CF_Authorization=abc",
        "client_secret": "s3cret",
        "headers": {"Authorization": "Bearer zzz", "x-ok": "fine", "cf-access-client-secret": "q"},
        "message": f"failed to verify {JWT} for user",
        "note": "bearer sk-live-abc, then more",
        "token_name": "nightly-agent",
        "user": "alice@example.com",
    })
    assert event["authorization"] == REDACTED
    assert event["cookie"] == REDACTED
    assert event["client_secret"] == REDACTED
    assert event["headers"] == {"Authorization": REDACTED, "x-ok": "fine",
                                "cf-access-client-secret": REDACTED}
    assert JWT not in event["message"] and REDACTED in event["message"]
    assert "sk-live-abc" not in event["note"]
    assert event["token_name"] == "nightly-agent"
    assert event["user"] == "alice@example.com"
