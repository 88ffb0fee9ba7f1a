"""Meters fed a whole response, as the parsers' billing tests feed them."""

from __future__ import annotations

import json
from typing import Any

from sidecar.metering.charge import Observed
from sidecar.metering.parse import Api, UsageMeter


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
