"""`sidecar.v1.Sidecar`: the sidecar's own gRPC API (protos/sidecar/v1/sidecar.proto).

For callers that cannot sit behind Envoy's ext_proc: `ReportUsage` commits a request's
actual usage against its reservation (through `Engine.charge`, so idempotent per request id,
priced at the model and provider the reservation was made for),
and `GetBudgets` shows a caller the buckets that apply to it, as `GET /v1/budgets/me` does.
Translation only: decisions and arithmetic live in the engine and `sidecar.budget.explain`.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NoReturn
from urllib.parse import unquote

import grpc
import structlog
from google.protobuf import timestamp_pb2

from sidecar.admin_access import AdminDenied
from sidecar.budget.explain import budgets_for
from sidecar.client_addr import client_address
from sidecar.engine import AttributionMismatch
from sidecar.metering.charge import Observed
from sidecar.model import Decision, TokenUsage
from sidecar.money import usd_to_micros
from sidecar.proto_gen.sidecar.v1 import sidecar_pb2 as pb
from sidecar.proto_gen.sidecar.v1 import sidecar_pb2_grpc
from sidecar.services import Services
from sidecar.store.base import StoreUnavailable
from sidecar.store.budget_types import CommitStatus

log = structlog.get_logger("sidecar.grpc_api")

SERVICE_NAME = "sidecar.v1.Sidecar"
_STATUS: Mapping[CommitStatus, pb.ReportStatus] = {
    "committed": pb.REPORT_STATUS_COMMITTED,
    "duplicate": pb.REPORT_STATUS_DUPLICATE,
    "late": pb.REPORT_STATUS_LATE,
    "unknown": pb.REPORT_STATUS_UNKNOWN,
}
_DENIED_CODE = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Far above any real call (a million-token context, a long generation), low enough that a
# garbage value cannot turn into an absurd charge.
MAX_TOKENS = 100_000_000
MAX_TEXT = 256


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def _peer_host(peer: str) -> str:
    """The host of a grpc peer string: "ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:..."."""
    _, _, rest = unquote(peer).partition(":")
    return rest.rsplit(":", 1)[0].strip("[]") if rest.count(":") else rest or peer


def _micros(usd: object) -> int:
    """Back from the JSON view's dollars: they carry at most six decimals, which a float's
    shortest repr keeps exactly, so this is the µUSD integer it was made from."""
    return usd_to_micros(Decimal(repr(usd)) if isinstance(usd, float) else str(usd))


def budget_message(row: Mapping[str, Any]) -> pb.Budget:
    resets = timestamp_pb2.Timestamp()
    resets.FromJsonString(str(row["resets_at"]))
    unit = str(row["unit"])
    common = {
        "rule": str(row["rule"]),
        "bucket": str(row["bucket"]),
        "action": str(row["action"]),
        "resets_at": resets,
        "unit": unit,
        "tokens": str(row.get("tokens", "")),
    }
    if unit == "usd":
        return pb.Budget(
            limit_micros=_micros(row["limit"]),
            spent_micros=_micros(row["spent"]),
            reserved_micros=_micros(row["reserved"]),
            remaining_micros=_micros(row["remaining"]),
            **common,
        )
    return pb.Budget(
        limit=int(row["limit"]),
        spent=int(row["spent"]),
        reserved=int(row["reserved"]),
        remaining=int(row["remaining"]),
        **common,
    )


class SidecarApi(sidecar_pb2_grpc.SidecarServicer):
    def __init__(self, services: Services) -> None:
        self._services = services

    async def _require_admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The same rule as the HTTP admin API: the admin token or an admin's own sign-in,
        never a CLI or service token, with failed attempts throttled per peer address."""
        headers: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if isinstance(value, str):
                headers[key.lower()] = value
        try:
            await self._services.admin_gate.authorize(
                headers, client_address(_peer_host(context.peer()), None, ())
            )
        except AdminDenied as exc:
            if exc.status == 401 and not headers.get("authorization"):
                await _abort(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "authorization metadata with 'Bearer <admin token>' is required",
                )
            await _abort(context, _DENIED_CODE[exc.status], exc.message)

    async def ReportUsage(
        self,
        request: pb.ReportUsageRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ReportUsageResponse:
        await self._require_admin(context)
        for name in ("request_id", "model", "provider"):
            value = getattr(request, name)
            if not value or len(value) > MAX_TEXT:
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{name} is required (at most {MAX_TEXT} characters)",
                )
        if request.provider not in self._services.ruleset.provider_by_id:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown provider {request.provider!r}: use a providers[].id",
            )
        counts = (
            request.input_tokens,
            request.output_tokens,
            request.cache_read_tokens,
            request.cache_write_tokens,
        )
        if any(c > MAX_TOKENS for c in counts):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token counts must be at most {MAX_TOKENS}",
            )
        usage = TokenUsage(*counts)
        try:
            # Priced at the model and provider of the reservation itself; the report's own
            # must agree with them, so a careless reporter hears of it.
            result, cost = await self._services.engine.charge(
                request.request_id,
                Observed(usage, complete=True),
                expect=(request.model, request.provider),
            )
        except AttributionMismatch as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreUnavailable as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"budget store: {exc}")
        log.info("usage_reported", request_id=request.request_id, status=result.status)
        return pb.ReportUsageResponse(status=_STATUS[result.status], cost_micros=cost)

    async def GetBudgets(
        self,
        request: pb.GetBudgetsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.GetBudgetsResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if request.bearer:
            headers["authorization"] = f"Bearer {request.bearer}"
        if len(request.model) > MAX_TEXT or len(request.provider) > MAX_TEXT:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "model or provider too long")
        engine = self._services.engine
        found = await engine.identify(headers)
        if isinstance(found, Decision):
            await _abort(
                context, grpc.StatusCode.UNAUTHENTICATED, found.body.decode("utf-8", "replace")
            )
        try:
            rows = await budgets_for(engine, found[0], request.model, request.provider)
        except StoreUnavailable as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"budget store: {exc}")
        return pb.GetBudgetsResponse(budgets=[budget_message(r) for r in rows])
