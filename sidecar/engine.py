"""The one orchestrator: check(attrs) → Decision on the way in, commit(usage) on the way out.

Request path: identity → request parsing → model allowlist → price → budget reservation
(block rules, then fallback rules, monitor rules only counted) → Decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from sidecar import tracing
from sidecar.admission.candidates import candidate_context, candidates, model_allowed
from sidecar.admission.estimate import priced, requested_geo, requested_tokens, unlimited_call
from sidecar.admission.fit import room
from sidecar.admission.plan import Plan, Planned, merge, plan
from sidecar.admission.plan_cache import PlanCache, context_key, validity
from sidecar.budget.spool import Spool
from sidecar.budget.utilisation import Utilisation
from sidecar.config.ruleset import Provider, RuleSet, RuleSetHolder
from sidecar.decision_log import log_decision
from sidecar.decisions import OVERLOADED, allow, deny, unauthenticated
from sidecar.identity.authenticate import Identifier
from sidecar.identity.errors import AuthError
from sidecar.log import info as log_info
from sidecar.metering.charge import Bill, Observed, bill, charge_tokens
from sidecar.metering.exchange import start_charge
from sidecar.metering.inflight import InFlight
from sidecar.metrics import (
    CHECK_SECONDS,
    DECISION_COUNT,
    METERING,
    PROVIDER_ERRORS,
    REQUEST_COUNT,
    SPEND_MICROS,
    STORE_ERRORS,
    STORE_SECONDS,
    UNANSWERED_CALLS,
    model_label,
    observer,
)
from sidecar.model import Decision, Identity, RequestAttrs, TokenUsage
from sidecar.money import micros_to_usd_str
from sidecar.overload import LoadShedder
from sidecar.policy.free_calls import free_call
from sidecar.policy.request import (
    BadRequest,
    parse_metadata,
    request_model,
    split_provider,
)
from sidecar.policy.rules import Context, Rule, Unit, in_unit
from sidecar.policy.service_tier import unpriced_service_tier
from sidecar.policy.unmetered import unmetered_call
from sidecar.policy.unpriced_tools import unpriced_tool
from sidecar.policy.windows import RollingWindow
from sidecar.pricing import UnitPrice
from sidecar.providers.credentials import injected_headers
from sidecar.shielded import shielded
from sidecar.store.base import ShardUnavailable, Store, StoreUnavailable
from sidecar.store.budget_types import (
    BucketState,
    BucketView,
    Charge,
    CommitResult,
    LedgerDims,
    LedgerPart,
    Reservation,
    ReserveRequest,
    ReserveResult,
)

log = structlog.get_logger("sidecar.decision")
_observe_check = observer(CHECK_SECONDS)
_observe_reserve = observer(STORE_SECONDS.labels("reserve"))
_COMMIT_SECONDS = STORE_SECONDS.labels("commit")


class AttributionMismatch(ValueError):
    """A usage report named another model or provider than its reservation was made for."""


class AlertSink(Protocol):
    """Told of each admitted request's bucket states (the spend alerts); must not block."""

    def observe(self, budget: Plan, states: Sequence[BucketState], now: float) -> None: ...


class NoAlerts:
    def observe(self, budget: Plan, states: Sequence[BucketState], now: float) -> None:
        return None


class _RandomBytes:
    """os.urandom read 4 KiB at a time: one system call per 256 ids instead of one each.
    A forked child starts with a fresh buffer, never its parent's remaining bytes."""

    _SIZE = 4096

    def __init__(self) -> None:
        self._buffer = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._buffer, self._at = b"", 0

    def take16(self) -> bytearray:
        at = self._at
        if at + 16 > len(self._buffer):
            self._buffer, at = os.urandom(self._SIZE), 0
        self._at = at + 16
        return bytearray(self._buffer[at : at + 16])


_random = _RandomBytes()


