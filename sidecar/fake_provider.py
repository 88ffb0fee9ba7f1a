"""A deterministic stand-in for provider endpoints, for tests and local demos: OpenAI chat,
Responses and embeddings, Anthropic messages, Gemini (`v1beta/models/{model}:...`), Azure
OpenAI (`openai/deployments/{deployment}/...`) and Bedrock Runtime (`model/{id}/converse`,
`converse-stream`, `invoke`, `invoke-with-response-stream`, streams in the binary event
stream framing); their shapes are in `sidecar.fake_apis`.

Usage is a pure function of the request body (`expected_usage`), so a test can compute the
cost the sidecar should charge without trusting the sidecar. Request headers steer it:
`x-fake-delay-ms` (pause between stream frames, or before a JSON answer), `x-fake-status`
(answer that error status with the provider's error shape), `x-fake-gzip: 1` (gzip the
body, streams included). `GET /_seen` shows what arrived here; `DELETE /_seen` forgets it.

Keys are checked per provider prefix when configured (`--key openai=sk-...`, repeatable; a
prefix may accept several keys): a call without one of them is answered 401 with the
provider's error shape, as the real provider would. Anthropic reads `x-api-key`, Gemini
`x-goog-api-key`, Azure `api-key`, the others `Authorization: Bearer`; Bedrock's signatures
are not checked. The provider is the path prefix, else the Host a proxy addressed
(Envoy strips prefixes and sets Host to the provider's). A provider without configured keys
accepts any call.

Replaying recorded responses: started with `--replay-dir DIR`, a request with
`x-fake-replay: NAME` is answered with the file DIR/NAME exactly as stored: `NAME.json` as a
JSON body, `NAME.sse` as an event stream, cut into pieces of `x-fake-chunk-bytes` bytes
(default: one event per piece) so a recorded stream can be delivered split anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import secrets
import time
import zlib
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sidecar import fake_apis
from sidecar.metering.bedrock import EVENTSTREAM_MEDIA
from sidecar.metering.parse import Api
from sidecar.model import TokenUsage

API_PATHS: Mapping[str, Api] = {
    "/v1/chat/completions": "openai_chat",
    "/v1/responses": "openai_responses",
    "/v1/messages": "anthropic_messages",
    "/v1/embeddings": "openai_embeddings",
}
PREFIXES = ("", "/openai", "/anthropic", "/workers-ai", "/gemini", "/azure", "/bedrock",
            "/groq")
# Paths that name the model (or Azure deployment) themselves.
_GEMINI_PATH = "/v1beta/models/{call:path}"
_BEDROCK_PATH = "/model/{call:path}"
_AZURE_PATHS: Mapping[str, Api] = {
    "/openai/deployments/{deployment}/chat/completions": "openai_chat",
    "/openai/deployments/{deployment}/embeddings": "openai_embeddings",
}
_BEDROCK_OPERATIONS: Mapping[str, tuple[Api, bool]] = {
    "converse": ("bedrock_converse", False),
    "converse-stream": ("bedrock_converse", True),
    "invoke": ("bedrock_invoke", False),
    "invoke-with-response-stream": ("bedrock_invoke", True),
}
# Provider names for --key: the prefix without its slash ("openai"), "" for no prefix.
KEY_PROVIDERS = tuple(prefix.lstrip("/") for prefix in PREFIXES)
INPUT_OVERHEAD_TOKENS = 8
DEFAULT_OUTPUT_TOKENS = 20
MAX_OUTPUT_TOKENS = 2000
SEEN_LIMIT = 100
ECHOED_HEADER_PREFIXES = ("x-sidecar-", "x-request-id")

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
_INPUT_KEYS: Mapping[Api, tuple[str, ...]] = {
    "openai_chat": ("messages",),
    "openai_responses": ("instructions", "input"),
    "anthropic_messages": ("system", "messages"),
    "openai_embeddings": ("input",),
    "gemini": ("systemInstruction", "contents"),
    "bedrock_converse": ("system", "messages"),
    "bedrock_invoke": ("system", "messages"),
}
# Output limits, each a path of keys into the body.
_LIMIT_KEYS: Mapping[Api, tuple[tuple[str, ...], ...]] = {
    "openai_chat": (("max_completion_tokens",), ("max_tokens",), ("max_output_tokens",)),
    "openai_responses": (("max_output_tokens",), ("max_completion_tokens",), ("max_tokens",)),
    "anthropic_messages": (("max_tokens",), ("max_completion_tokens",), ("max_output_tokens",)),
    "openai_embeddings": (),
    "gemini": (("generationConfig", "maxOutputTokens"),),
    "bedrock_converse": (("inferenceConfig", "maxTokens"),),
    "bedrock_invoke": (("max_tokens",),),
}
# Gemini thinking: the thought tokens a request with a thinking budget reports, at most.
GEMINI_MAX_THOUGHTS = 24
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _text(value: Any) -> str:
    """Every piece of text in a message, content list, or content part."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(item) for item in value)
    if isinstance(value, dict):
        return _text(value.get("text")) + _text(value.get("content")) + _text(value.get("parts"))
    return ""


