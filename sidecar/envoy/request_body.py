"""The request-body changes ext_proc makes before a call goes upstream. Pure functions.

Two reasons to touch a client's body:

- fallback: admission switched the model, so the body must name the fallback model;
- metering: an OpenAI chat completions stream only reports usage when the request set
  `stream_options.include_usage`. Without it the response carries no token counts and the
  call could only be charged its estimate, so the option is added when the request lacks it.
  The client then receives one extra chunk before `data: [DONE]`, with `choices: []` and the
  `usage` object; the official SDKs (and any client following the API reference) handle it.
  A request that explicitly sets `include_usage: false` is left alone and charged its
  estimate.
"""

from __future__ import annotations

import json
from typing import Any

from sidecar.metering.parse import Api


def _wants_usage_option(data: dict[str, Any]) -> bool:
    if data.get("stream") is not True:
        return False
    options = data.get("stream_options")
    if options is None:
        return True
    return isinstance(options, dict) and options.get("include_usage") is None


def mutate(body: bytes, api: Api | None, model: str | None) -> bytes | None:
    """The body with `model` set (when given) and usage requested from OpenAI chat streams;
    None when nothing needs to change or the body is not a JSON object (sent unchanged)."""
    needs_stream_check = api == "openai_chat" and b'"stream"' in body
    if model is None and not needs_stream_check:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    changed = False
    if model is not None and data.get("model") != model:
        data["model"] = model
        changed = True
    if needs_stream_check and _wants_usage_option(data):
        options = data.get("stream_options")
        data["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
        changed = True
    if not changed:
        return None
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