def new_request_id(now_ns: Callable[[], int] = time.time_ns) -> str:
    """A UUID of version 7 (RFC 9562) as 32 hex digits: the Unix time in milliseconds, then
    74 random bits (unguessable, so knowing one is proof of having seen the request).

    Time first because the SQLite store keeps a week of reservations under a unique index
    of their ids: ids that grow with time are appended to that index, where random ones
    land on a random page each (a page read, and a page written at the next commit, per
    reservation; twice the CPU per row already at 200,000 rows)."""
    raw = _random.take16()
    raw[0:6] = (now_ns() // 1_000_000).to_bytes(6, "big")
    raw[6] = (raw[6] & 0x0F) | 0x70  # version 7
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def binding(identity: Identity, model: str, provider: str, amount: int) -> str:
    """What a reservation is for, as the store compares it on a repeated id."""
    text = "\x1f".join(
        (
            identity.kind,
            identity.issuer,
            identity.subject,
            identity.user,
            model,
            provider,
            str(amount),
        )
    )
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# The units reported in provider-style rate-limit headers (dollars have their own header).
_HEADER_UNITS: tuple[Unit, ...] = ("requests", "tokens")


def rate_limit_headers(budget: Plan, states: Sequence[BucketState]) -> dict[str, str]:
    """`x-ratelimit-limit-<unit>` and `x-ratelimit-remaining-<unit>` of the enforced bucket
    with the least room left, for each unit some enforced bucket counts."""
    if len(states) != len(budget.views):
        raise ValueError("one bucket state per planned bucket is needed")
    tightest: dict[Unit, tuple[int, int]] = {}
    for index, unit, limit in budget.enforced:
        if unit not in _HEADER_UNITS:
            continue
        left = room(limit, states[index])
        if unit not in tightest or left < tightest[unit][1]:
            tightest[unit] = (limit, left)
    headers = {}
    for unit, (limit, left) in tightest.items():
        headers[f"x-ratelimit-limit-{unit}"] = str(limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(left)
    return headers


class Engine:
    def __init__(
        self,
        holder: RuleSetHolder,
        store: Store,
        authenticator: Callable[[RuleSet], Identifier],
        *,
        runtime_rules: Callable[[], Sequence[Rule]] = lambda: (),
        alerts: AlertSink | None = None,
        spool: Spool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.holder = holder
        self.store = store
        self._authenticator = authenticator
        self._runtime_rules = runtime_rules
        self.alerts: AlertSink = alerts or NoAlerts()
        self.utilisation = Utilisation()
        self.spool = spool
        # After a store failure, skip the store for a moment: failing fast keeps Envoy's
        # check timeout from being spent waiting on a store that is known to be away.
        self._store_down_until = 0.0
        self.clock = clock
        # Called with every decision after it is made (the dashboard's recent denials);
        # each must return at once and never raise: the request path waits on none.
        self.observers: list[Callable[[RequestAttrs, Decision], None]] = []
        overload = holder.current.config.overload
        self.shedder = LoadShedder(overload.max_inflight, overload.max_loop_lag_seconds)
        self._plans: PlanCache[Plan] = PlanCache()
        # Admitted here and not charged yet: what a graceful stop waits for.
        self.inflight = InFlight()
        # Set on SIGTERM: new Checks are refused (503, retry) while admitted calls finish.
        self.draining = False

    def rules(self, rs: RuleSet) -> tuple[Rule, ...]:
        return (*rs.rules, *self._runtime_rules())

    def _plan(self, rs: RuleSet, runtime: Sequence[Rule], ctx: Context, now: float) -> Plan:
        """The merged bucket plan, from the cache while no window it names has moved on."""
        source = (rs.rules, runtime)
        key = context_key(ctx)
        cached = self._plans.get(source, key, now)
        if cached is not None:
            return cached
        budget = merge(plan((*rs.rules, *runtime), ctx, now))
        start, end = validity([p.rule for p in budget.planned], now)
        self._plans.put(key, budget, start, end)
        return budget

    async def identify(
        self, headers: Mapping[str, str], rs: RuleSet | None = None
    ) -> tuple[Identity, tuple[str, ...]] | Decision:
        """Who presented `headers`, under `rs` (the request's snapshot; default: current)."""
        try:
            found = await self._authenticator(rs or self.holder.current).identify(headers)
        except AuthError as err:
            return unauthenticated(err.code, f"invalid credentials: {err.detail}")
        if found is None:
            return unauthenticated("missing_credentials", "no credentials were presented")
        return found

    async def check(self, attrs: RequestAttrs, time_remaining: float | None = None) -> Decision:
        """Decide one request; `time_remaining` is the caller's deadline, when it has one."""
        # The one rule-set snapshot this request is decided under, however a reload races it.
        rs = self.holder.current
        overload = rs.config.overload
        shedder = self.shedder
        shedder.max_inflight = overload.max_inflight
        shedder.max_loop_lag = overload.max_loop_lag_seconds
        if self.draining or shedder.shed(time_remaining) is not None:
            # Past capacity: no identity, store or log work, just the prompt refusal.
            DECISION_COUNT("deny", "overloaded").inc()
            return OVERLOADED
        started = time.perf_counter()
        begun = shedder.begin()
        try:
            if tracing.ENABLED:
                with tracing.span("sidecar.check", attrs.headers) as span:
                    decision = await self._check(rs, attrs)
                    tracing.describe(span, decision)
            else:
                decision = await self._check(rs, attrs)
        finally:
            shedder.end(begun, time_remaining)
        seconds = time.perf_counter() - started
        _observe_check(seconds)
        if decision.request_id:
            self.inflight.admitted(decision.request_id)
        log_decision(attrs, decision, seconds)
        DECISION_COUNT("allow" if decision.allowed else "deny", decision.reason).inc()
        if decision.allowed and decision.model:
            REQUEST_COUNT(decision.provider, model_label(decision.model)).inc()
        for observe in self.observers:
            observe(attrs, decision)
        return decision

    async def _check(self, rs: RuleSet, attrs: RequestAttrs) -> Decision:
        found = await self.identify(attrs.headers, rs)
        if isinstance(found, Decision):
            return found
        identity, creds = found
        try:
            return await self._decide(rs, attrs, identity, creds)
        except BadRequest as err:
            return deny("bad_request", str(err), identity=identity)

    async def _decide(
        self, rs: RuleSet, attrs: RequestAttrs, identity: Identity, creds: tuple[str, ...]
    ) -> Decision:
        provider = rs.provider_for_path(attrs.path)
        # The path as the provider routes it, after its prefix.
        rest = attrs.path[len(provider.path_prefix) :] if provider else attrs.path
        if provider is not None and free_call(rest, attrs.method):
            # Counting tokens is not billed: nothing to reserve (sidecar/policy/free_calls.py).
            return allow(
                identity,
                attrs.headers,
                creds,
                provider_headers=self._keys(rs, provider.id, identity, attrs),
            )
        found = request_model(
            attrs,
            provider.path_prefix if provider else None,
            provider.deployments if provider else None,
        )
        # A call to a provider, or one naming a model (its provider then comes from the
        # model's name): never another service behind the same Envoy.
        if not rs.admit_unmetered and (provider is not None or found is not None):
            refused = unmetered_call(
                rest,
                attrs.method,
                attrs.headers,
                found[1] if found is not None else {},
            )
            if refused is not None:
                return deny(
                    "unmetered_call",
                    refused,
                    identity=identity,
                    model=found[0] if found is not None else "",
                )
        if found is None:
            # Names no model (listing models, reading a file): no budget, but the
            # provider's key all the same.
            return allow(
                identity,
                attrs.headers,
                creds,
                provider_headers=self._keys(rs, provider.id if provider else "", identity, attrs),
            )
        model, body = found
        if not rs.admit_any_service_tier:
            refused = unpriced_service_tier(body, rest)
            if refused is not None:
                return deny("unpriced_service_tier", refused, identity=identity, model=model)
        if not rs.admit_unpriced_tools:
            refused = unpriced_tool(body)
            if refused is not None:
                return deny("unpriced_tool", refused, identity=identity, model=model)
        if provider is None:
            named, model = split_provider(model, rs.provider_by_id)
            if named is None:
                raise BadRequest(
                    f"cannot tell the provider of model {model!r} on path {attrs.path!r}"
                )
            provider = rs.provider_by_id[named]
        metadata = parse_metadata(attrs.headers)
        return await self._admit(rs, attrs, identity, creds, model, provider, body, metadata)

    async def _admit(
        self,
        rs: RuleSet,
        attrs: RequestAttrs,
        identity: Identity,
        creds: tuple[str, ...],
        model: str,
        provider: Provider,
        body: Mapping[str, Any],
        metadata: Mapping[str, str],
    ) -> Decision:
        now = self.clock()
        # The reservation key is always minted here, never taken from the request: an id a
        # client could choose (x-request-id) could be replayed or collide with another's.
        # Minted once the first candidate's buckets are known (a store may say in the id
        # where the reservation's record will live); fallbacks keep it.
        request_id = ""
        runtime = self._runtime_rules()
        tokens = requested_tokens(rs, body, unlimited_call(attrs.path, body))
        geo = requested_geo(body)
        # (bucket, its state, the amount asked of it, the µUSD estimate, rate-limit headers)
        first_fallback: tuple[Planned, BucketState, int, int, dict[str, str]] | None = None
        for index, cand in enumerate(candidates(rs, model, provider)):
            if not model_allowed(rs, identity, cand):
                if index == 0:
                    return deny(
                        "model_not_allowed",
                        f"model {model!r} is not allowed for your groups",
                        identity=identity,
                        model=model,
                    )
                continue
            cand_model, cand_provider = cand.model, cand.provider
            found = priced(rs, cand, tokens, geo)
            if found is None:
                if index == 0:
                    return deny(
                        "unpriced_model",
                        f"model {cand_model!r} has no known price",
                        identity=identity,
                        model=cand_model,
                    )
                continue
            estimate = found[1]
            budget = self._plan(rs, runtime, candidate_context(identity, cand, metadata), now)
            dims = LedgerDims(
                identity.user,
                identity.groups,
                identity.token_name,
                identity.kind,
                cand.canonical,
                cand_provider.id,
            )
            request_id = request_id or self._mint(budget.views)
            request = ReserveRequest(
                request_id,
                budget.views,
                estimate,
                rs.admission_mode,
                now,
                now + rs.reservation_ttl,
                dims,
                binding(identity, cand_model, cand_provider.id, estimate),
                tokens,
            )
            if time.monotonic() < self._store_down_until:
                return await self._store_down(
                    rs,
                    StoreUnavailable("store unavailable (recent failure)"),
                    identity,
                    attrs,
                    creds,
                    cand_model,
                    cand_provider,
                    request,
                    attempted=False,
                )
            started = time.perf_counter()
            try:
                with tracing.span("sidecar.store.reserve", buckets=len(budget.views)):
                    request, result = await self._reserve(request)
            except StoreUnavailable as err:
                if not isinstance(err, ShardUnavailable):
                    # A shard that is down fails only the decisions that need it; the
                    # others go on asking.
                    self._store_down_until = time.monotonic() + 0.5
                STORE_ERRORS.labels("reserve").inc()
                return await self._store_down(
                    rs, err, identity, attrs, creds, cand_model, cand_provider, request
                )
            _observe_reserve(time.perf_counter() - started)
            if len(result.states) == len(budget.views):
                self.utilisation.observe(budget, result.states)
            limits = (
                rate_limit_headers(budget, result.states)
                if len(result.states) == len(budget.views)
                else {}
            )
            if result.admitted:
                self.alerts.observe(budget, result.states, now)
                fallback_from = model if index else None
                return allow(
                    identity,
                    attrs.headers,
                    creds,
                    model=cand_model,
                    provider=cand_provider.id,
                    remaining=self._remaining(budget, result),
                    fallback_from=fallback_from,
                    rules=budget.rule_names(),
                    estimate=estimate,
                    input_tokens=tokens[0],
                    request_id=request.request_id,
                    limits=limits,
                    provider_headers=self._keys(rs, cand_provider.id, identity, attrs),
                )
            failed = [(budget.culprit(i), result.states[i]) for i in result.failed]
            blocking = [f for f in failed if f[0].rule.action == "block"]
            if blocking:
                planned, state = blocking[0]
                denied = await self._too_much(
                    planned,
                    state,
                    request.amount_for(planned.view),
                    now,
                    identity,
                    cand_model,
                    limits,
                )
                return replace(denied, rules=budget.rule_names(), estimate=estimate)
            if first_fallback is None:
                planned, state = failed[0]
                first_fallback = (
                    planned,
                    state,
                    request.amount_for(planned.view),
                    estimate,
                    limits,
                )
        assert first_fallback is not None
        planned, state, amount, estimate, limits = first_fallback
        denied = await self._too_much(planned, state, amount, now, identity, model, limits)
        return replace(denied, rules=(planned.rule.name,), estimate=estimate)

    async def _reserve(self, request: ReserveRequest) -> tuple[ReserveRequest, ReserveResult]:
        # A store that decides in memory answers most reservations without an await: no
        # task, no shield, no turn of the event loop (nothing can be abandoned midway).
        ready = getattr(self.store, "reserve_ready", None)
        if ready is not None:
            result = ready(request)
            if result is not None and not result.conflict:
                return request, result
        # Shielded: when the caller gives up mid-reservation (Envoy's deadline passed and
        # gRPC cancelled the Check), the store may still complete it; the request then
        # never goes upstream, so what was reserved is released at $0 rather than left to
        # expire into a charge for a call nobody made.
        # (`shielded`: asyncio.shield of a Task, with less of the generic machinery.)
        return await shielded(self._reserve_once(request), self._release_abandoned)

    def _release_abandoned(
        self, task: asyncio.Future[tuple[ReserveRequest, ReserveResult]]
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        request, result = task.result()
        if not result.admitted or result.duplicate:
            return
        start_charge(self._release(request.request_id))

    def _mint(self, buckets: Sequence[BucketView]) -> str:
        """A new reservation id: the store's own when it mints them (a Redis Cluster names
        the shard of the reservation's record in it), else `new_request_id()`."""
        mint = getattr(self.store, "mint_request_id", None)
        return new_request_id() if mint is None else str(mint(buckets))

    async def withdraw(self, request_id: str) -> None:
        """Let go of the admitted call `request_id`, whose answer its caller (Envoy) never
        acted on (decided after its deadline, or the client left while the Check waited):
        the call never goes upstream, so what it reserved is released at $0 now instead of
        expiring into a charge at `reservation_ttl`."""
        UNANSWERED_CALLS.inc()
        self.inflight.charged(request_id)  # no record will come for it: not waited for
        # A task of its own, awaited through a shield: the caller is often a Check that
        # Envoy is giving up on at this moment, and gRPC then cancels it mid-release; the
        # release goes on (and shutdown waits for it, `drain_charges`).
        await asyncio.shield(start_charge(self._release(request_id)))

    async def _release(self, request_id: str) -> None:
        try:
            await self.store.commit(
                request_id, 0, TokenUsage(), self.clock(), error=True, tokens=(0, 0)
            )
        except Exception as exc:  # the reservation then expires into its estimate
            log.warning("abandoned_release_failed", request_id=request_id, error=str(exc))
            return
        log.info("abandoned_reservation_released", request_id=request_id)

    async def _reserve_once(self, request: ReserveRequest) -> tuple[ReserveRequest, ReserveResult]:
        result = await self.store.reserve(request)
        for _ in range(3):
            if not result.conflict:
                break
            # The id is taken (a minted id never is, but a store is not ours to trust on
            # that): decide afresh under a new one, never wave the request through.
            log.warning("reservation_id_conflict", request_id=request.request_id)
            request = replace(request, request_id=self._mint(request.buckets))
            result = await self.store.reserve(request)
        if result.conflict:
            raise StoreUnavailable("reservation ids keep colliding")
        return request, result

    @staticmethod
    def _keys(
        rs: RuleSet, provider_id: str, identity: Identity, attrs: RequestAttrs
    ) -> dict[str, str]:
        return injected_headers(rs.provider_keys, provider_id, identity.groups, attrs.headers)

    @staticmethod
    def _remaining(budget: Plan, result: ReserveResult) -> str | None:
        states = result.states
        if len(states) != len(budget.views):
            raise ValueError("one bucket state per planned bucket is needed")
        left = [room(limit, states[i]) for i, unit, limit in budget.enforced if unit == "usd"]
        return micros_to_usd_str(min(left)) if left else None

    async def _too_much(
        self,
        planned: Planned,
        state: BucketState,
        amount: int,
        now: float,
        identity: Identity,
        model: str,
        limits: Mapping[str, str],
    ) -> Decision:
        """The 429 for a bucket without room for `amount` (in the bucket's measure)."""
        rule = planned.rule
        unit = rule.unit
        extra: dict[str, Any] = {}
        if rule.measure in ("input_tokens", "output_tokens"):
            extra["tokens"] = rule.measure.removesuffix("_tokens")
        if amount > rule.limit:
            # Waiting frees nothing that would let this request in, so no Retry-After.
            if unit == "usd":
                what = (
                    f"estimated cost (${micros_to_usd_str(amount)}) is more than the "
                    f"whole limit of {rule.name!r} for {planned.bucket_label} "
                    f"(${micros_to_usd_str(rule.limit)})"
                )
            else:
                what = (
                    f"estimated {unit} ({amount}) are more than the whole limit of "
                    f"{rule.name!r} for {planned.bucket_label} ({rule.limit})"
                )
            return deny(
                "spend_limit_exceeded",
                f"this request's {what}; lower max_tokens or shorten the input",
                headers=limits,
                identity=identity,
                model=model,
                code="request_exceeds_limit",
                rule=rule.name,
                bucket=planned.bucket_label,
                unit=unit,
                estimate=in_unit(unit, amount),
                limit=in_unit(unit, rule.limit),
                **extra,
            )
        if isinstance(rule.window, RollingWindow):
            # Retry when enough of what the window holds has aged out to make room.
            needed = state.spent + state.reserved + amount - rule.limit
            try:
                slots = (await self.store.bucket_states([planned.view], now))[0].slots
            except StoreUnavailable:
                slots = {}
            retry = rule.window.retry_after(now, slots, max(needed, 1))
            resets = int(now) + retry
        else:
            resets = rule.window.resets_at(now)
            retry = max(1, resets - int(now))
        noun = "spend" if unit == "usd" else "rate"
        return deny(
            "spend_limit_exceeded",
            f"{noun} limit {rule.name!r} reached for {planned.bucket_label}",
            headers={"retry-after": str(retry), **limits},
            identity=identity,
            model=model,
            rule=rule.name,
            bucket=planned.bucket_label,
            unit=unit,
            spent=in_unit(unit, state.spent),
            reserved=in_unit(unit, state.reserved),
            limit=in_unit(unit, rule.limit),
            resets_at=datetime.fromtimestamp(resets, UTC).isoformat().replace("+00:00", "Z"),
            **extra,
        )

    async def _store_down(
        self,
        rs: RuleSet,
        err: StoreUnavailable,
        identity: Identity,
        attrs: RequestAttrs,
        creds: tuple[str, ...],
        model: str,
        provider: Provider,
        request: ReserveRequest,
        attempted: bool = True,
    ) -> Decision:
        # The one place the failure mode is chosen: closed by default, because admitting
        # without a budget check is spending money nobody approved.
        mode = rs.config.store.on_error
        log.error("store_unavailable", error=str(err), mode=mode)
        if mode == "fail_open" and self.spool is not None:
            # Admitted unchecked, but never uncharged: the spool replays it when the store
            # is back (the estimate, or the actual cost once the response is metered).
            await self.spool.admitted(request)
            return allow(
                identity,
                attrs.headers,
                creds,
                model=model,
                provider=provider.id,
                request_id=request.request_id,
                provider_headers=self._keys(rs, provider.id, identity, attrs),
            )
        if attempted and self.spool is not None:
            # The store may have made the reservation before the failure reached us (a reply
            # lost with the connection). The request is refused and never goes upstream, so
            # a $0 release is queued: replayed when the store is back, it frees such a
            # reservation, and changes nothing when there is none.
            await self.spool.completed(
                request.request_id, 0, TokenUsage(), error=True, tokens=(0, 0)
            )
        return deny(
            "store_unavailable",
            "the budget store is unavailable; try again shortly",
            headers={"retry-after": "1"},
            identity=identity,
            model=model,
        )

    async def charge(
        self,
        request_id: str,
        observed: Observed,
        *,
        expect: tuple[str, str] | None = None,
        hint: tuple[str, str] | None = None,
    ) -> tuple[CommitResult, int]:
        """Charge a finished exchange in place of its reservation, once.

        The model, provider and caller come from the reservation record made at admission,
        never from whoever reports the usage: `expect` (model, provider) only makes a
        reporter's disagreement an error. `hint` (model, provider) is used only to price
        usage for the fail-open spool while the store is unreachable.
        """
        self.inflight.charged(request_id)
        with tracing.span("sidecar.commit") as span:
            # One rule-set snapshot prices the whole charge, however a reload races it.
            rs = self.holder.current
            result, cost = await self._charge(rs, request_id, observed, expect, hint, span)
            if span is not None:
                span.set_attributes(
                    {
                        "sidecar.cost_micro_usd": cost,
                        "sidecar.commit_status": result.status,
                        "sidecar.usage_complete": observed.complete,
                    }
                )
            return result, cost

    async def charge_many(
        self, charges: Sequence[tuple[str, Observed, tuple[str, str] | None]]
    ) -> list[tuple[CommitResult, int] | Exception]:
        """`charge` each (request id, observed, hint) of `charges` (an access log batch) in
        one store step, each as `charge` alone would: what one raised takes its place."""
        rs = self.holder.current
        pricings = []
        for request_id, observed, _ in charges:
            self.inflight.charged(request_id)
            pricings.append(_Pricing(rs, request_id, observed, None))
        started = time.perf_counter()
        try:
            answers = await self.store.charge_many(
                [(p.request_id, p) for p in pricings], self.clock()
            )
        except StoreUnavailable as err:
            answers = [err] * len(pricings)
        out: list[tuple[CommitResult, int] | Exception] = []
        for (_, _, hint), pricing, answer in zip(charges, pricings, answers, strict=True):
            try:
                out.append(await self._charged(rs, pricing, hint, answer, started))
            except Exception as exc:
                out.append(exc)
        return out

    async def _charge(
        self,
        rs: RuleSet,
        request_id: str,
        observed: Observed,
        expect: tuple[str, str] | None,
        hint: tuple[str, str] | None,
        span: Any,
    ) -> tuple[CommitResult, int]:
        pricing = _Pricing(rs, request_id, observed, expect)
        started = time.perf_counter()
        answer: CommitResult | Exception
        try:
            with tracing.span("sidecar.store.commit"):
                answer = await self.store.charge(request_id, pricing, self.clock())
        except StoreUnavailable as err:
            answer = err
        finally:
            if span is not None and pricing.record is not None:
                span.set_attributes(
                    {
                        "sidecar.model": pricing.record.dims.model,
                        "sidecar.provider": pricing.record.dims.provider,
                    }
                )
        return await self._charged(rs, pricing, hint, answer, started)

    async def _charged(
        self,
        rs: RuleSet,
        pricing: _Pricing,
        hint: tuple[str, str] | None,
        answer: CommitResult | Exception,
        started: float,
    ) -> tuple[CommitResult, int]:
        """Count, log (and spool, when the store failed) a charge the store answered."""
        request_id = pricing.request_id
        if isinstance(answer, StoreUnavailable):
            STORE_ERRORS.labels("commit").inc()
            if pricing.record is None:  # the record was not read
                return await self._charge_store_down(rs, request_id, pricing.observed, hint, answer)
            if pricing.charge is None:
                return self._unpriced(request_id, pricing.record.dims.model)
            return await self._spool_charge(request_id, pricing, answer)
        if isinstance(answer, Exception):
            raise answer
        result = answer
        record, charge, priced = pricing.record, pricing.charge, pricing.bill
        if record is None:
            METERING.labels("unknown").inc()
            log.warning("completion_unknown", request_id=request_id)
            return CommitResult("unknown"), 0
        model, provider_id = record.dims.model, record.dims.provider
        if charge is None or priced is None:
            return self._unpriced(request_id, model)
        observed = pricing.observed
        self._log_bill(request_id, model, priced)
        cost, usage = charge.micros, charge.usage
        self._count_provider_error(observed, provider_id)
        _COMMIT_SECONDS.observe(time.perf_counter() - started)
        METERING.labels(result.status).inc()
        if result.status in ("committed", "late") and cost:
            SPEND_MICROS.labels(provider_id, model_label(model)).inc(
                cost - sum(part.cost for part in priced.others)
            )
            for part in priced.others:
                SPEND_MICROS.labels(provider_id, model_label(part.model)).inc(part.cost)
        log_info(
            log,
            "completion",
            request_id=request_id,
            model=model,
            provider=provider_id,
            cost_usd=micros_to_usd_str(cost),
            status=result.status,
            input_tokens=usage.total_input,
            output_tokens=usage.output_tokens,
            usage="complete"
            if observed.complete
            else ("partial" if observed.usage is not None else "none"),
            output_bytes_seen=observed.output_bytes,
            **({"http_status": observed.status, "provider_error": True} if observed.error else {}),
            **({} if observed.reached_upstream else {"reached_upstream": False}),
        )
        return result, cost

    @staticmethod
    def _unpriced(request_id: str, model: str) -> tuple[CommitResult, int]:
        # Admitted under an older price list: charge nothing new, keep the estimate held
        # until expiry turns it into a charge (never $0).
        METERING.labels("unpriced").inc()
        log.warning("estimate_left_to_expiry", request_id=request_id, model=model)
        return CommitResult("unknown"), 0

    @staticmethod
    def _count_provider_error(observed: Observed, provider_id: str) -> None:
        if observed.error and observed.usage is None:
            status_class = (
                f"{observed.status // 100}xx" if observed.reached_upstream else "not_reached"
            )
            PROVIDER_ERRORS.labels(provider_id, status_class).inc()

    async def _spool_charge(
        self, request_id: str, pricing: _Pricing, err: StoreUnavailable
    ) -> tuple[CommitResult, int]:
        """The charge was priced but the store could not commit it: spool it for replay."""
        charge = pricing.charge
        assert charge is not None and pricing.record is not None
        self._count_provider_error(pricing.observed, pricing.record.dims.provider)
        if self.spool is None:
            METERING.labels("error").inc()
            raise err
        await self.spool.completed(
            request_id, charge.micros, charge.usage, error=charge.error, tokens=charge.tokens
        )
        METERING.labels("spooled").inc()
        log.warning("commit_spooled", request_id=request_id, error=str(err))
        return CommitResult("unknown"), charge.micros

    @staticmethod
    def _log_bill(request_id: str, model: str, charge: Bill) -> None:
        # Charged at the request's model, but the provider may bill them otherwise.
        for event, field, found in (
            ("unknown_iteration_type", "types", charge.unknown_kinds),
            ("iteration_model_unpriced", "iteration_models", charge.unpriced_models),
        ):
            if found:
                log.warning(
                    event, request_id=request_id, model=model, **{field: sorted(set(found))}
                )

    async def _charge_store_down(
        self,
        rs: RuleSet,
        request_id: str,
        observed: Observed,
        hint: tuple[str, str] | None,
        err: StoreUnavailable,
    ) -> tuple[CommitResult, int]:
        # Without the record there is no reserved amount to charge, so only reported usage
        # can be spooled; anything else is charged its estimate when the reservation (or the
        # spool's record of a fail-open admission) expires.
        price = _price(rs, *hint) if hint is not None else None
        free_error = observed.error and observed.usage is None
        if self.spool is None or (not free_error and (observed.usage is None or price is None)):
            METERING.labels("error").inc()
            log.error("commit_failed", request_id=request_id, error=str(err))
            return CommitResult("unknown"), 0
        # An error without usage needs no price: it is $0, and spooled as such so the
        # reservation is released rather than left to expire into its estimate. The spool
        # keeps one cost per request: all of it is booked under the request's model.
        hinted_model, hinted_provider = hint if hint is not None else ("", "")
        cost = (
            0
            if free_error or price is None
            else bill(
                hinted_model, price, lambda other: _price(rs, other, hinted_provider), 0, observed
            ).total
        )
        await self.spool.completed(
            request_id, cost, observed.usage or TokenUsage(), error=observed.error
        )
        METERING.labels("spooled").inc()
        log.warning("commit_spooled", request_id=request_id, error=str(err))
        return CommitResult("unknown"), cost


@dataclass(slots=True, eq=False)
class _Pricing:
    """Prices an exchange from its reservation record, as the store's `charge` asks (maybe
    on the store's thread, inside its transaction, so it only computes: logs and metrics
    wait for the caller), and keeps what it found for the caller."""

    rs: RuleSet
    request_id: str
    observed: Observed
    expect: tuple[str, str] | None
    record: Reservation | None = None
    bill: Bill | None = None
    charge: Charge | None = None

    def __call__(self, record: Reservation) -> Charge | None:
        self.record = record
        rs, model, provider_id = self.rs, record.dims.model, record.dims.provider
        if self.expect is not None and self.expect != (model, provider_id):
            raise AttributionMismatch(
                f"request {self.request_id} was admitted for model {model!r} of provider "
                f"{provider_id!r}, not {self.expect[0]!r} of {self.expect[1]!r}"
            )
        price = _price(rs, model, provider_id)
        if price is None:
            return None
        observed = self.observed = _canonical_steps(rs, self.observed, provider_id)
        charged = self.bill = bill(
            model, price, lambda other: _price(rs, other, provider_id), record.estimate, observed
        )
        others = tuple(
            LedgerPart(
                replace(record.dims, model=part.model),
                part.cost,
                part.tokens.total_input,
                part.tokens.output_tokens,
            )
            for part in charged.others
        )
        self.charge = Charge(
            charged.total,
            charged.tokens,
            observed.error,
            others,
            charge_tokens(record.tokens, observed),
        )
        return self.charge


def _price(rs: RuleSet, model: str, provider_id: str) -> UnitPrice | None:
    provider = rs.provider_by_id.get(provider_id)
    return rs.prices.price(provider.pricing_id if provider else provider_id, model)


def _canonical_steps(rs: RuleSet, observed: Observed, provider_id: str) -> Observed:
    """Iterations under the names budgets and the ledger count models by (the reservation's
    model already is one)."""
    if not any(step.model for step in observed.iterations):
        return observed
    provider = rs.provider_by_id.get(provider_id)
    pricing_id = provider.pricing_id if provider else provider_id
    steps = tuple(
        replace(step, model=rs.prices.canonical(pricing_id, step.model)) if step.model else step
        for step in observed.iterations
    )
    return replace(observed, iterations=steps)
