"""The request-body changes a call needs before it goes upstream, and who makes them. Pure.

Two reasons to touch a client's body:

- fallback: admission switched the model, so the body must name the fallback model;
- metering: an OpenAI chat completions stream only reports usage when the request set
  `stream_options.include_usage`. Without it the response carries no token counts, so the
  option is set to true whatever the client sent (`false` included: a caller cannot switch
  metering off). When the client did not ask for usage itself, the extra usage event is
  taken out of the response before the client sees it (`sidecar.metering.usage_event`), so
  it gets exactly the stream it asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.metering import load_json
from sidecar.metering.parse import Api


def _needs_usage_option(data: dict[str, Any]) -> bool:
    if data.get("stream") is not True:
        return False
    options = data.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


@dataclass(frozen=True, slots=True)
class Mutation:
    # The new body; None when nothing needs to change or the body is not a JSON object.
    body: bytes | None = None
    # Usage was requested on the client's behalf: its usage event is not the client's.
    strip_usage_event: bool = False


def mutate(
    body: bytes, api: Api | None, model: str | None, *, only_if_named: bool = False
) -> Mutation:
    """The body with `model` set (when given) and usage requested from OpenAI chat streams.

    `only_if_named`: set `model` only in a body that has one (an API that names the model
    in the path rejects an unknown `model` field).
    """
    needs_stream_check = api == "openai_chat" and b'"stream"' in body
    if model is None and not needs_stream_check:
        return Mutation()
    data = load_json(body)
    if not isinstance(data, dict):
        return Mutation()
    changed = strip = False
    if (
        model is not None
        and data.get("model") != model
        and not (only_if_named and "model" not in data)
    ):
        data["model"] = model
        changed = True
    if needs_stream_check and _needs_usage_option(data):
        options = data.get("stream_options")
        data["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        changed = strip = True
    if not changed:
        return Mutation()
    return Mutation(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode(), strip)


# What the body needs before it goes upstream through Envoy, and who makes the change:
# nothing; the one change the Lua filter makes itself (a `stream_options` member inserted
# first in an object that has none: the client's bytes are otherwise kept as sent); or
# anything else, which ext_proc makes (`mutate`) and is only then asked for.
BodyAction = Literal["", "insert_usage_option", "ext_proc"]
USAGE_OPTION_MEMBER = b'"stream_options":{"include_usage":true},'


def body_action(body: bytes, api: Api | None, model: str | None) -> BodyAction:
    """The same decision as `mutate` (one rule), without building the new body."""
    if model is not None:
        return "ext_proc"
    if api != "openai_chat" or b'"stream"' not in body:
        return ""
    data = load_json(body)
    if not isinstance(data, dict) or not _needs_usage_option(data):
        return ""
    if "stream_options" in data or not body.lstrip().startswith(b"{"):
        return "ext_proc"
    return "insert_usage_option"


def insert_usage_option(body: bytes) -> bytes:
    """What the Lua filter does for `insert_usage_option` (sidecar/envoy/meter.lua)."""
    brace = body.index(b"{") + 1
    return body[:brace] + USAGE_OPTION_MEMBER + body[brace:]
