"""What Envoy saw of one admitted call (its metering record) → `Observed`, by the usual parsers.

The record comes from the Lua filter's metadata and the access log (sidecar/envoy/meter.lua,
sidecar/envoy/access_log.py): the response status, whether the request reached the
upstream at all, the response body as it passed (bytes >= 0x80 replaced by `~`, which keeps
JSON structure and text byte counts), and whether the body ended.

A stream that ended is read from its first event and its last bytes only (`head`, `end`:
every metered API reports its final usage at the end, OpenAI's usage chunk, Anthropic's
`message_start` + last `message_delta`), so the sidecar's work per call does not grow with
the number of chunks: the chunks are not even looked at.
When that does not find complete usage (a final event larger than the tail, a JSON body),
or the stream was cut short, the whole body kept is read, which also counts the text that
passed. Envoy leaves the body out of the record (`trimmed`, head and end then reduced to
the first event and the last TAIL_EVENTS events) when those last events of a finished
stream report usage; should they still not give complete usage, head and end stand in for
the body.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.metering.charge import Observed
from sidecar.metering.parse import TAIL_APIS, Api, UsageMeter

# Every metered stream reports its final usage in its last events: OpenAI's usage chunk
# and `[DONE]`, Anthropic's last `message_delta` and `message_stop`, the Responses API's
# `response.completed`.
TAIL_EVENTS = 4
# Bytes from the end first searched for those events' boundaries (usually enough).
_TAIL_WINDOW = 1024
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
    # The body's first bytes as it passed (up to 1 MiB), read only when needed.
    load_body: Callable[[], bytes] = field(default=lambda: b"", repr=False)
    # Of a body that ended: its first bytes, and its last from `end_offset` on.
    head: bytes = b""
    end: bytes = b""
    end_offset: int = 0
    # The last chunks, when the body outgrew what is kept in `chunks`.
    tail: bytes = b""
    # Bytes of body that passed: all of them once it ended or outgrew what is kept, else at
    # least the first chunk's (0: no body began).
    total_bytes: int = 0
    # The body ended; False when the stream was cut short.
    done: bool = False
    # Envoy left the body out: its last events report usage, head and end are what was sent.
    trimmed: bool = False
    # The Check's estimate of the prompt's tokens, to price seen text when no usage came.
    input_tokens: int = 0
    # (model, provider) as admitted: prices usage for the fail-open spool only.
    hint: tuple[str, str] | None = None
    # W3C trace context of the call (traceparent, tracestate), for the charge's span.
    trace: tuple[tuple[str, str], ...] = ()


def _from_event(data: bytes) -> bytes:
    """`data` from its first event boundary on (the rest of a cut event dropped)."""
    found = _EVENT_END.search(data)
    return data[found.end() :] if found else b""


def _meter(record: MeteringRecord, parts: list[bytes]) -> UsageMeter:
    meter = UsageMeter.for_response(
        record.api or "openai_chat", record.content_type, record.content_encoding
    )
    for part in parts:
        meter.feed(part)
    meter.finish()
    return meter


def _last_events(data: bytes, start_at_boundary: bool) -> bytes:
    """The last TAIL_EVENTS events of `data` (all of its whole events when fewer)."""
    # Look for the boundaries in the last bytes first: a stream's end holds dozens of
    # events and only the last few are wanted. A search started just after a byte that is
    # no line break finds exactly the boundaries a search from the start finds there
    # (a boundary is made of line breaks only, so none spans that byte).
    start = max(len(data) - _TAIL_WINDOW, 0)
    while start and data[start - 1] in b"\r\n":
        start -= 1
    ends = [m.end() for m in _EVENT_END.finditer(data, start)]
    if len(ends) <= TAIL_EVENTS and start:
        ends = [m.end() for m in _EVENT_END.finditer(data)]
    if len(ends) > TAIL_EVENTS:
        return data[ends[-TAIL_EVENTS - 1] :]
    return data if start_at_boundary else _from_event(data)


def _quick(record: MeteringRecord) -> UsageMeter | None:
    """A meter over the first event and the last few of a finished body."""
    if not record.end:
        return None
    whole = record.end_offset == 0
    first = _EVENT_END.search(record.head)
    if first is None:
        return None
    if whole and len(record.end) <= first.end():
        return _meter(record, [record.end])
    # A trimmed record's end starts at an event's start.
    tail = _last_events(record.end, whole or record.trimmed)
    if whole and record.end.endswith(tail) and len(record.end) - len(tail) <= first.end():
        return _meter(record, [record.end])
    return _meter(record, [record.head[: first.end()], tail])


def observed(record: MeteringRecord) -> tuple[Observed, UsageMeter | None]:
    """What the record shows, and the meter that read it (None: nothing to read)."""
    if record.api is None or not (record.total_bytes or record.tail):
        return Observed(status=record.status, reached_upstream=record.reached_upstream), None
    if record.api in TAIL_APIS:
        # Usage closes the body: its last bytes, once it ended, are all there is to read.
        meter = _meter(record, [record.end] if record.done else [])
        return _seen(record, meter, 0), meter
    # Compressed bytes cannot be read from the middle: those go the whole way.
    plain = record.content_encoding.strip().lower() in ("", "identity")
    sse = "event-stream" in record.content_type.lower()
    if record.done and sse and plain:
        quick = _quick(record)
        if quick is not None and quick.usage is not None and quick.complete:
            return _seen(record, quick, 0), quick
    parts = _head_and_end(record) if record.trimmed else [record.load_body()]
    if record.tail:
        parts += [_BREAK, _from_event(record.tail)]
    meter = _meter(record, parts)
    usage = meter.usage
    input_tokens = record.input_tokens if usage is None and meter.output_bytes else 0
    return _seen(record, meter, input_tokens), meter


def _head_and_end(record: MeteringRecord) -> list[bytes]:
    """A trimmed body as far as its first event and last events show it (both whole
    events): exactly, when they meet or overlap."""
    if record.end_offset <= len(record.head):
        return [record.head[: record.end_offset], record.end]
    return [record.head, record.end]


def _seen(record: MeteringRecord, meter: UsageMeter, input_tokens: int) -> Observed:
    return Observed(
        meter.usage,
        meter.complete,
        meter.output_bytes,
        input_tokens,
        record.status,
        meter.iterations,
        meter.fees,
        reached_upstream=record.reached_upstream,
    )
