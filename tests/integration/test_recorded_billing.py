"""Real provider responses, recorded by public projects' test suites, replayed through Envoy:
the ledger holds exactly what the provider billed.

The fake provider serves each file of tests/fixtures/recorded/ byte for byte (streams cut
into odd-sized pieces, so events arrive split); the official SDK is the client. The bill is
computed here from the recording itself with genai-prices' `calc_price`, plus the documented
rules the sidecar follows: Anthropic bills every entry of `usage.iterations`, each at the
model it names (else the request's); server-tool calls cost genai-prices' per-1,000 price.
Nothing of the sidecar's metering or pricing code is used for the expectation.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from genai_prices import Usage, calc_price, data_snapshot
from google import genai
from google.genai import types as genai_types

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from tests.support.ledger import admin_get, eventually

RECORDED = Path(__file__).parents[1] / "fixtures" / "recorded"
MANIFEST: list[dict[str, Any]] = json.loads((RECORDED / "MANIFEST.json").read_text())["recordings"]
PROVIDER = {
    "openai_chat": "openai",
    "openai_responses": "openai",
    "anthropic_messages": "anthropic",
    "gemini": "google",
}
LIMITS = [
    {
        "name": "per-user-daily",
        "budget_usd": 100,
        "window": {"fixed": "daily"},
        "split": ["user"],
        "action": "block",
    }
]
ADMISSION = {"mode": "reserve", "default_max_output_tokens": 1024, "reservation_ttl": "60s"}
# Odd, so events and even UTF-8 sequences are split across the pieces Envoy forwards.
CHUNK_BYTES = "61"
PROMPT = "Replay the recorded answer, please."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("recorded")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer, jwks, f"sqlite:///{workdir}/s.db", spend_limits=LIMITS, admission=ADMISSION
    )
    with running_stack(workdir, issuer, config, replay_dir=RECORDED) as running:
        yield running


# --- the provider's bill, from the recording ----------------------------------------------


def final_response(entry: dict[str, Any]) -> dict[str, Any]:
    """The recorded response as one object: a stream's usage as its events document it."""
    text = (RECORDED / entry["file"]).read_text()
    if not entry["stream"]:
        return dict(json.loads(text))
    events = [
        json.loads(line[len("data: ") :])
        for line in text.splitlines()
        if line.startswith("data: {")
    ]
    if entry["api"] == "gemini":
        # Every chunk carries the running totals: the last one is the whole call's.
        return {"usage": events[-1]["usageMetadata"]}
    if entry["api"] == "openai_chat":
        return {"usage": next(e["usage"] for e in reversed(events) if e.get("usage"))}
    if entry["api"] == "openai_responses":
        return dict(next(e["response"] for e in events if e["type"] == "response.completed"))
    # Anthropic: message_start's usage, then each message_delta's running totals over it.
    usage: dict[str, Any] = {}
    for event in events:
        if event["type"] == "message_start":
            usage.update(event["message"]["usage"])
        elif event["type"] == "message_delta":
            usage.update(event.get("usage") or {})
    return {"usage": usage}


def anthropic_usage(counts: dict[str, Any]) -> Usage:
    read = counts.get("cache_read_input_tokens") or 0
    write = counts.get("cache_creation_input_tokens") or 0
    one_hour = (counts.get("cache_creation") or {}).get("ephemeral_1h_input_tokens") or 0
    return Usage(
        input_tokens=(counts.get("input_tokens") or 0) + read + write,
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=one_hour,
        output_tokens=counts.get("output_tokens") or 0,
    )


def openai_usage(api: str, counts: dict[str, Any], output: list[Any]) -> Usage:
    if api == "openai_chat":
        prompt, details = counts["prompt_tokens"], counts.get("prompt_tokens_details") or {}
        return Usage(
            input_tokens=prompt,
            cache_read_tokens=details.get("cached_tokens") or 0,
            output_tokens=counts["completion_tokens"],
        )
    details = counts.get("input_tokens_details") or {}
    # OpenAI bills a web_search_call only when its action is a search.
    searches = sum(
        1
        for item in output
        if item.get("type") == "web_search_call"
        and (item.get("action") or {}).get("type", "search") == "search"
    )
    file_searches = sum(1 for item in output if item.get("type") == "file_search_call")
    return Usage(
        input_tokens=counts["input_tokens"],
        cache_read_tokens=details.get("cached_tokens") or 0,
        output_tokens=counts["output_tokens"],
        web_searches=searches,
        storage_searches=file_searches,
    )


def gemini_usage(counts: dict[str, Any]) -> Usage:
    # Google bills thinking tokens as output; cached tokens are part of the prompt count.
    return Usage(
        input_tokens=counts["promptTokenCount"],
        cache_read_tokens=counts.get("cachedContentTokenCount") or 0,
        output_tokens=counts.get("candidatesTokenCount", 0) + counts.get("thoughtsTokenCount", 0),
    )


def provider_bill(entry: dict[str, Any]) -> dict[str, Decimal]:
    """USD per model the provider bills for the recorded response."""
    model, provider = entry["model"], PROVIDER[entry["api"]]
    response = final_response(entry)
    if provider == "google":
        counts = response.get("usageMetadata") or response["usage"]
        return {model: calc_price(gemini_usage(counts), model, provider_id=provider).total_price}
    counts = response["usage"]
    if provider == "openai":
        usage = openai_usage(entry["api"], counts, response.get("output") or [])
        return {model: calc_price(usage, model, provider_id=provider).total_price}
    bill: dict[str, Decimal] = {}
    steps = counts.get("iterations") or [counts]
    for step in steps:
        step_model = step.get("model") or model
        price = calc_price(anthropic_usage(step), step_model, provider_id=provider).total_price
        bill[step_model] = bill.get(step_model, Decimal(0)) + price
    searches = (counts.get("server_tool_use") or {}).get("web_search_requests") or 0
    if searches:
        fee = calc_price(
            Usage(input_tokens=0, output_tokens=0, web_searches=searches),
            model,
            provider_id=provider,
        ).total_price
        bill[model] += fee
    return bill