def _has_cache_control(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_cache_control(item) for item in value)
    return isinstance(value, dict) and (
        "cache_control" in value or any(_has_cache_control(v) for v in value.values())
    )


def _requested_output(api: Api, body: Mapping[str, Any]) -> int | None:
    for keys in _LIMIT_KEYS[api]:
        value: Any = body
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def gemini_thoughts(body: Mapping[str, Any]) -> int:
    """Thought tokens Gemini reports for `body`: its thinking budget, capped."""
    config = body.get("generationConfig")
    thinking = config.get("thinkingConfig") if isinstance(config, dict) else None
    # The API takes both spellings; google-genai sends the snake-case one here.
    budget = (thinking.get("thinkingBudget", thinking.get("thinking_budget"))
              if isinstance(thinking, dict) else None)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        return 0
    return min(budget, GEMINI_MAX_THOUGHTS)


def expected_usage(api: Api, body: Mapping[str, Any]) -> TokenUsage:
    """The usage this provider reports for `body`.

    Input: total characters of all message text // 4 (at least 1), plus a fixed overhead.
    Output: the request's output-token limit capped at MAX_OUTPUT_TOKENS, else
    DEFAULT_OUTPUT_TOKENS; none for embeddings; plus Gemini's thought tokens
    (`gemini_thoughts`). Cache, so the cache fields can be tested without state: an
    OpenAI request with `prompt_cache_key` or a Gemini request with `cachedContent` reads
    half its input from cache; an Anthropic request (on Bedrock too) with any
    `cache_control` reads half and writes a quarter.
    """
    chars = sum(len(_text(body.get(key))) for key in _INPUT_KEYS[api])
    prompt = max(chars // 4, 1) + INPUT_OVERHEAD_TOKENS
    output = min(_requested_output(api, body) or DEFAULT_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)
    if api == "openai_embeddings":
        return TokenUsage(input_tokens=prompt)
    if api == "gemini":
        cached = prompt // 2 if body.get("cachedContent") else 0
        return TokenUsage(prompt - cached, output + gemini_thoughts(body), cached)
    if api == "bedrock_converse":
        return TokenUsage(input_tokens=prompt, output_tokens=output)
    if api in ("anthropic_messages", "bedrock_invoke"):
        if not _has_cache_control(body):
            return TokenUsage(input_tokens=prompt, output_tokens=output)
        read, write = prompt // 2, prompt // 4
        return TokenUsage(prompt - read - write, output, read, write)
    cached = prompt // 2 if body.get("prompt_cache_key") else 0
    return TokenUsage(prompt - cached, output, cache_read_tokens=cached)


def output_words(count: int) -> list[str]:
    """The generated text, one stream delta per entry; joined they form the whole text."""
    return [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(count)]


def _hit_limit(api: Api, body: Mapping[str, Any], usage: TokenUsage) -> bool:
    return _requested_output(api, body) == usage.output_tokens


def _chat_usage(usage: TokenUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.total_input,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_input + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _responses_usage(usage: TokenUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.total_input,
        "input_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_input + usage.output_tokens,
    }


def _anthropic_usage(usage: TokenUsage, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "output_tokens": output_tokens,
    }


def _sse(data: Mapping[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class _Answer:
    """One request's reply, as a JSON body or as the SSE frames of the same content."""

    def __init__(self, api: Api, body: Mapping[str, Any]) -> None:
        self.api, self.body, self.model = api, body, str(body["model"])
        self.usage = expected_usage(api, body)
        self.words = output_words(self.usage.output_tokens)
        self.text = "".join(self.words)
        self.limited = _hit_limit(api, body, self.usage)
        self.created = int(time.time())
        self.id = secrets.token_hex(12)

    def json(self) -> dict[str, Any]:
        if self.api == "openai_chat":
            message = {"role": "assistant", "content": self.text, "refusal": None}
            return {
                **self._chat_base("chat.completion"),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": self._stop(),
                    }
                ],
                "usage": _chat_usage(self.usage),
            }
        if self.api == "openai_responses":
            return self._response("completed", [self._item("completed")])
        return {
            "id": f"msg_{self.id}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": self._stop(),
            "stop_sequence": None,
            "usage": _anthropic_usage(self.usage, self.usage.output_tokens),
        }

    def frames(self) -> Iterator[bytes]:
        if self.api == "openai_chat":
            return self._chat_frames()
        if self.api == "openai_responses":
            return self._responses_frames()
        return self._anthropic_frames()

    def _stop(self) -> str:
        if self.api == "anthropic_messages":
            return "max_tokens" if self.limited else "end_turn"
        return "length" if self.limited else "stop"

    def _chat_base(self, kind: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self.id}",
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
        }

    def _chat_frames(self) -> Iterator[bytes]:
        options = self.body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            frame = {**self._chat_base("chat.completion.chunk"), "choices": [choice]}
            if with_usage:
                frame["usage"] = None
            return _sse(frame)

        yield chunk({"role": "assistant", "content": "", "refusal": None})
        for word in self.words:
            yield chunk({"content": word})
        yield chunk({}, self._stop())
        if with_usage:
            base = self._chat_base("chat.completion.chunk")
            yield _sse({**base, "choices": [], "usage": _chat_usage(self.usage)})
        yield b"data: [DONE]\n\n"

    def _item(self, status: str) -> dict[str, Any]:
        done = status == "completed"
        part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
        return {
            "id": f"msg_{self.id}",
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [part] if done else [],
        }

    def _response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        done = status == "completed"
        return {
            "id": f"resp_{self.id}",
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": self.body.get("instructions"),
            "max_output_tokens": self.body.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": _responses_usage(self.usage) if done else None,
            "metadata": {},
        }

    def _responses_frames(self) -> Iterator[bytes]:
        sequence = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(sequence), **fields}, kind)

        at = {"item_id": f"msg_{self.id}", "output_index": 0, "content_index": 0}
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.created", response=self._response("in_progress", []))
        yield event("response.in_progress", response=self._response("in_progress", []))
        yield event("response.output_item.added", output_index=0, item=self._item("in_progress"))
        yield event("response.content_part.added", **at, part=empty_part)
        for word in self.words:
            yield event("response.output_text.delta", **at, delta=word, logprobs=[])
        yield event("response.output_text.done", **at, text=self.text, logprobs=[])
        done = self._item("completed")
        yield event("response.content_part.done", **at, part=done["content"][0])
        yield event("response.output_item.done", output_index=0, item=done)
        yield event("response.completed", response=self._response("completed", [done]))

    def _anthropic_frames(self) -> Iterator[bytes]:
        start = {**self.json(), "content": [], "stop_reason": None}
        start["usage"] = _anthropic_usage(self.usage, 1)
        yield _sse({"type": "message_start", "message": start}, "message_start")
        block = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        yield _sse(block, "content_block_start")
        yield _sse({"type": "ping"}, "ping")
        for word in self.words:
            text = {"type": "text_delta", "text": word}
            yield _sse(
                {"type": "content_block_delta", "index": 0, "delta": text}, "content_block_delta"
            )
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        # Anthropic's usage here is the running total for the message, not an increment.
        final = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop(), "stop_sequence": None},
            "usage": {"output_tokens": self.usage.output_tokens},
        }
        yield _sse(final, "message_delta")
        yield _sse({"type": "message_stop"}, "message_stop")


