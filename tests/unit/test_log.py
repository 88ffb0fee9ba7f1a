"""The redaction processor: credentials never survive into a log event; and the per-request
lines written without the processor chain are the chain's lines, byte for byte."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import sidecar.log as log_module
from sidecar.log import REDACTED, redact

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQ"


def test_secret_keys_and_jwt_shapes_are_redacted() -> None:
    event = redact(
        None,
        "info",
        {
            "event": "x",
            "authorization": "Bearer abc",
            "cookie": "CF_Authorization=abc",
            "client_secret": "s3cret",
            "headers": {
                "Authorization": "Bearer zzz",
                "x-ok": "fine",
                "cf-access-client-secret": "q",
            },
            "message": f"failed to verify {JWT} for user",
            "note": "bearer sk-live-abc, then more",
            "token_name": "nightly-agent",
            "user": "alice@example.com",
        },
    )
    assert event["authorization"] == REDACTED
    assert event["cookie"] == REDACTED
    assert event["client_secret"] == REDACTED
    assert event["headers"] == {
        "Authorization": REDACTED,
        "x-ok": "fine",
        "cf-access-client-secret": REDACTED,
    }
    assert JWT not in event["message"] and REDACTED in event["message"]
    assert "sk-live-abc" not in event["note"]
    assert event["token_name"] == "nightly-agent"
    assert event["user"] == "alice@example.com"


# -- the per-request lines written without the processor chain ---------------------------

Captured = pytest.CaptureFixture[str]
STAMP = re.compile(r'"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"')


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """What the process writes to stderr; `configure` in the test body logs there."""
    yield capsys
    structlog.reset_defaults()
    log_module._fast = None


def _both(out: pytest.CaptureFixture[str], event: str, fields: dict[str, Any]) -> tuple[str, str]:
    """The line through the chain, then the same call through `info`; timestamps masked."""
    logger = structlog.get_logger("sidecar.decision")
    logger.info(event, **fields)
    log_module.info(logger, event, **fields)
    slow, fast = out.readouterr().err.splitlines()
    return STAMP.sub('"timestamp": "T"', slow), STAMP.sub('"timestamp": "T"', fast)


CASES: list[dict[str, Any]] = [
    {
        "request_id": "3f1c0a6e",
        "reservation": "a" * 32,
        "decision": "allow",
        "status": 200,
        "reason": "ok",
        "kind": "user",
        "user": "bench@example.com",
        "groups": ["eng", "ml"],
        "token_name": None,
        "model": "gpt-4o-mini",
        "provider": "openai",
        "rules": ["a", "b"],
        "estimate_usd": "0.000123",
        "ms": 0.523,
    },
    # Client-chosen values: a JWT, a bearer credential, quotes, control and non-ASCII text.
    {
        "request_id": f"x {JWT} y",
        "model": 'Bearer sk-live-abc\n"q"',
        "user": "zoë@例え.jp",
        "groups": ("a", "b"),
        "ms": 1e-05,
        "flag": True,
        "off": False,
        "n": -3,
    },
    # Keys that name secrets, and token_name, which does not.
    {"authorization": "Bearer x", "api_key": "k", "token_name": "nightly", "empty": []},
]


@pytest.mark.parametrize("fields", CASES)
def test_the_fast_line_is_the_chains_line_byte_for_byte(
    stderr: pytest.CaptureFixture[str], fields: dict[str, Any]
) -> None:
    log_module.configure("info")
    slow, fast = _both(stderr, "decision", fields)
    assert fast == slow
    assert JWT not in fast and "sk-live-abc" not in fast
    assert json.loads(fast)["event"] == "decision"


def test_a_workers_static_fields_come_after_the_event_in_both(stderr: Captured) -> None:
    log_module.configure("info", static={"worker": 1, "pid": 4242})
    slow, fast = _both(stderr, "completion", {"request_id": "r", "cost_usd": "0.01"})
    assert fast == slow
    assert list(json.loads(fast)) == [
        "request_id",
        "cost_usd",
        "event",
        "worker",
        "pid",
        "level",
        "timestamp",
    ]


def test_values_only_json_dumps_renders_go_through_the_chain(stderr: Captured) -> None:
    log_module.configure("info")
    slow, fast = _both(
        stderr, "decision", {"headers": {"Authorization": "x"}, "ratio": float("inf"), "worker": 3}
    )
    assert fast == slow


def test_captured_logs_still_see_the_event(stderr: Captured) -> None:
    log_module.configure("info")
    with capture_logs() as logs:
        log_module.info(structlog.get_logger("x"), "decision", user="u")
    assert logs == [{"event": "decision", "user": "u", "log_level": "info"}]
    assert stderr.readouterr().err == ""


def test_nothing_is_written_below_the_configured_level(stderr: Captured) -> None:
    log_module.configure("warning")
    log_module.info(structlog.get_logger("x"), "decision", user="u")
    assert stderr.readouterr().err == ""


DECISION_KEYS = tuple(CASES[0])


def test_a_fixed_line_is_the_chains_line_byte_for_byte(stderr: Captured) -> None:
    log_module.configure("info", static={"worker": 0, "pid": 7})
    line = log_module.Line("decision", DECISION_KEYS, trusted=("reason", "status", "ms"))
    logger = structlog.get_logger("sidecar.decision")
    for fields in (
        CASES[0],
        {
            **CASES[0],
            "request_id": f"a {JWT}",
            "user": None,
            "groups": None,
            "model": "bearer sk-live-abc",
            "ms": 2.0,
        },
    ):
        logger.info("decision", **fields)
        line.info(logger, **fields)
        slow, fast = (
            STAMP.sub('"timestamp": "T"', text) for text in stderr.readouterr().err.splitlines()
        )
        assert fast == slow
        assert JWT not in fast and "sk-live-abc" not in fast


def test_a_fixed_line_with_its_keys_out_of_order_goes_through_the_chain(stderr: Captured) -> None:
    log_module.configure("info")
    line = log_module.Line("decision", ("a", "b"))
    logger = structlog.get_logger("sidecar.decision")
    line.info(logger, b=1, a="x")
    logger.info("decision", b=1, a="x")
    fast, slow = (
        STAMP.sub('"timestamp": "T"', text) for text in stderr.readouterr().err.splitlines()
    )
    assert fast == slow
    assert list(json.loads(fast))[:2] == ["b", "a"]


def test_a_secret_named_key_of_a_fixed_line_is_hidden(stderr: Captured) -> None:
    log_module.configure("info")
    log_module.Line("x", ("api_key", "token_name"), trusted=("api_key",)).info(
        structlog.get_logger("x"), api_key="sk-1", token_name="nightly"
    )
    event = json.loads(stderr.readouterr().err)
    assert event["api_key"] == REDACTED and event["token_name"] == "nightly"


def test_a_logger_factory_set_after_configure_gets_the_lines(stderr: Captured) -> None:
    log_module.configure("info")
    sink = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sink))
    log_module.info(structlog.get_logger("x"), "decision", user="u")
    log_module.Line("decision", ("user",)).info(structlog.get_logger("x"), user="u")
    assert stderr.readouterr().err == ""
    assert [json.loads(text)["user"] for text in sink.getvalue().splitlines()] == ["u", "u"]
