"""Metering through a real Envoy with the official SDKs: what each call is charged.

Expected costs are computed here from the fake provider's deterministic token counts and
genai-prices' own `calc_price`, never from sidecar code. Each test uses its own user so its
ledger row is its own.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import replace
from decimal import Decimal
from typing import Any, TypeVar

import anthropic
import grpc
import httpx
import openai
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from devtools.config import demo_config
from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from sidecar import cli
from sidecar.metering.parse import Api
from sidecar.model import TokenUsage
from sidecar.proto_gen.sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.support.ledger import admin_get, charged, eventually, ledger_row
from tests.support.prices import genai_micros

T = TypeVar("T")
DAILY_LIMIT_USD = Decimal(5)
LIMITS = [
    {
        "name": "per-user-daily",
        "budget_usd": float(DAILY_LIMIT_USD),
        "window": {"fixed": "daily"},
        "split": ["user"],
        "action": "block",
    },
    {
        "name": "pricey-fallback",
        "budget_usd": 0.000001,
        "window": {"rolling": "1h"},
        "filter": {"model": ["gpt-4o", "claude-opus-4-7"]},
        "action": "fallback",
    },
]
FALLBACKS = {
    "gpt-4o": [{"model": "gpt-4o-mini", "provider": "openai"}],
    "claude-opus-4-7": [{"model": "claude-haiku-4-5", "provider": "anthropic"}],
}
# Short, so a reservation that no completion ever replaces turns into a charge within the
# test; long enough that, on a busy machine, a completion still arrives before it.
ADMISSION = {"mode": "reserve", "default_max_output_tokens": 1024, "reservation_ttl": "8s"}
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-haiku-4-5"
SLOW = {"x-fake-delay-ms": "250"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("metering")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        f"sqlite:///{workdir}/s.db",
        spend_limits=LIMITS,
        fallbacks=FALLBACKS,
        admission=ADMISSION,
    )
    with running_stack(workdir, issuer, config) as running:
        yield running


# --- independent expectations -------------------------------------------------------------


def expected(api: Api, body: dict[str, Any], model: str, provider: str) -> tuple[TokenUsage, int]:
    usage = expected_usage(api, body)
    return usage, genai_micros(usage, model, provider)


def micros(usd: Decimal) -> int:
    return int(usd * 1_000_000)


# --- reading the sidecar ------------------------------------------------------------------


def my_budget(stack: Stack, token: str) -> dict[str, Any]:
    response = httpx.get(
        stack.admin_url + "/v1/budgets/me", headers={"authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    rows = json.loads(response.text, parse_float=Decimal)["result"]
    (row,) = [r for r in rows if r["rule"] == "per-user-daily"]
    return dict(row)


def user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}@metering.test"


def openai_client(stack: Stack, token: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.envoy_url + "/openai/v1", api_key=token, max_retries=0, timeout=60
    )


def anthropic_client(stack: Stack, token: str) -> anthropic.Anthropic:
    # The Access JWT goes in Authorization; the SDK also sends x-api-key for the provider.
    return anthropic.Anthropic(
        base_url=stack.envoy_url + "/anthropic",
        api_key="sk-ant-fake",
        default_headers={"authorization": f"Bearer {token}"},
        max_retries=0,
        timeout=60,
    )


def assert_charged(
    stack: Stack, email: str, usage: TokenUsage, cost: int, requests: int = 1
) -> None:
    """The user's ledger row settles at exactly this charge.

    Polled: an SDK stops reading at `data: [DONE]` or `message_stop`, which can reach it just
    before ext_proc has seen the end of the body and committed.
    """
    want = {
        "cost_usd": cost,
        "requests": requests,
        "input_tokens": usage.total_input * requests,
        "output_tokens": usage.output_tokens * requests,
    }
    last: list[dict[str, Any] | None] = [None]

    def probe() -> bool | None:
        row = last[0] = ledger_row(stack, email)
        if row is None:
            return None
        got = {**{k: row[k] for k in want}, "cost_usd": micros(row["cost_usd"])}
        return True if got == want else None

    try:
        eventually(probe, what=f"{email} charged {want}")
    except AssertionError:
        raise AssertionError(f"{email}: want {want}, ledger has {last[0]}") from None


# Typed loosely: the same list goes to both SDKs, whose parameter types differ.
MESSAGES: Any = [{"role": "user", "content": "Count the letters in the word metering, please."}]


# --- OpenAI ---------------------------------------------------------------------------------


def test_openai_non_streaming_is_charged_exactly(stack: Stack, issuer: DevIssuer) -> None:
    email = user("oa-json")
    body = {"model": OPENAI_MODEL, "messages": MESSAGES, "max_tokens": 16}
    completion = openai_client(stack, issuer.mint(email)).chat.completions.create(
        model=OPENAI_MODEL, messages=MESSAGES, max_tokens=16
    )
    usage, cost = expected("openai_chat", body, OPENAI_MODEL, "openai")
    assert completion.usage is not None and completion.usage.prompt_tokens == usage.total_input
    assert_charged(stack, email, usage, cost)


def test_openai_stream_with_include_usage_is_charged_exactly(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("oa-stream")
    body = {"model": OPENAI_MODEL, "messages": MESSAGES, "max_tokens": 12, "stream": True}
    stream = openai_client(stack, issuer.mint(email)).chat.completions.create(
        model=OPENAI_MODEL,
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage, cost = expected("openai_chat", body, OPENAI_MODEL, "openai")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert_charged(stack, email, usage, cost)


def _sidecar_bytes_for_one_stream(stack: Stack, token: str, words: int) -> int:
    """Bytes Envoy sent the sidecar on its `sidecar_grpc` cluster (the access log record;
    the Check goes through `sidecar_grpc_check`) for one finished stream of `words` frames,
    counted once its metering record has arrived."""

    def sent() -> int:
        stats = httpx.get(
            stack.envoy_admin_url + "/stats",
            params={"filter": "sidecar_grpc.upstream_cx_tx_bytes_total"},
        ).text
        return int(stats.rsplit(": ", 1)[1])

    def records() -> float:
        metrics = httpx.get(stack.admin_url + "/metrics").text
        (line,) = [
            x for x in metrics.splitlines() if x.startswith("sidecar_metering_records_total ")
        ]
        return float(line.split()[1])

    before, seen = sent(), records()
    stream = openai_client(stack, token).chat.completions.create(
        model=OPENAI_MODEL,
        messages=MESSAGES,
        max_tokens=words,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == words
    assert len(chunks) > words
    eventually(lambda: records() > seen or None, what="the stream's metering record")
    return sent() - before


def test_finished_streams_record_does_not_grow_with_its_chunks(
    stack: Stack, issuer: DevIssuer
) -> None:
    # Envoy sends the sidecar the first event and the last ones of a finished stream whose
    # usage came, not its body: 400 frames cost the same bytes as 4 (~60 KB more otherwise).
    # The least of three each: now and then Envoy sends the sidecar something else as well.
    email = user("oa-record")
    token = issuer.mint(email)
    short = min(_sidecar_bytes_for_one_stream(stack, token, 4) for _ in range(3))
    long = min(_sidecar_bytes_for_one_stream(stack, token, 400) for _ in range(3))
    assert abs(long - short) < 1024, (short, long)
    body = {"model": OPENAI_MODEL, "messages": MESSAGES, "stream": True}
    cost = 3 * sum(
        expected("openai_chat", {**body, "max_tokens": n}, OPENAI_MODEL, "openai")[1]
        for n in (4, 400)
    )
    row = charged(stack, email, requests=6)
    assert micros(row["cost_usd"]) == cost and row["output_tokens"] == 3 * 404


def test_openai_stream_without_include_usage_gets_it_added(stack: Stack, issuer: DevIssuer) -> None:
    email = user("oa-no-usage")
    stack.clear_seen()
    body = {"model": OPENAI_MODEL, "messages": MESSAGES, "max_tokens": 9, "stream": True}
    chunks = list(
        openai_client(stack, issuer.mint(email)).chat.completions.create(
            model=OPENAI_MODEL, messages=MESSAGES, max_tokens=9, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 9
    # Usage was asked for on the client's behalf, and its event taken out again: the
    # client gets exactly the stream it asked for.
    assert all(c.choices and c.usage is None for c in chunks)
    assert stack.seen()[-1]["body"]["stream_options"] == {"include_usage": True}
    usage, cost = expected("openai_chat", body, OPENAI_MODEL, "openai")
    assert_charged(stack, email, usage, cost)


def test_fallback_is_charged_at_the_fallback_models_price(stack: Stack, issuer: DevIssuer) -> None:
    email = user("oa-fallback")
    response = openai_client(stack, issuer.mint(email)).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=7
    )
    assert response.headers["x-sidecar-fallback-from"] == "gpt-4o"
    body = {"model": OPENAI_MODEL, "messages": MESSAGES, "max_tokens": 7}
    usage, cost = expected("openai_chat", body, OPENAI_MODEL, "openai")
    assert_charged(stack, email, usage, cost)
    rows = admin_get(stack, "/v1/usage", group_by="user,model")
    assert [r["model"] for r in rows if r["user"] == email] == [OPENAI_MODEL]


def test_same_provider_fallback_stream_is_metered_in_its_own_api(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("an-fallback")
    stack.clear_seen()
    with anthropic_client(stack, issuer.mint(email)).messages.stream(
        model="claude-opus-4-7", max_tokens=10, messages=MESSAGES
    ) as stream:
        final = stream.get_final_message()
    # Still the Messages API, now answered by the fallback model.
    assert final.model == ANTHROPIC_MODEL
    assert stack.seen()[-1]["path"] == "/v1/messages"
    body = {"model": ANTHROPIC_MODEL, "max_tokens": 10, "messages": MESSAGES, "stream": True}
    usage, cost = expected("anthropic_messages", body, ANTHROPIC_MODEL, "anthropic")
    assert_charged(stack, email, usage, cost)


# --- Anthropic ------------------------------------------------------------------------------


def test_anthropic_non_streaming_is_charged_exactly(stack: Stack, issuer: DevIssuer) -> None:
    email = user("an-json")
    message = anthropic_client(stack, issuer.mint(email)).messages.create(
        model=ANTHROPIC_MODEL, max_tokens=14, messages=MESSAGES
    )
    body = {"model": ANTHROPIC_MODEL, "max_tokens": 14, "messages": MESSAGES}
    usage, cost = expected("anthropic_messages", body, ANTHROPIC_MODEL, "anthropic")
    assert message.usage.input_tokens == usage.input_tokens
    assert_charged(stack, email, usage, cost)


def test_anthropic_stream_is_charged_exactly(stack: Stack, issuer: DevIssuer) -> None:
    email = user("an-stream")
    client = anthropic_client(stack, issuer.mint(email))
    with client.messages.stream(model=ANTHROPIC_MODEL, max_tokens=11, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    body = {"model": ANTHROPIC_MODEL, "max_tokens": 11, "messages": MESSAGES, "stream": True}
    usage, cost = expected("anthropic_messages", body, ANTHROPIC_MODEL, "anthropic")
    assert final.usage.output_tokens == 11
    assert_charged(stack, email, usage, cost)


# --- gzip -------------------------------------------------------------------------------------


def test_gzip_encoded_responses_are_metered(stack: Stack, issuer: DevIssuer) -> None:
    gzip = {"x-fake-gzip": "1"}
    oa_user, an_user = user("gzip-oa"), user("gzip-an")
    openai_client(stack, issuer.mint(oa_user)).chat.completions.create(
        model=OPENAI_MODEL, messages=MESSAGES, max_tokens=5, extra_headers=gzip
    )
    with anthropic_client(stack, issuer.mint(an_user)).messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=6, messages=MESSAGES, extra_headers=gzip
    ) as stream:
        assert stream.get_final_message().usage.output_tokens == 6
    usage, cost = expected(
        "openai_chat", {"messages": MESSAGES, "max_tokens": 5}, OPENAI_MODEL, "openai"
    )
    assert_charged(stack, oa_user, usage, cost)
    usage, cost = expected(
        "anthropic_messages", {"messages": MESSAGES, "max_tokens": 6}, ANTHROPIC_MODEL, "anthropic"
    )
    assert_charged(stack, an_user, usage, cost)


# --- reservations -----------------------------------------------------------------------------


def test_reservation_is_replaced_by_the_smaller_actual(stack: Stack, issuer: DevIssuer) -> None:
    email = user("reserve")
    token = issuer.mint(email)
    # No max_tokens: the reservation assumes 1024 output tokens, the provider writes 20.
    # Paced to last a couple of seconds: long enough to see the reservation held, well
    # inside reservation_ttl.
    stream = openai_client(stack, token).chat.completions.create(
        model=OPENAI_MODEL, messages=MESSAGES, stream=True, extra_headers={"x-fake-delay-ms": "100"}
    )
    first = next(iter(stream))
    assert first.choices
    held = my_budget(stack, token)
    assert held["spent"] == 0 and held["reserved"] > 0
    list(stream)
    body = {"model": OPENAI_MODEL, "messages": MESSAGES, "stream": True}
    usage, cost = expected("openai_chat", body, OPENAI_MODEL, "openai")
    assert_charged(stack, email, usage, cost)
    after = my_budget(stack, token)
    assert micros(after["spent"]) == cost and after["reserved"] == 0
    assert micros(held["reserved"]) > cost
    assert micros(after["remaining"]) == micros(DAILY_LIMIT_USD) - cost


def test_provider_error_costs_nothing_and_counts_as_an_error(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("error")
    token = issuer.mint(email)
    with pytest.raises(openai.InternalServerError):
        openai_client(stack, token).chat.completions.create(
            model=OPENAI_MODEL,
            messages=MESSAGES,
            max_tokens=40,
            extra_headers={"x-fake-status": "500"},
        )
    row = charged(stack, email)
    # The provider bills an error without usage nothing: the reservation is released at $0.
    assert row["cost_usd"] == 0 and row["errors"] == 1
    assert row["input_tokens"] == row["output_tokens"] == 0
    after = my_budget(stack, token)
    assert after["reserved"] == 0 and after["spent"] == 0


def test_openai_client_gone_mid_stream_is_charged(stack: Stack, issuer: DevIssuer) -> None:
    email = user("oa-gone")
    token = issuer.mint(email)
    stream = openai_client(stack, token).chat.completions.create(
        model=OPENAI_MODEL,
        messages=MESSAGES,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=SLOW,
    )
    for index, _ in enumerate(stream):
        if index == 2:
            break
    stream.close()
    # OpenAI's usage only comes at the end: nothing observed, so the estimate.
    row = charged(stack, email)
    assert row["cost_usd"] > 0 and row["output_tokens"] == 0
    after = eventually(
        lambda: ((b := my_budget(stack, token))["reserved"] == 0 and b) or None,
        what="reservation released",
    )
    assert after["spent"] == row["cost_usd"]


def test_anthropic_client_gone_mid_stream_pays_what_was_seen(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("an-gone")
    token = issuer.mint(email)
    client = anthropic_client(stack, token)
    received = ""
    with client.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=30, messages=MESSAGES, extra_headers=SLOW
    ) as stream:
        for index, event in enumerate(stream):
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                received += event.delta.text
            if index == 3:
                break
    assert received
    # message_start reported the input and the first output token; the output charged is
    # at least the text that reached the client (4 bytes a token), at most the limit.
    body = {"model": ANTHROPIC_MODEL, "max_tokens": 30, "messages": MESSAGES}
    full = expected_usage("anthropic_messages", body)
    reported = TokenUsage(input_tokens=full.input_tokens, output_tokens=1)
    row = charged(stack, email)
    assert (row["input_tokens"], row["output_tokens"]) == (full.input_tokens, 1)
    floor = max(1, -(-len(received.encode()) // 4))
    low = genai_micros(replace(reported, output_tokens=floor), ANTHROPIC_MODEL, "anthropic")
    high = genai_micros(replace(reported, output_tokens=30), ANTHROPIC_MODEL, "anthropic")
    assert low <= micros(row["cost_usd"]) <= high
    assert micros(row["cost_usd"]) > genai_micros(reported, ANTHROPIC_MODEL, "anthropic")


# --- the sidecar.v1 API ----------------------------------------------------------------------


def _check(stack: Stack, token: str, request_id: str, body: dict[str, Any]) -> Any:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path="/openai/v1/chat/completions",
        raw_body=json.dumps(body).encode(),
        headers={
            "authorization": f"Bearer {token}",
            "x-request-id": request_id,
            "content-type": "application/json",
        },
    )
    context = attribute_context_pb2.AttributeContext
    request = external_auth_pb2.CheckRequest(attributes=context(request=context.Request(http=http)))
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        return external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)


def reservation_logged(stack: Stack, email: str) -> str:
    """The reservation of `email`'s decision line (written at the sidecar's next turn of its
    event loop, which may come just after the answer)."""

    def logged() -> str | None:
        for line in stack.sidecars[0].log_path.read_text().splitlines():
            if line.startswith("{") and email in line:
                entry = json.loads(line)
                if entry.get("event") == "decision" and entry.get("reservation"):
                    return str(entry["reservation"])
        return None

    return eventually(logged, timeout=10, what=f"a decision logged for {email}")


def reservation_of(check: Any) -> str:
    """The id the sidecar minted for an admitted Check (set on the upstream request)."""
    (found,) = [
        h.header.value for h in check.ok_response.headers if h.header.key == "x-sidecar-request-id"
    ]
    return str(found)


def _report(stack: Stack, request: Any, token: str | None = None) -> Any:
    metadata = (("authorization", f"Bearer {token or stack.admin_token}"),)
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        return sidecar_pb2_grpc.SidecarStub(channel).ReportUsage(
            request, metadata=metadata, timeout=10
        )


def test_report_usage_commits_once(stack: Stack, issuer: DevIssuer) -> None:
    email = user("reporter")
    token = issuer.mint(email)
    check = _check(
        stack,
        token,
        f"report-{uuid.uuid4().hex}",
        {"model": OPENAI_MODEL, "messages": MESSAGES, "max_tokens": 50},
    )
    assert check.status.code == code_pb2.OK
    request_id = reservation_of(check)
    assert my_budget(stack, token)["reserved"] > 0
    usage = TokenUsage(input_tokens=120, output_tokens=45, cache_read_tokens=30)
    report = sidecar_pb2.ReportUsageRequest(
        request_id=request_id,
        model=OPENAI_MODEL,
        provider="openai",
        input_tokens=120,
        output_tokens=45,
        cache_read_tokens=30,
    )
    cost = genai_micros(usage, OPENAI_MODEL, "openai")
    first = _report(stack, report)
    assert (first.status, first.cost_micros) == (sidecar_pb2.REPORT_STATUS_COMMITTED, cost)
    again = _report(stack, report)
    assert again.status == sidecar_pb2.REPORT_STATUS_DUPLICATE
    row = charged(stack, email)
    assert micros(row["cost_usd"]) == cost and row["requests"] == 1
    assert row["input_tokens"] == 150 and row["output_tokens"] == 45
    budget = my_budget(stack, token)
    assert budget["reserved"] == 0 and micros(budget["spent"]) == cost

    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        budgets = (
            sidecar_pb2_grpc.SidecarStub(channel)
            .GetBudgets(sidecar_pb2.GetBudgetsRequest(bearer=token), timeout=10)
            .budgets
        )
    (mine,) = [b for b in budgets if b.rule == "per-user-daily"]
    assert mine.bucket == f"user={email}" and mine.spent_micros == cost
    assert mine.remaining_micros == micros(DAILY_LIMIT_USD) - cost
    assert mine.resets_at.seconds > time.time()


def test_expired_reservation_pays_its_estimate_until_a_late_report(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("expired")
    token = issuer.mint(email)
    check = _check(
        stack,
        token,
        f"expire-{uuid.uuid4().hex}",
        {"model": OPENAI_MODEL, "messages": MESSAGES, "max_tokens": 500},
    )
    assert check.status.code == code_pb2.OK
    request_id = reservation_of(check)
    held = micros(my_budget(stack, token)["reserved"])
    # Nothing completes it: after reservation_ttl (8 s) the estimate becomes the charge.
    row = charged(stack, email)
    assert micros(row["cost_usd"]) == held and row["output_tokens"] == 0
    assert my_budget(stack, token)["reserved"] == 0
    usage = TokenUsage(input_tokens=40, output_tokens=10)
    late = _report(
        stack,
        sidecar_pb2.ReportUsageRequest(
            request_id=request_id,
            model=OPENAI_MODEL,
            provider="openai",
            input_tokens=40,
            output_tokens=10,
        ),
    )
    assert late.status == sidecar_pb2.REPORT_STATUS_LATE
    cost = genai_micros(usage, OPENAI_MODEL, "openai")
    assert cost < held
    assert_charged(stack, email, usage, cost)
    assert micros(my_budget(stack, token)["spent"]) == cost


def test_replayed_completion_does_not_double_charge(stack: Stack, issuer: DevIssuer) -> None:
    email = user("replay")
    stack.clear_seen()
    openai_client(stack, issuer.mint(email)).chat.completions.create(
        model=OPENAI_MODEL, messages=MESSAGES, max_tokens=8
    )
    usage, cost = expected(
        "openai_chat", {"messages": MESSAGES, "max_tokens": 8}, OPENAI_MODEL, "openai"
    )
    assert_charged(stack, email, usage, cost)
    # The reservation id never leaves Envoy and the sidecar; its decision log names it.
    request_id = reservation_logged(stack, email)
    replay = sidecar_pb2.ReportUsageRequest(
        request_id=request_id,
        model=OPENAI_MODEL,
        provider="openai",
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
    )
    assert _report(stack, replay).status == sidecar_pb2.REPORT_STATUS_DUPLICATE
    assert_charged(stack, email, usage, cost)


def test_report_usage_needs_the_admin_token_and_valid_input(stack: Stack) -> None:
    request = sidecar_pb2.ReportUsageRequest(
        request_id="x", model=OPENAI_MODEL, provider="openai", input_tokens=1
    )
    with pytest.raises(grpc.RpcError) as denied:
        _report(stack, request, token="not-the-admin-token")
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bad = sidecar_pb2.ReportUsageRequest(request_id="x", model=OPENAI_MODEL, provider="nope")
    with pytest.raises(grpc.RpcError) as invalid:
        _report(stack, bad)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = _report(stack, request)
    assert unknown.status == sidecar_pb2.REPORT_STATUS_UNKNOWN
    with (
        grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel,
        pytest.raises(grpc.RpcError) as anonymous,
    ):
        sidecar_pb2_grpc.SidecarStub(channel).GetBudgets(
            sidecar_pb2.GetBudgetsRequest(), timeout=10
        )
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- reports over the whole ledger ------------------------------------------------------------


def _settled(stack: Stack) -> tuple[Decimal, list[dict[str, Any]]] | None:
    """Totals once two reads in a row agree (no charge landed in between)."""
    first = admin_get(stack, "/v1/usage")
    time.sleep(0.5)
    rows = admin_get(stack, "/v1/usage", group_by="user")
    total = admin_get(stack, "/v1/usage")
    if first != total or not total:
        return None
    return Decimal(total[0]["cost_usd"]), rows


def test_usage_history_sums_equal_the_charges(stack: Stack, issuer: DevIssuer) -> None:
    # Something of our own, so the ledger is never empty whatever ran before.
    openai_client(stack, issuer.mint(user("history"))).chat.completions.create(
        model=OPENAI_MODEL, messages=MESSAGES, max_tokens=3
    )
    total, by_user = eventually(lambda: _settled(stack), what="a settled ledger")
    assert sum(Decimal(r["cost_usd"]) for r in by_user) == total
    path = "/accounts/acme/ai-gateway/billing/usage-history"
    now_ms = int(time.time() * 1000)
    for window in ("day", "hour"):
        history = admin_get(
            stack,
            path,
            value_grouping_window=window,
            start_time=str(now_ms - 86_400_000),
            end_time=str(now_ms),
        )["history"]
        assert history and sum(Decimal(h["aggregated_value"]) for h in history) == total
        for bucket in history:
            assert bucket["end_time"] > bucket["start_time"]
            assert bucket["id"].endswith("Z")
    with httpx.Client(timeout=10) as client:
        wrong = client.get(
            stack.admin_url + path.replace("acme", "other"),
            params={"value_grouping_window": "day"},
            headers={"authorization": f"Bearer {stack.admin_token}"},
        )
    assert wrong.status_code == 404


def test_cli_usage_table_and_json(
    stack: Stack, issuer: DevIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    email = user("cli")
    openai_client(stack, issuer.mint(email)).chat.completions.create(
        model=OPENAI_MODEL, messages=MESSAGES, max_tokens=4
    )
    usage, cost = expected(
        "openai_chat", {"messages": MESSAGES, "max_tokens": 4}, OPENAI_MODEL, "openai"
    )
    assert_charged(stack, email, usage, cost)
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", stack.admin_token)
    out = io.StringIO()
    with redirect_stdout(out):
        assert (
            cli.main(
                [
                    "usage",
                    "--url",
                    stack.admin_url,
                    "--by",
                    "user,model",
                    "--since",
                    "24h",
                    "--json",
                ]
            )
            == 0
        )
    data = json.loads(out.getvalue(), parse_float=Decimal)
    (row,) = [r for r in data["rows"] if r["user"] == email]
    assert micros(row["cost_usd"]) == cost and row["model"] == OPENAI_MODEL
    assert data["total"]["cost_usd"] >= row["cost_usd"]
    table = io.StringIO()
    with redirect_stdout(table):
        assert (
            cli.main(["usage", "--url", stack.admin_url, "--by", "group", "--window", "day"]) == 0
        )
    lines = table.getvalue().splitlines()
    assert lines[0].split() == [
        "WINDOW_START",
        "GROUP",
        "COST_USD",
        "REQUESTS",
        "INPUT",
        "OUTPUT",
        "ERRORS",
    ]
    assert lines[-1].startswith("TOTAL")
    assert len({len(line) for line in lines[:-2]}) == 1  # aligned columns
    monkeypatch.delenv("SIDECAR_ADMIN_TOKEN")
    assert cli.main(["usage", "--url", stack.admin_url]) == 1