def _error_body(api: Api, status: int, message: str) -> dict[str, Any]:
    if api == "gemini":
        return fake_apis.gemini_error(status, message)
    if api in ("bedrock_converse", "bedrock_invoke"):
        return fake_apis.bedrock_error(status, message)
    if api == "anthropic_messages":
        kind = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": message}}
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    else:
        kind, code = ("server_error" if status >= 500 else "invalid_request_error"), None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _headers(request: Request) -> dict[str, str]:
    joined: dict[str, str] = {}
    for name, value in request.headers.items():
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined


def _echo(request: Request) -> dict[str, str]:
    seen = {k: v for k, v in _headers(request).items() if k.startswith(ECHOED_HEADER_PREFIXES)}
    return {"x-fake-seen-headers": json.dumps(seen, sort_keys=True)}


def _delay_seconds(request: Request) -> float:
    try:
        millis = float(request.headers.get("x-fake-delay-ms", "0"))
    except ValueError:
        return 0.0
    return min(max(millis, 0.0), 60_000.0) / 1000


def _json_response(request: Request, payload: Mapping[str, Any], status: int = 200) -> Response:
    content = json.dumps(payload).encode()
    headers = _echo(request)
    if request.headers.get("x-fake-gzip") == "1":
        content = _gzip(content)
        headers["content-encoding"] = "gzip"
    return Response(content, status, headers, media_type="application/json")


