"""Meters fed a whole response, as the parsers' billing tests feed them."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from sidecar.metering.charge import Observed
from sidecar.metering.parse import Api, UsageMeter
from sidecar.metering.record import MeteringRecord


def meter_json(api: Api, body: dict[str, Any]) -> UsageMeter:
    meter = UsageMeter(api, sse=False)
    meter.feed(json.dumps(body).encode())
    meter.finish()
    return meter


def meter_stream(api: Api, events: list[dict[str, Any]], piece: int) -> UsageMeter:
    """`events` as SSE (each named by its type), fed in pieces of `piece` bytes."""
    wire = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    meter = UsageMeter(api, sse=True)
    for start in range(0, len(wire), piece):
        meter.feed(wire[start : start + piece])
    meter.finish()
    return meter


def observed(meter: UsageMeter) -> Observed:
    """What the meter saw, as a finished response's `Observed` (no status, no estimate)."""
    return Observed(
        meter.usage,
        meter.complete,
        meter.output_bytes,
        iterations=meter.iterations,
        fees=meter.fees,
    )


def end_records(api: Api, content_type: str, body: bytes) -> tuple[MeteringRecord, MeteringRecord]:
    """Envoy's records of `body` as the Lua filter sends one too large to keep whole: its
    first bytes, its first MiB and its last 4 KiB; (the body ended, the body cut there)."""
    finished = MeteringRecord(
        request_id="r1",
        api=api,
        status=200,
        reached_upstream=True,
        content_type=content_type,
        load_body=lambda: body[:1_048_576],
        head=body[:64],
        end=body[-4096:],
        end_offset=max(len(body) - 4096, 0),
        total_bytes=len(body),
        done=True,
    )
    return finished, replace(finished, done=False)
