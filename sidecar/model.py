"""Frozen values that flow through the request path: attributes in, identity, decision out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

IdentityKind = Literal["user", "service", "cli"]


def normalise_email(email: str) -> str:
    """One spelling per address for budgets, grants and the ledger: issuers sign whatever
    case (and stray whitespace) the account was created with."""
    return email.strip().lower()


@dataclass(frozen=True, slots=True)
class Identity:
    kind: IdentityKind
    subject: str
    email: str = ""
    groups: tuple[str, ...] = ()
    token_name: str = ""
    issuer: str = ""
    # Unix seconds after which this identity must be verified again (cache bound).
    expires_at: float | None = None
    # Tokens from the sidecar's own device login: the CLI session they belong to (revoked
    # together), and "admin" for the short-lived admin-scoped tokens of `login --admin`.
    session: str = ""
    scope: str = ""

    @property
    def user(self) -> str:
        """The `user` dimension: email (normalised) for people, token name for services."""
        return normalise_email(self.email) if self.email else self.token_name or self.subject


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What the transport extracted from one request; the engine sees nothing else."""

    method: str
    path: str
    # Lower-cased header names; duplicate headers joined with "," as Envoy does.
    headers: Mapping[str, str]
    body: bytes | None = None
    request_id: str = ""
    # The model when the caller has no body to send (HTTP authorization mode).
    model_hint: str = ""


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """One model's token counts as the provider reported them. input_tokens excludes cache
    tokens; cache_write_1h_tokens is the part of cache_write_tokens written for an hour
    (Anthropic prices those above the 5-minute writes). The audio, image and video counts
    are the parts of input_tokens and output_tokens (and of cache_read_tokens, for audio)
    in those modalities, priced at their own rates where the model has them (often many
    times the text rates)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    cache_audio_read_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    input_video_tokens: int = 0
    output_video_tokens: int = 0

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    @property
    def has_modalities(self) -> bool:
        """Whether any tokens are counted as audio, image or video."""
        return bool(
            self.input_audio_tokens
            or self.output_audio_tokens
            or self.cache_audio_read_tokens
            or self.input_image_tokens
            or self.output_image_tokens
            or self.input_video_tokens
            or self.output_video_tokens
        )

    def counts(self) -> tuple[int, ...]:
        """Every count, in field order (TokenUsage(*counts) is the same usage)."""
        return tuple(getattr(self, name) for name in _TOKEN_COUNTS)

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(*(a + b for a, b in zip(self.counts(), other.counts(), strict=True)))


_TOKEN_COUNTS = tuple(f.name for f in fields(TokenUsage))


@dataclass(frozen=True, slots=True)
class Iteration:
    """One sampling step the provider billed inside a single response (Anthropic's
    `usage.iterations`: the message itself, a context compaction, an advisor call)."""

    kind: str
    tokens: TokenUsage
    # The model that ran it when the provider names one ("": the request's model).
    model: str = ""


@dataclass(frozen=True, slots=True)
class ToolFees:
    """What a response bills beyond its tokens at the standard rates: server-side tool calls
    billed per call, and where the provider says it ran the model (Anthropic's
    `usage.inference_geo`: US-only inference is billed above the global rates)."""

    web_searches: int = 0
    # OpenAI's file_search tool (genai-prices calls these storage searches).
    file_searches: int = 0
    # As the provider reported it ("": not reported).
    inference_geo: str = ""

    def __bool__(self) -> bool:
        return bool(self.web_searches or self.file_searches or self.inference_geo)


Reason = Literal[
    "ok",
    "fallback",
    "missing_credentials",
    "invalid_token",
    "model_not_allowed",
    "unpriced_model",
    "unmetered_call",
    "unpriced_service_tier",
    "unpriced_tool",
    "bad_request",
    "spend_limit_exceeded",
    "store_unavailable",
    "overloaded",
]


@dataclass(frozen=True, slots=True)
class Decision:
    """A deny is data: the transports translate this into their own answers."""

    allowed: bool
    http_status: int
    reason: Reason
    # Headers for the upstream request (allowed) or the client response (denied).
    headers: Mapping[str, str] = field(default_factory=dict)
    # Headers the client sent that must not reach the upstream.
    remove_headers: tuple[str, ...] = ()
    # Headers added to the response the client receives (allowed requests).
    response_headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    identity: Identity | None = None
    model: str = ""
    provider: str = ""
    # For the decision log: the rules that applied and the estimate reserved (µUSD).
    rules: tuple[str, ...] = ()
    estimate: int | None = None
    # The prompt's estimated tokens: prices text seen streaming when no usage comes back.
    input_tokens: int = 0
    # The reservation this admission holds (minted by the sidecar; empty when nothing was
    # reserved): the key its usage is charged against.
    request_id: str = ""
    # The provider key headers for the upstream request (allowed calls to a provider whose
    # key the sidecar holds). Kept apart from `headers` and out of repr: these are secrets,
    # and only transports that deliver them upstream may read them.
    upstream_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
