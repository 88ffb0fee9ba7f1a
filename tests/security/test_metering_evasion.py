"""Metering cannot be switched off by the caller: not with `include_usage: false`, not by
naming a small limit next to a large one, not by hanging up before the usage arrives."""

from __future__ import annotations

from google.rpc import code_pb2
from openai.types.chat import ChatCompletionMessageParam

from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.model import TokenUsage
from tests.security.conftest import REPLAY_MODEL, check, micros, openai_client, user
from tests.support.ledger import charged
from tests.support.prices import genai_micros

MODEL = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say a few words, please."}
]
SLOW = {"x-fake-delay-ms": "300"}


def price(usage: TokenUsage) -> int:
    return genai_micros(usage, MODEL, "openai")


def test_include_usage_false_is_still_charged_its_real_usage(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("no-usage")
    stream = openai_client(stack, issuer.mint(email)).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": False},
    )
    chunks = list(stream)
    # The client gets what it asked for: no usage event...
    assert chunks and all(c.usage is None for c in chunks)
    # ...and the ledger gets the provider's own count, not an estimate.
    usage = expected_usage("openai_chat", {"messages": MESSAGES, "max_tokens": 12})
    row = charged(stack, email)
    assert (row["input_tokens"], row["output_tokens"]) == (usage.total_input, 12)
    assert micros(row["cost_usd"]) == price(usage)


def test_estimate_takes_the_largest_output_limit_named(stack: Stack, issuer: DevIssuer) -> None:
    # $0.003 a day on this model at $0.001 an output token: 2,000 cannot fit, 1 can.
    headers = {"authorization": f"Bearer {issuer.mint(user('small-limit'))}"}
    small = {"model": REPLAY_MODEL, "messages": MESSAGES, "max_tokens": 1}
    both = {**small, "max_completion_tokens": 2000}
    refused = check(stack, headers, both)
    assert refused.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert refused.denied_response.status.code == 429
    assert check(stack, headers, small).status.code == code_pb2.OK


def test_estimate_counts_every_answer_asked_for(stack: Stack, issuer: DevIssuer) -> None:
    # $0.003 a day at $0.001 an output token: four answers of one token cannot fit, one can.
    headers = {"authorization": f"Bearer {issuer.mint(user('many-answers'))}"}
    one = {"model": REPLAY_MODEL, "messages": MESSAGES, "max_tokens": 1}
    refused = check(stack, headers, {**one, "n": 4})
    assert refused.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert refused.denied_response.status.code == 429
    assert check(stack, headers, one).status.code == code_pb2.OK


def test_an_output_limit_too_large_to_be_real_is_400(stack: Stack, issuer: DevIssuer) -> None:
    headers = {"authorization": f"Bearer {issuer.mint(user('huge-limit'))}"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10**30}
    refused = check(stack, headers, body)
    assert refused.denied_response.status.code == 400
    assert "output limit" in refused.denied_response.body


def test_hanging_up_before_the_usage_pays_for_the_text_received(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("hang-up")
    # No output limit named: the reservation holds default_max_output_tokens (2), while
    # the model writes 20 tokens. Hanging up before the usage event must not cap the charge.
    stream = openai_client(stack, issuer.mint(email), **SLOW).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True
    )
    received = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += chunk.choices[0].delta.content
        if len(received.encode()) >= 40:
            break
    stream.close()
    row = charged(stack, email)
    prompt = expected_usage("openai_chat", {"messages": MESSAGES}).total_input
    reserved_output = price(TokenUsage(output_tokens=2))
    at_least = price(TokenUsage(output_tokens=-(-len(received.encode()) // 4)))
    assert micros(row["cost_usd"]) >= at_least > reserved_output
    assert row["requests"] == 1 and prompt > 0
