"""Each API's error body, as the real provider shapes it."""

from __future__ import annotations

from typing import Any

from devtools.fake_provider import anthropic, bedrock, gemini, openai
from sidecar.metering.parse import Api


def error_body(api: Api, status: int, message: str) -> dict[str, Any]:
    if api == "gemini":
        return gemini.error(status, message)
    if api in ("bedrock_converse", "bedrock_invoke"):
        return bedrock.error(status, message)
    if api == "anthropic_messages":
        return anthropic.error(status, message)
    return openai.error(status, message)
