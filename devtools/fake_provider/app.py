"""The fake provider's routes: every API's paths under every provider prefix, key checks,
`x-fake-status` errors, replays, and `GET`/`DELETE /_seen`."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from devtools.fake_provider import anthropic, bedrock, gemini, openai
from devtools.fake_provider.auth import KEY_PROVIDERS, PREFIXES, key_error, provider_of
from devtools.fake_provider.errors import error_body
from devtools.fake_provider.reply import Reply
from devtools.fake_provider.transport import (
    delay_seconds,
    echo,
    joined_headers,
    json_response,
    paced,
    replay,
)
from devtools.fake_provider.usage import (
    expected_usage,
    gemini_thoughts,
    output_words,
    requested_output,
)
from sidecar.metering.bedrock import EVENTSTREAM_MEDIA
from sidecar.metering.parse import Api

API_PATHS: Mapping[str, Api] = {
    "/v1/chat/completions": "openai_chat",
    "/v1/responses": "openai_responses",
    "/v1/messages": "anthropic_messages",
    "/v1/embeddings": "openai_embeddings",
    "/v1/images/generations": "openai_images",
    "/v1/audio/speech": "openai_speech",
}
# The free token counts of Anthropic, OpenAI and Gemini.
_COUNT_TOKENS_PATHS = (
    "/v1/messages/count_tokens",
    "/v1/responses/input_tokens",
    "/v1beta/models/{model}:countTokens",
)
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
SEEN_LIMIT = 100

Handler = Callable[[Request], Awaitable[Response]]
# (api, model, stream) read from a path that names the model; stream None: the body says.
PathCall = tuple[Api, str, bool | None]


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


def _reply_body(
    api: Api, body: dict[str, Any], stream: bool
) -> tuple[dict[str, Any], Iterator[bytes] | None, str]:
    """(JSON payload, stream frames or None, stream media type) of a valid call."""
    sse = "text/event-stream"
    if api == "openai_embeddings":
        usage = expected_usage(api, body)
        return openai.embeddings_json(str(body["model"]), body, usage), None, sse
    if api == "openai_images":
        usage = expected_usage(api, body)
        return openai.images_json(body, usage), openai.images_frames(body, usage), sse
    if api == "openai_speech":
        return {}, openai.speech_frames(expected_usage(api, body)), sse
    if api in ("openai_chat", "openai_responses", "anthropic_messages", "bedrock_invoke"):
        reply = Reply.of("anthropic_messages" if api == "bedrock_invoke" else api, body)
        if api == "openai_chat":
            return openai.chat_json(reply), openai.chat_frames(reply), sse
        if api == "openai_responses":
            return openai.responses_json(reply), openai.responses_frames(reply), sse
        payload, frames = anthropic.messages_json(reply), anthropic.messages_frames(reply)
        if api == "bedrock_invoke":
            return payload, bedrock.invoke_frames(frames, reply.usage), EVENTSTREAM_MEDIA
        return payload, frames, sse
    model = str(body["model"])
    usage = expected_usage(api, body)
    thoughts = gemini_thoughts(body) if api == "gemini" else 0
    words = output_words(usage.output_tokens - thoughts)
    limited = requested_output(api, body) == usage.output_tokens - thoughts
    if api == "gemini":
        return (
            gemini.gemini_json(model, usage, thoughts, words, limited),
            gemini.gemini_frames(model, usage, thoughts, words, limited),
            sse,
        )
    return (
        bedrock.converse_json(usage, words, limited),
        bedrock.converse_frames(usage, words, limited),
        EVENTSTREAM_MEDIA,
    )


async def _answer(request: Request, api: Api, body: dict[str, Any], stream: bool) -> Response:
    """The reply to a valid call, as JSON or as the API's stream."""
    delay = delay_seconds(request)
    gzip = request.headers.get("x-fake-gzip") == "1"
    payload, frames, media = _reply_body(api, body, stream)
    if api == "openai_speech" and not stream:
        audio = openai.speech_audio(expected_usage(api, body))
        return Response(audio, headers=echo(request), media_type="audio/mpeg")
    if stream and frames is not None:
        headers = echo(request) | ({"content-encoding": "gzip"} if gzip else {})
        return StreamingResponse(paced(frames, delay, gzip), headers=headers, media_type=media)
    if delay:
        await asyncio.sleep(delay)
    return json_response(request, payload)


