"""The decision line written directly is the line the processor chain writes for the same
decision, byte for byte (timestamp aside), for allows, denies and client-chosen values."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

import sidecar.log as log_module
from sidecar.decision_log import KEYS, LOGGER, fields, log_decision
from sidecar.model import Decision, Identity, RequestAttrs

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQ"
STAMP = re.compile(r'"timestamp": "[^"]+"')
ALICE = Identity(kind="user", subject="u-1", email="Alice@Example.com ", groups=("eng", "ml"))
ROBOT = Identity(kind="service", subject="s-1", groups=(), token_name="nightly")

DECISIONS = [
    Decision(
        allowed=True,
        http_status=200,
        reason="ok",
        identity=ALICE,
        model="gpt-4o-mini",
        provider="openai",
        rules=("per-user-daily", "org-monitor"),
        estimate=1234,
        request_id="a" * 32,
    ),
    Decision(
        allowed=True,
        http_status=200,
        reason="fallback",
        identity=ROBOT,
        model="gpt-4.1-nano",
        provider="openai",
        rules=("mini",),
        estimate=0,
        request_id="b" * 32,
    ),
    Decision(allowed=False, http_status=401, reason="missing_credentials"),
    Decision(
        allowed=False,
        http_status=429,
        reason="spend_limit_exceeded",
        identity=ALICE,
        model=f"Bearer sk-live-abc {JWT}",
        rules=(f"rule {JWT}",),
        estimate=10**12 + 7,
    ),
    # Client-chosen and claimed values: a JWT, a bearer credential, quotes, control and
    # non-ASCII text.
    Decision(
        allowed=True,
        http_status=200,
        reason="ok",
        identity=Identity(
            kind="user", subject="x", email='zoë@例え.jp"\n', groups=(f"g {JWT}", "bearer tok")
        ),
        model='gpt"\u2028',
        provider="openai",
    ),
]
ATTRS = [
    RequestAttrs("POST", "/v1/chat/completions", {}, None, "3f1c0a6e"),
    RequestAttrs("POST", "/v1/chat/completions", {}, None, f"x {JWT} y"),
    RequestAttrs("POST", "/v1/chat/completions", {}, None, "Bearer sk-live-abc"),
    RequestAttrs("POST", "/v1/chat/completions", {}, None, ""),
]


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    yield capsys
    structlog.reset_defaults()
    log_module._fast = None


@pytest.mark.parametrize("static", [None, {"worker": 1, "pid": 4242}])
@pytest.mark.parametrize("decision", DECISIONS)
def test_the_direct_line_is_the_chains_line_byte_for_byte(
    stderr: pytest.CaptureFixture[str], decision: Decision, static: dict[str, int] | None
) -> None:
    log_module.configure("info", static=static)
    for attrs in ATTRS:
        for seconds in (0.000523, 2.0, 1e-9):
            structlog.get_logger(LOGGER).info("decision", **fields(attrs, decision, seconds))
            log_decision(attrs, decision, seconds)
            # Twice: the second time from the rendered caller and rule list.
            log_decision(attrs, decision, seconds)
            slow, fast, again = (
                STAMP.sub('"timestamp": "T"', text) for text in stderr.readouterr().err.splitlines()
            )
            assert fast == slow == again
            assert list(json.loads(fast))[: len(KEYS) + 1] == [*KEYS, "event"]
            assert JWT not in fast and "sk-live-abc" not in fast and "bearer tok" not in fast


def test_the_timestamp_is_the_chains_format(stderr: pytest.CaptureFixture[str]) -> None:
    log_module.configure("info")
    log_decision(ATTRS[0], DECISIONS[0], 0.001)
    stamp = json.loads(stderr.readouterr().err)["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp)


def test_captured_logs_see_the_decision_fields(stderr: pytest.CaptureFixture[str]) -> None:
    log_module.configure("info")
    with capture_logs() as logs:
        log_decision(ATTRS[0], DECISIONS[0], 0.001)
    assert logs == [
        {**fields(ATTRS[0], DECISIONS[0], 0.001), "event": "decision", "log_level": "info"}
    ]
    assert logs[0]["user"] == "alice@example.com"
    assert stderr.readouterr().err == ""


def test_nothing_is_written_below_the_configured_level(
    stderr: pytest.CaptureFixture[str],
) -> None:
    log_module.configure("warning")
    log_decision(ATTRS[0], DECISIONS[0], 0.001)
    assert stderr.readouterr().err == ""


def test_long_claims_are_rendered_each_time_and_never_kept(
    stderr: pytest.CaptureFixture[str],
) -> None:
    from sidecar import decision_log

    log_module.configure("info")
    big = Identity(kind="user", subject="s", email="big@example.com", groups=("g" * 5_000,))
    decision = Decision(allowed=True, http_status=200, reason="ok", identity=big)
    log_decision(ATTRS[0], decision, 0.001)
    log_decision(ATTRS[0], decision, 0.001)
    first, second = stderr.readouterr().err.splitlines()
    assert json.loads(first)["groups"] == ["g" * 5_000] == json.loads(second)["groups"]
    assert id(big) not in decision_log._identities