def _gzip(content: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(content) + compressor.flush()


async def _paced(frames: Iterator[bytes], delay: float, gzip: bool) -> AsyncIterator[bytes]:
    compressor = zlib.compressobj(wbits=31) if gzip else None
    for index, frame in enumerate(frames):
        if index and delay:
            await asyncio.sleep(delay)
        if compressor is None:
            yield frame
        else:
            # A sync flush per frame lets the client decode each event as it arrives.
            yield compressor.compress(frame) + compressor.flush(zlib.Z_SYNC_FLUSH)
    if compressor is not None:
        yield compressor.flush()


Handler = Callable[[Request], Awaitable[Response]]
# (api, model, stream) read from a path that names the model; stream None: the body says.
PathCall = tuple[Api, str, bool | None]
_REPLAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.(json|sse)")


def _pieces(content: bytes, size: int) -> Iterator[bytes]:
    if size <= 0:
        events = content.split(b"\n\n")
        yield from (event + b"\n\n" for event in events[:-1])
        if events[-1]:
            yield events[-1]
        return
    yield from (content[i:i + size] for i in range(0, len(content), size))


def _replay(request: Request, api: Api, replay_dir: Path | None, name: str) -> Response:
    """A recorded response, byte for byte."""
    match = _REPLAY_NAME.fullmatch(name)
    path = replay_dir / name if replay_dir is not None and match else None
    if path is None or not path.is_file():
        message = f"no recorded response {name!r} (start with --replay-dir)"
        return _json_response(request, _error_body(api, 404, message), 404)
    content = path.read_bytes()
    if name.endswith(".json"):
        return Response(content, 200, _echo(request), media_type="application/json")
    size_header = request.headers.get("x-fake-chunk-bytes", "0")
    size = int(size_header) if size_header.isdigit() else 0
    stream = _paced(_pieces(content, size), _delay_seconds(request), gzip=False)
    return StreamingResponse(stream, headers=_echo(request), media_type="text/event-stream")




def presented_key(provider: str, headers: Mapping[str, str]) -> str:
    """The key a call to `provider` presents, where that provider reads it."""
    if provider == "anthropic":
        return headers.get("x-api-key", "")
    if provider == "gemini":
        return headers.get("x-goog-api-key", "")
    if provider == "azure":
        return headers.get("api-key", "")
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _key_error(provider: str, api: Api, headers: Mapping[str, str],
               keys: Mapping[str, Collection[str]]) -> dict[str, Any] | None:
    expected = keys.get(provider)
    if not expected or presented_key(provider, headers) in expected:
        return None
    if provider == "anthropic":
        return _error_body("anthropic_messages", 401, "invalid x-api-key")
    if provider == "gemini":
        return _error_body("gemini", 401, "API key not valid. Please pass a valid API key.")
    error = _error_body(api, 401, "Incorrect API key provided.")
    error["error"]["code"] = "invalid_api_key"
    return error


_HOSTS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic",
          "api.cloudflare.com": "workers-ai", "generativelanguage.googleapis.com": "gemini",
          "api.groq.com": "groq"}