def create_app(
    keys: Mapping[str, Collection[str]] | None = None, replay_dir: Path | None = None
) -> Starlette:
    """`keys`: the keys each provider prefix accepts; `replay_dir`: recorded responses (see
    the module doc)."""
    accepted = {name: frozenset(values) for name, values in (keys or {}).items()}
    unknown_names = set(accepted) - set(KEY_PROVIDERS)
    if unknown_names:
        raise ValueError(
            f"unknown provider(s) {sorted(unknown_names)}; choose from {KEY_PROVIDERS}"
        )
    seen: deque[dict[str, Any]] = deque(maxlen=SEEN_LIMIT)

    async def record(request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        entry = {
            "method": request.method,
            "path": request.url.path,
            "headers": joined_headers(request),
        }
        seen.append({**entry, "body": body})
        return body

    def endpoint(api: Api, call: Callable[[Request], PathCall | None] | None = None) -> Handler:
        """`call`: for paths that name the model, (api, model, stream) from the path, or
        None for a path that names no known operation."""

        async def handle(request: Request) -> Response:
            body = await record(request)
            found = call(request) if call is not None else None
            if call is not None and found is None:
                return await unknown(request)
            call_api = found[0] if found else api
            provider = provider_of(request.url.path, request.headers.get("host", ""))
            refused = key_error(provider, call_api, request.headers, accepted)
            if refused is not None:
                return json_response(request, refused, 401)
            status_header = request.headers.get("x-fake-status")
            if status_header is not None:
                status = int(status_header) if status_header.isdigit() else 0
                if not 400 <= status <= 599:
                    message = "x-fake-status must be an HTTP error status (400-599)"
                    return json_response(request, error_body(call_api, 400, message), 400)
                message = f"fake provider error {status}"
                return json_response(request, error_body(call_api, status, message), status)
            recorded = request.headers.get("x-fake-replay")
            if recorded is not None:
                return replay(request, call_api, replay_dir, recorded)
            if found is not None and isinstance(body, dict):
                # The path names the model; a body naming one too must agree (Azure's
                # names the deployment, as the path does).
                named = body.get("model")
                if named is not None and named != found[1]:
                    message = f"the body names model {named!r}, the path {found[1]!r}"
                    return json_response(request, error_body(call_api, 400, message), 400)
                body = {**body, "model": found[1]}
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                message = "the request body must be a JSON object with a string `model`"
                return json_response(request, error_body(call_api, 400, message), 400)
            stream = found[2] if found and found[2] is not None else body.get("stream") is True
            if call_api == "openai_speech":
                stream = body.get("stream_format") == "sse"
            return await _answer(request, call_api, body, stream)

        return handle

    async def count_tokens(request: Request) -> Response:
        """The providers' free token counts: the prompt's size, no usage."""
        body = await record(request)
        path = request.url.path
        provider = provider_of(path, request.headers.get("host", ""))
        api: Api = "gemini" if path.endswith(":countTokens") else "openai_responses"
        if path.endswith("/messages/count_tokens"):
            api = "anthropic_messages"
        refused = key_error(provider, api, request.headers, accepted)
        if refused is not None:
            return json_response(request, refused, 401)
        tokens = max(len(json.dumps(body)) // 4, 1)
        if api == "gemini":
            return json_response(request, {"totalTokens": tokens})
        if api == "anthropic_messages":
            return json_response(request, {"input_tokens": tokens})
        return json_response(request, {"object": "response.input_tokens", "input_tokens": tokens})

    async def seen_requests(request: Request) -> Response:
        if request.method == "DELETE":
            seen.clear()
        return json_response(request, {"requests": list(seen)})

    async def unknown(request: Request) -> Response:
        await record(request)
        provider = provider_of(request.url.path, request.headers.get("host", ""))
        refused = key_error(provider, "openai_chat", request.headers, accepted)
        if refused is not None:
            return json_response(request, refused, 401)
        message = f"no such path: {request.url.path}"
        return json_response(request, error_body("openai_chat", 404, message), 404)

    routes = [
        Route(prefix + path, endpoint(api), methods=["POST"])
        for prefix in PREFIXES
        for path, api in API_PATHS.items()
    ]
    for prefix in PREFIXES:
        routes.extend(
            Route(prefix + path, count_tokens, methods=["POST"]) for path in _COUNT_TOKENS_PATHS
        )
        routes.append(
            Route(prefix + _GEMINI_PATH, endpoint("gemini", _gemini_call), methods=["POST"])
        )
        routes.append(
            Route(
                prefix + _BEDROCK_PATH,
                endpoint("bedrock_converse", _bedrock_call),
                methods=["POST"],
            )
        )
        routes.extend(
            Route(prefix + path, endpoint(api, _azure_call(api)), methods=["POST"])
            for path, api in _AZURE_PATHS.items()
        )
    routes.append(Route("/_seen", seen_requests, methods=["GET", "DELETE"]))
    every_method = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    routes.append(Route("/{path:path}", unknown, methods=every_method))
    return Starlette(routes=routes)
