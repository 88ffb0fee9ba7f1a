"""What Envoy saw of one admitted call (its metering record) → `Observed`, by the usual parsers.

The record comes from the Lua filter's metadata and the access log (sidecar/envoy/meter.lua,
sidecar/envoy/access_log.py): the response status, whether the request reached the
upstream at all, the response body as it passed (bytes >= 0x80 replaced by `~`, which keeps
JSON structure and text byte counts), and whether the body ended.

A stream that ended is read from its first 1.5 KiB and last 2 KiB only: every metered API reports
its final usage at the end (OpenAI's usage chunk, Anthropic's `message_start` + last
`message_delta`), so the sidecar's work per call does not grow with the number of chunks.
When that does not find complete usage (a final event larger than the tail, a JSON body),
or the stream was cut short, the whole body kept is read, which also counts the text that
passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.metering.charge import Observed
from sidecar.metering.parse import Api, UsageMeter

# Enough for Anthropic's `message_start` and for the last events of every metered stream
# (OpenAI's usage chunk and `[DONE]`, Anthropic's last `message_delta` and `message_stop`);
# when they do not hold complete usage (the Responses API's `response.completed` repeats the
# whole answer), the body is read whole.
HEAD_BYTES = 1536
TAIL_BYTES = 2048
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
# Ends whatever event the head was cut in, so its remainder is dropped as malformed.
_BREAK = b"\n\n"


@dataclass(frozen=True, slots=True)
class MeteringRecord:
    request_id: str
    api: Api | None
    # 0 when no response started (the client or the upstream went away first).
    status: int
    # The request was sent upstream in full (Envoy's last upstream byte was sent).
    reached_upstream: bool
    content_type: str = ""
    content_encoding: str = ""
    # The body's first bytes as it passed, chunk by chunk.
    chunks: tuple[bytes, ...] = ()
    # The last chunks, when the body outgrew what is kept in `chunks`.
    tail: bytes = b""
    total_bytes: int = 0
    # The body ended; False when the stream was cut short.
    done: bool = False
    # The Check's estimate of the prompt's tokens, to price seen text when no usage came.
    input_tokens: int = 0
    # (model, provider) as admitted: prices usage for the fail-open spool only.
    hint: tuple[str, str] | None = None


def _from_event(data: bytes) -> bytes:
    """`data` from its first event boundary on (the rest of a cut event dropped)."""
    found = _EVENT_END.search(data)
    return data[found.end():] if found else b""


def _meter(record: MeteringRecord, parts: list[bytes]) -> UsageMeter:
    meter = UsageMeter.for_response(record.api or "openai_chat", record.content_type,
                                    record.content_encoding)
    for part in parts:
        meter.feed(part)
    meter.finish()
    return meter


def observed(record: MeteringRecord) -> tuple[Observed, UsageMeter | None]:
    """What the record shows, and the meter that read it (None: nothing to read)."""
    if record.api is None or not (record.chunks or record.tail):
        return Observed(status=record.status, reached_upstream=record.reached_upstream), None
    body = b"".join(record.chunks)
    # Compressed bytes cannot be read from the middle: those go the whole way.
    plain = record.content_encoding.strip().lower() in ("", "identity")
    sse = "event-stream" in record.content_type.lower()
    if record.done and sse and plain and len(body) > HEAD_BYTES + TAIL_BYTES:
        last = record.tail or body[-TAIL_BYTES:]
        quick = _meter(record, [body[:HEAD_BYTES], _BREAK, _from_event(last[-TAIL_BYTES:])])
        if quick.usage is not None and quick.complete:
            return _seen(record, quick, 0), quick
    parts = [body]
    if record.tail:
        parts += [_BREAK, _from_event(record.tail)]
    meter = _meter(record, parts)
    usage = meter.usage
    input_tokens = record.input_tokens if usage is None and meter.output_bytes else 0
    return _seen(record, meter, input_tokens), meter


def _seen(record: MeteringRecord, meter: UsageMeter, input_tokens: int) -> Observed:
    return Observed(meter.usage, meter.complete, meter.output_bytes, input_tokens,
                    record.status, meter.iterations, meter.fees,
                    reached_upstream=record.reached_upstream)