_HOST_SUFFIXES = {".openai.azure.com": "azure", ".amazonaws.com": "bedrock"}


def provider_of(path: str, host: str) -> str:
    """Which provider a call is for: its path prefix, else the Host a proxy addressed it to
    (Envoy strips the prefix and rewrites Host to the provider's), else "" (none)."""
    first = path.split("/", 2)[1] if path.startswith("/") else ""
    if path.startswith("/openai/deployments/"):
        first = "azure"  # Azure OpenAI's own path, not the OpenAI prefix
    if first in KEY_PROVIDERS and first:
        return first
    name = host.split(":", 1)[0].lower()
    for suffix, provider in _HOST_SUFFIXES.items():
        if name.endswith(suffix):
            return provider
    return _HOSTS.get(name, "")


def _gemini_call(request: Request) -> PathCall | None:
    model, sep, verb = str(request.path_params["call"]).rpartition(":")
    if not sep or verb not in ("generateContent", "streamGenerateContent"):
        return None
    return "gemini", model, verb == "streamGenerateContent"


def _bedrock_call(request: Request) -> PathCall | None:
    # The model id arrives percent-encoded (an ARN holds `/` and `:`); the path parameter is
    # already decoded.
    model, _, operation = str(request.path_params["call"]).rpartition("/")
    found = _BEDROCK_OPERATIONS.get(operation)
    return (found[0], model, found[1]) if found and model else None


def _azure_call(api: Api) -> Callable[[Request], PathCall | None]:
    def call(request: Request) -> PathCall | None:
        # Azure streams as OpenAI does: `stream` in the body.
        return api, str(request.path_params["deployment"]), None
    return call


async def _answer(request: Request, api: Api, body: dict[str, Any], stream: bool) -> Response:
    """The reply to a valid call, as JSON or as the API's stream."""
    delay = _delay_seconds(request)
    gzip = request.headers.get("x-fake-gzip") == "1"
    frames: Iterator[bytes] | None = None
    payload: dict[str, Any]
    media = "text/event-stream"
    model = str(body["model"])
    if api in ("openai_chat", "openai_responses", "anthropic_messages"):
        answer = _Answer(api, body)
        frames, payload = (answer.frames(), {}) if stream else (None, answer.json())
    elif api == "openai_embeddings":
        payload = fake_apis.embeddings_json(model, body, expected_usage(api, body))
    elif api == "bedrock_invoke":
        answer = _Answer("anthropic_messages", body)
        if stream:
            frames = fake_apis.invoke_frames(answer.frames(), answer.usage)
            media = EVENTSTREAM_MEDIA
        payload = answer.json()
    else:
        usage = expected_usage(api, body)
        thoughts = gemini_thoughts(body) if api == "gemini" else 0
        words = output_words(usage.output_tokens - thoughts)
        limited = _requested_output(api, body) == usage.output_tokens - thoughts
        if api == "gemini":
            payload = fake_apis.gemini_json(model, usage, thoughts, words, limited)
            frames = fake_apis.gemini_frames(model, usage, thoughts, words, limited)
        else:
            payload = fake_apis.converse_json(usage, words, limited)
            frames = fake_apis.converse_frames(usage, words, limited)
            media = EVENTSTREAM_MEDIA
    if stream and frames is not None:
        headers = _echo(request) | ({"content-encoding": "gzip"} if gzip else {})
        return StreamingResponse(_paced(frames, delay, gzip), headers=headers, media_type=media)
    if delay:
        await asyncio.sleep(delay)
    return _json_response(request, payload)


