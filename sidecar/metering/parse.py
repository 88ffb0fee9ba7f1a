"""Meters one provider response as it streams past: decoding, framing and the usage found."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Literal, Protocol
from urllib.parse import unquote

from genai_prices import data_snapshot

from sidecar.metering import count, generated_text_bytes, load_json, with_modalities
from sidecar.metering.anthropic import MessagesStream, message_body_extras, message_body_usage
from sidecar.metering.bedrock import (
    EVENTSTREAM_MEDIA,
    ConverseStream,
    EventStreamDecoder,
    InvokeStream,
    converse_body_usage,
)
from sidecar.metering.gemini import GeminiStream, gemini_body_usage
from sidecar.metering.openai import (
    TAIL_BYTES,
    ChatStream,
    ResponsesStream,
    chat_body_usage,
    closing_usage,
    images_body_usage,
    responses_body_fees,
    responses_body_usage,
    speech_body_usage,
)
from sidecar.metering.sse import SSEDecoder, SSEEvent
from sidecar.model import Iteration, TokenUsage, ToolFees

Api = Literal[
    "openai_chat",
    "openai_responses",
    "anthropic_messages",
    "openai_embeddings",
    "gemini",
    "bedrock_converse",
    "bedrock_invoke",
    "openai_images",
    "openai_speech",
]

# Whole JSON bodies are buffered to be parsed at the end; past this the body is not metered
# (the caller falls back to the estimate) rather than held in memory.
MAX_JSON_BODY = 8 * 1024 * 1024
# Decompressed bytes handled per step, so a small compressed chunk cannot expand into one
# huge allocation.
_INFLATE_STEP = 256 * 1024

# Path endings. Chat completions and embeddings are matched without `/v1` because Azure
# (`/openai/deployments/x/chat/completions`) and gateway compat routes omit it; `/messages`
# and `/responses` need `/v1` so that e.g. `/v1/threads/x/messages` is not taken for them.
_PATH_SUFFIXES: tuple[tuple[str, Api], ...] = (
    ("/chat/completions", "openai_chat"),
    ("/v1/responses", "openai_responses"),
    ("/v1/messages", "anthropic_messages"),
    ("/embeddings", "openai_embeddings"),
    ("/images/generations", "openai_images"),
    ("/images/edits", "openai_images"),
    ("/audio/speech", "openai_speech"),
    (":generateContent", "gemini"),
    (":streamGenerateContent", "gemini"),
)
# Bedrock Runtime: `/model/{modelId}/{operation}`, the model id percent-encoded.
_BEDROCK_OPERATIONS: dict[str, Api] = {
    "converse": "bedrock_converse",
    "converse-stream": "bedrock_converse",
    "invoke": "bedrock_invoke",
    "invoke-with-response-stream": "bedrock_invoke",
}

# genai-prices' provider id and api_flavor for each API's JSON body.
_GENAI_EXTRACTORS: dict[Api, tuple[str, str]] = {
    "openai_chat": ("openai", "chat"),
    "openai_responses": ("openai", "responses"),
    "anthropic_messages": ("anthropic", "default"),
    "openai_embeddings": ("openai", "embeddings"),
    "gemini": ("google", "default"),
    "bedrock_converse": ("aws", "default"),
    # InvokeModel answers with the model's own body; only Anthropic's is metered.
    "bedrock_invoke": ("aws", "anthropic"),
    "openai_images": ("openai", "images"),
}
# gzip framing is 16 + window bits; plain zlib framing is the window bits alone.
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
_OWN_BODY_PARSERS: dict[Api, Callable[[object], TokenUsage | None]] = {
    "openai_chat": chat_body_usage,
    "openai_responses": responses_body_usage,
    "anthropic_messages": message_body_usage,
    "openai_embeddings": chat_body_usage,
    "gemini": gemini_body_usage,
    "bedrock_converse": converse_body_usage,
    "bedrock_invoke": message_body_usage,
    "openai_images": images_body_usage,
    "openai_speech": speech_body_usage,
}
# APIs whose usage closes a body too large to keep (base64 images, base64 audio): only its
# last bytes are kept and read, whether it comes as JSON or as a stream.
TAIL_APIS: frozenset[Api] = frozenset({"openai_images", "openai_speech"})

# Stable codes for why a response could not be (fully) metered; usable as log fields.
MeterError = Literal[
    "unsupported_encoding", "bad_encoding", "body_too_large", "bad_json", "bad_framing"
]


class _Stream(Protocol):
    @property
    def usage(self) -> TokenUsage | None: ...

    @property
    def complete(self) -> bool: ...

    @property
    def output_bytes(self) -> int: ...

    @property
    def iterations(self) -> tuple[Iteration, ...]: ...

    @property
    def fees(self) -> ToolFees: ...

    def on_event(self, event: SSEEvent) -> None: ...


def api_for_path(path: str) -> Api | None:
    """Which metered API a request path calls, after any provider prefix; None if none.

    Read percent-decoded, as a provider routes it: Envoy's `normalize_path` keeps `%2F` and
    `%3A` as sent, and `/v1/chat%2Fcompletions` is still a chat completion upstream. Read
    raw, it named no API and the call was charged its estimate instead of its usage.
    """
    path = unquote(path.split("?", 1)[0]).rstrip("/")
    for suffix, api in _PATH_SUFFIXES:
        if path.endswith(suffix):
            return api
    head, _, operation = path.rpartition("/")
    if operation in _BEDROCK_OPERATIONS and "/model/" in f"{head}/":
        return _BEDROCK_OPERATIONS[operation]
    return None


def body_usage(api: Api, body: object) -> TokenUsage | None:
    """Usage from a complete, parsed JSON response body.

    genai-prices' extractors are used so metering reads the same fields pricing expects.
    Its top-level `extract_usage` also resolves the model and raises for models it does not
    know (fine-tunes, Workers AI, config overrides), so the provider's extractor is called
    directly. Bodies it rejects (e.g. a compatible server omitting `completion_tokens`) go
    to the lenient parsers that also serve the streams, so they are still charged.
    """
    if api not in _GENAI_EXTRACTORS:
        return _OWN_BODY_PARSERS[api](body)
    provider_id, flavor = _GENAI_EXTRACTORS[api]
    try:
        provider = data_snapshot.get_snapshot().find_provider(None, provider_id, None)
        _, usage = provider.extract_usage(body, api_flavor=flavor)
    except (ValueError, TypeError, LookupError):
        return _OWN_BODY_PARSERS[api](body)
    # genai-prices counts cache reads and writes inside input_tokens; TokenUsage does not.
    total_input = count(usage.reported_value("input_tokens")) or 0
    cache_read = min(count(usage.reported_value("cache_read_tokens")) or 0, total_input)
    cache_write = min(
        count(usage.reported_value("cache_write_tokens")) or 0, total_input - cache_read
    )
    tokens = TokenUsage(
        input_tokens=total_input - cache_read - cache_write,
        output_tokens=count(usage.reported_value("output_tokens")) or 0,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=min(
            count(usage.reported_value("cache_write_1h_tokens")) or 0, cache_write
        ),
    )
    return with_modalities(
        tokens,
        count(usage.reported_value("input_audio_tokens")) or 0,
        count(usage.reported_value("cache_audio_read_tokens")) or 0,
        count(usage.reported_value("output_audio_tokens")) or 0,
        image_input=count(usage.reported_value("input_image_tokens")) or 0,
        image_output=count(usage.reported_value("output_image_tokens")) or 0,
        video_input=count(usage.reported_value("input_video_tokens")) or 0,
        video_output=count(usage.reported_value("output_video_tokens")) or 0,
    )


def body_extras(api: Api, body: object) -> tuple[tuple[Iteration, ...], ToolFees]:
    """What a complete body bills beyond its top-level tokens: iterations and tool fees."""
    if api in ("anthropic_messages", "bedrock_invoke"):
        return message_body_extras(body)
    if api == "openai_responses":
        return (), responses_body_fees(body)
    return (), ToolFees()


def _new_stream(api: Api) -> _Stream:
    if api in ("openai_chat", "openai_embeddings"):
        return ChatStream()
    if api == "openai_responses":
        return ResponsesStream()
    if api == "gemini":
        return GeminiStream()
    if api == "bedrock_converse":
        return ConverseStream()
    if api == "bedrock_invoke":
        return InvokeStream()
    return MessagesStream()


def _wbits(content_encoding: str) -> int | None:
    """zlib window bits for a Content-Encoding; None for identity; ValueError if unsupported."""
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _WBITS:
        return _WBITS[codings[0]]
    raise ValueError(content_encoding)


class UsageMeter:
    """Feed it a response body chunk by chunk; read `usage` at any time, `complete` at the end.

    A stream cut short keeps what it saw (e.g. Anthropic's input tokens and the last
    output count), so the caller can charge that instead of nothing.
    """

    def __init__(
        self, api: Api, *, sse: bool | None, content_encoding: str = "", eventstream: bool = False
    ) -> None:
        self.api = api
        # None: decide from the first byte of the body, for a missing or odd content-type.
        # A binary event stream (Bedrock) is a stream too, in another framing.
        self._sse = True if eventstream else sse
        self._stream = _new_stream(api)
        self._decoder: SSEDecoder | EventStreamDecoder = (
            EventStreamDecoder() if eventstream else SSEDecoder()
        )
        self._body = bytearray()
        # Usage closes the body and nothing else is read: keep its last bytes only.
        self._tail_only = api in TAIL_APIS
        self._body_usage: TokenUsage | None = None
        self._body_extras: tuple[tuple[Iteration, ...], ToolFees] = ((), ToolFees())
        self._body_text_bytes = 0
        self._finished = False
        self.error: MeterError | None = None
        self._wbits: int | None = None
        try:
            self._wbits = _wbits(content_encoding)
        except ValueError:
            # Brotli and zstd are not decoded here; the caller charges the estimate.
            self.error = "unsupported_encoding"
        self._inflater = zlib.decompressobj(self._wbits) if self._wbits else None

    @classmethod
    def for_response(cls, api: Api, content_type: str, content_encoding: str) -> UsageMeter:
        media = content_type.split(";", 1)[0].strip().lower()
        if media == EVENTSTREAM_MEDIA:
            return cls(api, sse=True, content_encoding=content_encoding, eventstream=True)
        sse: bool | None = None
        if media == "text/event-stream":
            sse = True
        elif media == "application/json" or media.endswith("+json"):
            sse = False
        return cls(api, sse=sse, content_encoding=content_encoding)

    @property
    def usage(self) -> TokenUsage | None:
        return self._stream.usage if self._streamed else self._body_usage

    @property
    def output_bytes(self) -> int:
        """UTF-8 bytes of generated text seen so far (a JSON body's only once finished and
        only when it reported no usage: it is only needed then)."""
        return self._stream.output_bytes if self._streamed else self._body_text_bytes

    @property
    def iterations(self) -> tuple[Iteration, ...]:
        """The sampling steps the provider reported, each with its own usage (Anthropic)."""
        return self._stream.iterations if self._streamed else self._body_extras[0]

    @property
    def fees(self) -> ToolFees:
        """Server-tool calls billed per call."""
        return self._stream.fees if self._streamed else self._body_extras[1]

    @property
    def complete(self) -> bool:
        if self._streamed:
            return self._stream.complete
        return self._body_usage is not None

    @property
    def _streamed(self) -> bool:
        """Read event by event (else as one body, or its last bytes)."""
        return bool(self._sse) and not self._tail_only

    def feed(self, chunk: bytes) -> None:
        if self._finished:
            raise RuntimeError("UsageMeter.feed after finish")
        if self._stopped() or not chunk:
            return
        if self._inflater is None:
            self._consume(chunk)
        else:
            self._inflate(chunk)

    def finish(self) -> None:
        if self._finished:
            return
        if self._inflater is not None and not self._stopped():
            try:
                self._consume(self._inflater.flush())
            except zlib.error:
                self.error = "bad_encoding"
        self._finished = True
        if self._tail_only:
            if self._body:
                self._body_usage = closing_usage(bytes(self._body), self._parse_usage)
        elif self._sse:
            for event in self._decoder.close():
                self._stream.on_event(event)
            if isinstance(self._decoder, EventStreamDecoder) and self._decoder.error:
                self.error = "bad_framing"
        elif self._body and self.error != "body_too_large":
            parsed = load_json(bytes(self._body))
            if parsed is None:
                self.error = self.error or "bad_json"
            else:
                self._body_usage = body_usage(self.api, parsed)
                self._body_extras = body_extras(self.api, parsed)
                if self._body_usage is None:
                    self._body_text_bytes = generated_text_bytes(parsed)
        self._body.clear()

    def _parse_usage(self, body: object) -> TokenUsage | None:
        return body_usage(self.api, body)

    def _stopped(self) -> bool:
        # A broken encoding or an oversized body: nothing further can be metered.
        return self.error is not None

    def _inflate(self, data: bytes) -> None:
        assert self._inflater is not None and self._wbits is not None
        try:
            while data and not self._stopped():
                out = self._inflater.decompress(data, _INFLATE_STEP)
                self._consume(out)
                data = self._inflater.unconsumed_tail
                if self._inflater.eof and self._inflater.unused_data:
                    # Concatenated gzip members are one valid body (RFC 1952).
                    data = self._inflater.unused_data
                    self._inflater = zlib.decompressobj(self._wbits)
        except zlib.error:
            self.error = "bad_encoding"

    def _consume(self, data: bytes) -> None:
        if not data:
            return
        if self._sse is None:
            start = data.lstrip()[:1]
            if not start:
                return
            self._sse = start not in (b"{", b"[")
        if self._tail_only:
            self._body += data
            if len(self._body) > 2 * TAIL_BYTES:
                del self._body[:-TAIL_BYTES]
            return
        if self._sse:
            for event in self._decoder.feed(data):
                self._stream.on_event(event)
            return
        if len(self._body) + len(data) > MAX_JSON_BODY:
            self.error = "body_too_large"
            self._body.clear()
            return
        self._body += data
