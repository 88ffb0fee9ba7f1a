"""One request's generated reply (text, usage, ids), shared by every API's shapes, and the
SSE framing the OpenAI and Anthropic streams use."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from devtools.fake_provider.usage import expected_usage, output_words, requested_output
from sidecar.metering.parse import Api
from sidecar.model import TokenUsage


@dataclass(frozen=True)
class Reply:
    body: Mapping[str, Any]
    model: str
    usage: TokenUsage
    words: list[str]
    # The output stopped at the request's own limit (the APIs report that as the stop reason).
    limited: bool
    created: int
    id: str

    @property
    def text(self) -> str:
        return "".join(self.words)

    @classmethod
    def of(cls, api: Api, body: Mapping[str, Any]) -> Reply:
        usage = expected_usage(api, body)
        return cls(
            body=body,
            model=str(body["model"]),
            usage=usage,
            words=output_words(usage.output_tokens),
            limited=requested_output(api, body) == usage.output_tokens,
            created=int(time.time()),
            id=secrets.token_hex(12),
        )


def sse(data: Mapping[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()