def create_app(keys: Mapping[str, Collection[str]] | None = None,
               replay_dir: Path | None = None) -> Starlette:
    """`keys`: the keys each provider prefix accepts; `replay_dir`: recorded responses (see
    the module doc)."""
    accepted = {name: frozenset(values) for name, values in (keys or {}).items()}
    unknown_names = set(accepted) - set(KEY_PROVIDERS)
    if unknown_names:
        raise ValueError(f"unknown provider(s) {sorted(unknown_names)}; "
                         f"choose from {KEY_PROVIDERS}")
    seen: deque[dict[str, Any]] = deque(maxlen=SEEN_LIMIT)

    async def record(request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        entry = {"method": request.method, "path": request.url.path, "headers": _headers(request)}
        seen.append({**entry, "body": body})
        return body

    def endpoint(api: Api, call: Callable[[Request], PathCall | None] | None = None
                 ) -> Handler:
        """`call`: for paths that name the model, (api, model, stream) from the path, or
        None for a path that names no known operation."""
        async def handle(request: Request) -> Response:
            body = await record(request)
            found = call(request) if call is not None else None
            if call is not None and found is None:
                return await unknown(request)
            call_api = found[0] if found else api
            provider = provider_of(request.url.path, request.headers.get("host", ""))
            refused = _key_error(provider, call_api, request.headers, accepted)
            if refused is not None:
                return _json_response(request, refused, 401)
            status_header = request.headers.get("x-fake-status")
            if status_header is not None:
                status = int(status_header) if status_header.isdigit() else 0
                if not 400 <= status <= 599:
                    message = "x-fake-status must be an HTTP error status (400-599)"
                    return _json_response(request, _error_body(call_api, 400, message), 400)
                message = f"fake provider error {status}"
                return _json_response(request, _error_body(call_api, status, message), status)
            replay = request.headers.get("x-fake-replay")
            if replay is not None:
                return _replay(request, call_api, replay_dir, replay)
            if found is not None and isinstance(body, dict):
                # The path names the model; a body naming one too must agree (Azure's
                # names the deployment, as the path does).
                named = body.get("model")
                if named is not None and named != found[1]:
                    message = f"the body names model {named!r}, the path {found[1]!r}"
                    return _json_response(request, _error_body(call_api, 400, message), 400)
                body = {**body, "model": found[1]}
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                message = "the request body must be a JSON object with a string `model`"
                return _json_response(request, _error_body(call_api, 400, message), 400)
            stream = found[2] if found and found[2] is not None else body.get("stream") is True
            return await _answer(request, call_api, body, stream)

        return handle

    async def seen_requests(request: Request) -> Response:
        if request.method == "DELETE":
            seen.clear()
        return _json_response(request, {"requests": list(seen)})

    async def unknown(request: Request) -> Response:
        await record(request)
        provider = provider_of(request.url.path, request.headers.get("host", ""))
        refused = _key_error(provider, "openai_chat", request.headers, accepted)
        if refused is not None:
            return _json_response(request, refused, 401)
        message = f"no such path: {request.url.path}"
        return _json_response(request, _error_body("openai_chat", 404, message), 404)

    routes = [
        Route(prefix + path, endpoint(api), methods=["POST"])
        for prefix in PREFIXES
        for path, api in API_PATHS.items()
    ]
    for prefix in PREFIXES:
        routes.append(Route(prefix + _GEMINI_PATH, endpoint("gemini", _gemini_call),
                            methods=["POST"]))
        routes.append(Route(prefix + _BEDROCK_PATH, endpoint("bedrock_converse", _bedrock_call),
                            methods=["POST"]))
        routes.extend(Route(prefix + path, endpoint(api, _azure_call(api)), methods=["POST"])
                      for path, api in _AZURE_PATHS.items())
    routes.append(Route("/_seen", seen_requests, methods=["GET", "DELETE"]))
    every_method = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    routes.append(Route("/{path:path}", unknown, methods=every_method))
    return Starlette(routes=routes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.fake_provider",
        description="A deterministic fake LLM provider (OpenAI, Anthropic, Gemini, Azure "
                    "OpenAI, Bedrock, OpenAI-compatible).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--key", action="append", default=[], metavar="PROVIDER=KEY",
                        help="a key PROVIDER (openai, anthropic, workers-ai, gemini, azure, "
                             "groq) accepts; "
                             "repeatable. Without any, every call is accepted.")
    parser.add_argument("--replay-dir", type=Path, default=None,
                        help="directory of recorded responses for x-fake-replay")
    args = parser.parse_args(argv)
    keys: dict[str, list[str]] = {}
    for item in args.key:
        name, sep, key = item.partition("=")
        if not sep or not key:
            parser.error(f"--key wants PROVIDER=KEY, not {item!r}")
        keys.setdefault(name, []).append(key)
    try:
        app = create_app(keys, args.replay_dir)
    except ValueError as exc:
        parser.error(str(exc))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
