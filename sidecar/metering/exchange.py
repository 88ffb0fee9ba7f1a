"""One admitted call's response, metered as it passes and charged exactly once.

The transports (ext_proc, the ASGI middleware) only feed it: the response status and
headers, each body chunk (getting back what the client should receive), and the end of the
exchange, complete or cut short. The charge follows `sidecar.metering.charge` and is made
against the reservation record, in a task of its own so a cancelled transport cannot lose
it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

import structlog

from sidecar.metering import load_json
from sidecar.metering.charge import Observed
from sidecar.metering.parse import Api, UsageMeter
from sidecar.metering.usage_event import UsageEventFilter
from sidecar.metrics import METERING
from sidecar.pricing import estimate_input_tokens
from sidecar.store.base import StoreUnavailable
from sidecar.store.budget_types import CommitResult

log = structlog.get_logger("sidecar.metering")


class Charger(Protocol):
    async def charge(
        self,
        request_id: str,
        observed: Observed,
        *,
        expect: tuple[str, str] | None = None,
        hint: tuple[str, str] | None = None,
    ) -> tuple[CommitResult, int]: ...


# Charges in flight, held so the event loop does not collect them while they run.
_CHARGING: set[asyncio.Task[None]] = set()


async def drain_charges() -> None:
    """Wait for the charges started so far (shutdown)."""
    if _CHARGING:
        await asyncio.gather(*list(_CHARGING), return_exceptions=True)


class MeteredExchange:
    def __init__(
        self,
        charger: Charger,
        request_id: str,
        api: Api | None,
        request_body: bytes,
        *,
        strip_usage_event: bool = False,
        hint: tuple[str, str] | None = None,
    ) -> None:
        self._charger = charger
        self.request_id = request_id
        self.api = api
        self._request_body = request_body
        self._strip = strip_usage_event
        self._hint = hint
        self.meter: UsageMeter | None = None
        self._filter: UsageEventFilter | None = None
        self.status = ""
        self.charged = False
        # Cleared by a transport that knows the request was still held when it ended.
        self.reached_upstream = True

    def start(self, status: str, headers: Mapping[str, str]) -> None:
        """The response headers arrived (lower-cased names)."""
        self.status = status
        if self.api is None:
            return
        encoding = headers.get("content-encoding", "")
        self.meter = UsageMeter.for_response(self.api, headers.get("content-type", ""), encoding)
        if self._strip and encoding.strip().lower() in ("", "identity"):
            self._filter = UsageEventFilter()

    @property
    def rewrites_body(self) -> bool:
        """The body the client receives may differ from the upstream's (length included)."""
        return self._filter is not None

    def feed(self, chunk: bytes) -> bytes:
        if self.meter is not None:
            self.meter.feed(chunk)
        return self._filter.feed(chunk) if self._filter is not None else chunk

    def end(self) -> bytes:
        """The body ended: anything still held for the client."""
        return self._filter.flush() if self._filter is not None else b""

    async def finish(self, reason: str) -> None:
        """Charge the exchange, once; shielded, so cancelling the caller cannot lose it."""
        if self.charged:
            return
        self.charged = True
        await asyncio.shield(start_charge(self._charge(reason)))

    def observed(self) -> Observed:
        meter = self.meter
        status = int(self.status) if self.status.isdigit() else 0
        if meter is None:
            return Observed(status=status, reached_upstream=self.reached_upstream)
        meter.finish()
        usage = meter.usage
        input_tokens = 0
        if usage is None and meter.output_bytes:
            parsed = load_json(self._request_body) if self._request_body else None
            input_tokens = estimate_input_tokens(parsed) if isinstance(parsed, dict) else 0
        return Observed(
            usage,
            meter.complete,
            meter.output_bytes,
            input_tokens,
            status,
            meter.iterations,
            meter.fees,
        )

    async def _charge(self, reason: str) -> None:
        await charge_observed(
            self._charger,
            self.request_id,
            self.observed(),
            hint=self._hint,
            reason=reason,
            meter=self.meter,
        )


def start_charge(charge: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run a charge in a task of its own, held until it is done (see `drain_charges`)."""
    task = asyncio.get_running_loop().create_task(charge)
    _CHARGING.add(task)
    task.add_done_callback(_CHARGING.discard)
    return task


async def charge_observed(
    charger: Charger,
    request_id: str,
    observed: Observed,
    *,
    hint: tuple[str, str] | None,
    reason: str,
    meter: UsageMeter | None,
) -> None:
    """Log what is unusual about the exchange and charge it; a store error is logged."""
    note_observed(request_id, observed, reason=reason, meter=meter)
    try:
        await charger.charge(request_id, observed, hint=hint)
    except Exception as exc:  # the response must flow even when the store is down
        charge_failed(request_id, exc)


def note_observed(
    request_id: str, observed: Observed, *, reason: str, meter: UsageMeter | None
) -> None:
    """Log what is unusual about an exchange about to be charged."""
    if observed.usage is None and observed.error:
        log.info(
            "provider_error_not_charged",
            request_id=request_id,
            status=observed.status,
            reason=reason,
            **({} if observed.reached_upstream else {"reached_upstream": False}),
        )
    elif observed.usage is None:
        log.warning(
            "no_usage_observed",
            request_id=request_id,
            status=observed.status,
            reason=reason,
            meter_error=meter.error if meter else None,
            output_bytes_seen=observed.output_bytes,
        )
    elif not observed.complete:
        log.warning(
            "partial_usage_charged", request_id=request_id, status=observed.status, reason=reason
        )


def charge_failed(request_id: str, exc: Exception) -> None:
    """A charge that raised: the reservation stays and is charged its estimate when it
    expires."""
    if not isinstance(exc, StoreUnavailable):  # the engine counted those
        METERING.labels("error").inc()
    log.error("commit_failed", request_id=request_id, error=str(exc))