def to_micros(usd: Decimal, rounding: str) -> int:
    return int((usd * 1_000_000).to_integral_value(rounding=rounding))


def model_id(model: str, provider: str) -> str:
    """The name the ledger counts a model under: the one genai-prices resolves it to."""
    return str(
        data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)[1].id
    ).lower()


def ledger_split(entry: dict[str, Any]) -> dict[str, int]:
    """µUSD per model as the ledger must book it: rounded up once per request; a model other
    than the request's gets its share rounded down, the request's model the rest."""
    provider = PROVIDER[entry["api"]]
    bill: dict[str, Decimal] = {}
    for model, usd in provider_bill(entry).items():
        name = model_id(model, provider)
        bill[name] = bill.get(name, Decimal(0)) + usd
    request_model = model_id(entry["model"], provider)
    total = to_micros(sum(bill.values(), Decimal(0)), ROUND_CEILING)
    others = {m: to_micros(usd, ROUND_FLOOR) for m, usd in bill.items() if m != request_model}
    return {request_model: total - sum(others.values()), **others}


# --- replaying ----------------------------------------------------------------------------


def replay(stack: Stack, issuer: DevIssuer, entry: dict[str, Any], email: str) -> None:
    token = issuer.mint(email)
    headers = {"x-fake-replay": entry["file"], "x-fake-chunk-bytes": CHUNK_BYTES}
    model, api, stream = entry["model"], entry["api"], entry["stream"]
    if api == "gemini":
        gemini = genai.Client(
            api_key="client-key",
            http_options=genai_types.HttpOptions(
                base_url=stack.envoy_url + "/gemini/",
                api_version="v1beta",
                headers={"authorization": f"Bearer {token}", **headers},
            ),
        )
        if stream:
            pieces = list(gemini.models.generate_content_stream(model=model, contents=PROMPT))
            assert pieces[-1].usage_metadata is not None
        else:
            answer = gemini.models.generate_content(model=model, contents=PROMPT)
            assert answer.usage_metadata is not None
        return
    if api == "anthropic_messages":
        client = anthropic.Anthropic(
            base_url=stack.envoy_url + "/anthropic",
            api_key="sk-ant-fake",
            max_retries=0,
            timeout=60,
            default_headers={"authorization": f"Bearer {token}"},
        )
        messages: Any = [{"role": "user", "content": PROMPT}]
        if stream:
            events = list(
                client.messages.create(
                    model=model,
                    max_tokens=4096,
                    stream=True,
                    messages=messages,
                    extra_headers=headers,
                )
            )
            assert events[-1].type == "message_stop"
        else:
            message = client.messages.create(
                model=model, max_tokens=4096, messages=messages, extra_headers=headers
            )
            assert message.usage.output_tokens > 0
        return
    oa = openai.OpenAI(
        base_url=stack.envoy_url + "/openai/v1", api_key=token, max_retries=0, timeout=60
    )
    if api == "openai_chat":
        chat_messages: Any = [{"role": "user", "content": PROMPT}]
        if stream:
            chunks = list(
                oa.chat.completions.create(
                    model=model,
                    messages=chat_messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=headers,
                )
            )
            assert chunks[-1].usage is not None
        else:
            completion = oa.chat.completions.create(
                model=model, messages=chat_messages, extra_headers=headers
            )
            assert completion.usage is not None
        return
    if stream:
        updates = list(
            oa.responses.create(model=model, input=PROMPT, stream=True, extra_headers=headers)
        )
        assert updates[-1].type == "response.completed"
    else:
        response = oa.responses.create(model=model, input=PROMPT, extra_headers=headers)
        assert response.usage is not None


def booked(stack: Stack, email: str) -> dict[str, int] | None:
    rows = [r for r in admin_get(stack, "/v1/usage", group_by="user,model") if r["user"] == email]
    if sum(r["requests"] for r in rows) < 1:
        return None
    return {r["model"]: int(r["cost_usd"] * 1_000_000) for r in rows}


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_recorded_response_is_billed_as_the_provider_bills_it(
    stack: Stack, issuer: DevIssuer, entry: dict[str, Any]
) -> None:
    email = f"rec-{uuid.uuid4().hex[:8]}@recorded.test"
    replay(stack, issuer, entry, email)
    want = ledger_split(entry)
    last: list[dict[str, int] | None] = [None]

    def settled() -> bool | None:
        last[0] = booked(stack, email)
        return True if last[0] == want else None

    try:
        eventually(settled, what=f"{entry['file']} booked as {want}")
    except AssertionError:
        raise AssertionError(f"{entry['file']}: want {want}, ledger has {last[0]}") from None


def test_the_corpus_covers_every_billing_feature() -> None:
    features = {f for entry in MANIFEST for f in entry["features"]}
    assert {
        "cache_read",
        "cache_write",
        "reasoning",
        "thinking",
        "web_search_fee",
        "file_search_fee",
        "compaction",
        "advisor",
        "unknown_iteration_type",
        "gemini_thinking",
        "cumulative_usage",
    } <= features
    assert {(e["api"], e["stream"]) for e in MANIFEST} == {
        (api, stream) for api in PROVIDER for stream in (False, True)
    }
    for entry in MANIFEST:
        source = entry["source"]
        assert (RECORDED / entry["file"]).is_file()
        assert len(source["commit"]) == 40 and source["repository"] and source["path"]
