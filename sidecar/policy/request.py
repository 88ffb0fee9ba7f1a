"""Read what a decision needs from the raw request: model, provider, metadata (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_METADATA_KEYS = 5
MAX_METADATA_BYTES = 2048


class BadRequest(Exception):
    """The request cannot be judged as sent; the message is shown to the client."""


@dataclass(frozen=True)
class LlmRequest:
    model: str
    provider: str
    body: Mapping[str, Any]


def parse_body(body: bytes | None) -> Mapping[str, Any]:
    if not body:
        raise BadRequest("request body is required: a JSON object with a 'model' field")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def model_of(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("request body has no 'model' string")
    if len(model) > 256:
        raise BadRequest("'model' is too long")
    return model.strip()


def split_provider(model: str, known: Mapping[str, object]) -> tuple[str | None, str]:
    """`openai/gpt-4o` names its provider when `openai` is a configured provider id."""
    head, sep, tail = model.partition("/")
    if sep and head in known and tail:
        return head, tail
    return None, model


def parse_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """`cf-aig-metadata`: a JSON object of at most 5 scalar values (client-supplied)."""
    raw = headers.get("cf-aig-metadata")
    if raw is None:
        return {}
    if len(raw) > MAX_METADATA_BYTES:
        raise BadRequest("cf-aig-metadata is too large")
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest("cf-aig-metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("cf-aig-metadata must be a JSON object")
    if len(data) > MAX_METADATA_KEYS:
        raise BadRequest(f"cf-aig-metadata has more than {MAX_METADATA_KEYS} keys")
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        else:
            raise BadRequest(f"cf-aig-metadata value for {key!r} must be a string, number or bool")
    return out
