"""The gRPC access log service: Envoy's metering records in, one charge per admitted call out.

Envoy sends a record when a call ends (batched, `sidecar envoy-config`'s `access_log`):
the Lua filter's metadata (`sidecar.metering`: the reservation id and the body as it
passed, or only its first and last events when a finished stream reported usage), the
response status and Envoy's upstream timings. The charge follows
`sidecar.metering.charge` against the reservation record, as for every transport; the
records of one message are charged together, in one store step (`Engine.charge_many`),
each as it would be alone. With tracing on, each is charged on its own, in a span under
its call's trace.

Only Envoy knows a reservation id (the Lua filter removes it from the request before it
goes upstream, and it never reaches the client), so a record sent by anyone else names no
reservation it could move; with mTLS on the gRPC listener nobody else can send one.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable

import grpc
import structlog
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2

from sidecar import tracing
from sidecar.config.ruleset import RuleSet
from sidecar.engine import Engine
from sidecar.envoy.attach import EXT_AUTHZ, METERING_NAMESPACE
from sidecar.envoy.authz import METADATA_NAMESPACE
from sidecar.envoy.unanswered import CallKey, SharedUnanswered, Unanswered, call_key
from sidecar.envoy.upstream import upstream_api
from sidecar.metering.charge import Observed
from sidecar.metering.exchange import (
    charge_failed,
    charge_observed,
    note_observed,
    start_charge,
)
from sidecar.metering.parse import UsageMeter
from sidecar.metering.record import MeteringRecord, observed
from sidecar.metrics import METERING_RECORDS
from sidecar.store.budget_types import CommitResult

log = structlog.get_logger("sidecar.metering")


def _text(fields: struct_pb2.Struct, key: str) -> str:
    value = fields.fields.get(key)
    return value.string_value if value is not None else ""


def _number(fields: struct_pb2.Struct, key: str) -> int:
    value = fields.fields.get(key)
    return int(value.number_value) if value is not None else 0


def _body(meter: struct_pb2.Struct, decode: Callable[[str], bytes]) -> bytes:
    # No more chunks than keys: a count from a bad record cannot make this loop long.
    count = min(_number(meter, "chunks"), len(meter.fields))
    return b"".join(decode(_text(meter, f"c{i}")) for i in range(1, count + 1))


def record_from_entry(
    entry: accesslog_pb2.HTTPAccessLogEntry, rs: RuleSet
) -> MeteringRecord | None:
    """The metering record of one access log entry; None for a call without a reservation."""
    common = entry.common_properties
    metadata = common.metadata.filter_metadata
    if METERING_NAMESPACE not in metadata:
        return None
    meter = metadata[METERING_NAMESPACE]
    request_id = _text(meter, "rid")
    if not request_id:
        return None
    authz = metadata[EXT_AUTHZ] if EXT_AUTHZ in metadata else struct_pb2.Struct()
    decided = (
        authz.fields[METADATA_NAMESPACE].struct_value
        if METADATA_NAMESPACE in authz.fields
        else struct_pb2.Struct()
    )
    model, provider = _text(meter, "model"), _text(meter, "provider")
    done, encoded = meter.fields.get("done"), meter.fields.get("base64")
    trimmed = meter.fields.get("trimmed")
    decode: Callable[[str], bytes] = (
        base64.b64decode if encoded is not None and encoded.bool_value else str.encode
    )
    return MeteringRecord(
        request_id=request_id,
        api=upstream_api(
            rs,
            _text(meter, "path"),
            fallback=_text(meter, "route") == "fallback",
            provider=provider,
        ),
        status=entry.response.response_code.value,
        # Envoy sent the request's last byte upstream: the provider has the call.
        reached_upstream=common.HasField("time_to_last_upstream_tx_byte"),
        content_type=_text(meter, "content_type"),
        content_encoding=_text(meter, "content_encoding"),
        load_body=lambda: _body(meter, decode),
        head=_text(meter, "head").encode(),
        end=_text(meter, "end").encode(),
        end_offset=_number(meter, "end_offset"),
        tail=decode(_text(meter, "tail")),
        total_bytes=_number(meter, "bytes"),
        done=done is not None and done.bool_value,
        trimmed=trimmed is not None and trimmed.bool_value,
        input_tokens=_number(decided, "input_tokens"),
        hint=(model, provider) if model else None,
        trace=tuple(
            (name, value)
            for name, value in entry.request.request_headers.items()
            if name in ("traceparent", "tracestate")
        ),
    )


def gone_call(entry: accesslog_pb2.HTTPAccessLogEntry) -> CallKey | None:
    """The call of an entry without a reservation id (a call that ended before the metering
    filter ran: the client left during the Check, or the Check failed), as the Check named
    it (sidecar/envoy/unanswered.py); None for an entry with one, or without a start."""
    common = entry.common_properties
    metadata = common.metadata.filter_metadata
    if METERING_NAMESPACE in metadata and _text(metadata[METERING_NAMESPACE], "rid"):
        return None
    started = common.start_time
    if not started.seconds:
        return None
    return call_key(started.seconds, started.nanos, entry.request.request_id)


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        engine: Engine,
        unanswered: Unanswered | None = None,
        shared: SharedUnanswered | None = None,
    ) -> None:
        self._engine = engine
        # The Authorization servicer's: admitted calls by what Envoy logs of them.
        self._unanswered = unanswered
        # With other processes on the store: where calls gone unmatched here are published.
        self._shared = shared

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            rs = self._engine.holder.current
            batch: list[MeteringRecord] = []
            gone: list[str] = []
            unmatched: list[CallKey] = []
            for entry in message.http_logs.log_entry:
                try:
                    record = record_from_entry(entry, rs)
                except Exception as exc:  # one bad record must not lose the rest
                    log.error("metering_record_unreadable", error=str(exc))
                    continue
                if record is None:
                    unanswered = self._unanswered
                    key = gone_call(entry) if unanswered is not None else None
                    if key is not None and unanswered is not None:
                        request_id = unanswered.gone(key)
                        if request_id is not None:
                            gone.append(request_id)
                        elif self._shared is not None:
                            unmatched.append(key)
                    continue
                METERING_RECORDS.inc()
                if tracing.ENABLED:  # each charge a span of its own, under its call's trace
                    start_charge(self._charge(record))
                else:
                    batch.append(record)
            if batch:
                # The whole batch in one store step: one hand-over to the store's thread.
                start_charge(self._charge_batch(batch))
            if gone:
                start_charge(self._withdraw(gone))
            if unmatched and self._shared is not None:
                start_charge(self._publish(self._shared, unmatched))
        return als_pb2.StreamAccessLogsResponse()

    @staticmethod
    async def _publish(shared: SharedUnanswered, keys: list[CallKey]) -> None:
        for key in keys:
            try:
                await shared.publish(key)
            except Exception as exc:  # the call's reservation then expires, as before
                log.warning("unanswered_publish_failed", error=str(exc))
                return

    async def _withdraw(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            log.info("unanswered_call_released", request_id=request_id)
            await self._engine.withdraw(request_id)

    async def _charge(self, record: MeteringRecord) -> None:
        if record.trace:
            with tracing.remote_parent(dict(record.trace)):
                await self._charge_now(record)
        else:
            await self._charge_now(record)

    async def _charge_now(self, record: MeteringRecord) -> None:
        seen, meter = _observed(record)
        await charge_observed(
            self._engine,
            record.request_id,
            seen,
            hint=record.hint,
            reason=_reason(record),
            meter=meter,
        )

    async def _charge_batch(self, records: list[MeteringRecord]) -> None:
        charges: list[tuple[str, Observed, tuple[str, str] | None]] = []
        for record in records:
            seen, meter = _observed(record)
            note_observed(record.request_id, seen, reason=_reason(record), meter=meter)
            charges.append((record.request_id, seen, record.hint))
        answers: list[tuple[CommitResult, int] | Exception]
        try:
            answers = await self._engine.charge_many(charges)
        except Exception as exc:  # the engine answers per charge; this is a bug, logged
            answers = [exc] * len(charges)
        for (request_id, _, _), answer in zip(charges, answers, strict=True):
            if isinstance(answer, Exception):
                charge_failed(request_id, answer)


def _reason(record: MeteringRecord) -> str:
    return "complete" if record.done else "incomplete"


def _observed(record: MeteringRecord) -> tuple[Observed, UsageMeter | None]:
    try:
        return observed(record)
    except Exception as exc:  # a body that cannot be decoded: charge as if unread
        log.error("metering_record_unreadable", request_id=record.request_id, error=str(exc))
        return Observed(status=record.status, reached_upstream=record.reached_upstream), None
