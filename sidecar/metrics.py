"""Prometheus metrics: one registry, label sets kept small and bounded."""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REGISTRY = CollectorRegistry(auto_describe=True)
# Brings computed gauges up to date just before a scrape (set by the running services).
on_scrape: Callable[[], None] | None = None


def exposition() -> bytes:
    """What /metrics serves: this process's registry, or under `sidecar serve --workers N`
    (PROMETHEUS_MULTIPROC_DIR set by the parent) the sums over every worker's files, so
    any worker answers for all of them."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if on_scrape is not None:
        on_scrape()
    if not directory:
        return bytes(generate_latest(REGISTRY))
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return bytes(generate_latest(registry))


DECISIONS = Counter(
    "sidecar_decisions_total",
    "Check decisions by result and reason",
    ["result", "reason"],
    registry=REGISTRY,
)
CHECK_SECONDS = Histogram(
    "sidecar_check_seconds",
    "Time to answer one Check",
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
SHED = Counter(
    "sidecar_shed_total",
    "Checks refused at once with 503 because the sidecar is past capacity, by reason",
    ["reason"],
    registry=REGISTRY,
)
CHECKS_INFLIGHT = Gauge(
    "sidecar_checks_inflight",
    "Checks being decided right now",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
LOOP_LAG_SECONDS = Gauge(
    "sidecar_event_loop_lag_seconds",
    "How late the event loop ran at its last sample",
    registry=REGISTRY,
    multiprocess_mode="max",
)
CHECK_HEADROOM_SECONDS = Histogram(
    "sidecar_check_deadline_headroom_seconds",
    "Time left before the caller's deadline when a Check was answered",
    registry=REGISTRY,
    buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0),
)
CHECK_QUEUED_SECONDS = Histogram(
    "sidecar_check_queued_seconds",
    "How long a Check waited between reaching the sidecar's gRPC server and being handled "
    "(Envoy's ext_authz timeout minus the time its deadline left at the start)",
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0),
)
SPEND_MICROS = Counter(
    "sidecar_spend_micro_usd_total",
    "Committed spend in µUSD",
    ["provider", "model"],
    registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "sidecar_provider_errors_total",
    "Admitted calls answered with an error and no usage, or that never "
    "reached the provider (status_class not_reached); charged $0",
    ["provider", "status_class"],
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "sidecar_store_errors_total", "Store operations that failed", ["operation"], registry=REGISTRY
)
ALERTS_SENT = Counter(
    "sidecar_alerts_total",
    "Spend alerts fired, by rule and threshold",
    ["rule", "threshold"],
    registry=REGISTRY,
)
WEBHOOK_FAILURES = Counter(
    "sidecar_alert_webhook_failures_total",
    "Alert webhook deliveries that failed after every retry",
    registry=REGISTRY,
)
RELOADS = Counter(
    "sidecar_config_reloads_total", "Config reloads by result", ["result"], registry=REGISTRY
)
JWKS_REFRESHES = Counter(
    "sidecar_jwks_refreshes_total", "JWKS fetches by result", ["result"], registry=REGISTRY
)
ADMIN_AUTH_FAILURES = Counter(
    "sidecar_admin_auth_failures_total",
    "Admin API calls refused: bad_credential, not_admin, or throttled after too many",
    ["reason"],
    registry=REGISTRY,
)
ATTEMPTS_THROTTLED = Counter(
    "sidecar_attempts_throttled_total",
    "Requests refused by a failed-attempt limit, by limit",
    ["limit"],
    registry=REGISTRY,
)
REQUESTS = Counter(
    "sidecar_requests_total",
    "LLM calls admitted, by provider and model",
    ["provider", "model"],
    registry=REGISTRY,
)
METERING = Counter(
    "sidecar_metering_commits_total",
    "Metering records by outcome: committed, late (after the reservation had expired into "
    "its estimate), duplicate, unknown (no reservation found), unpriced, spooled (store "
    "away), error (lost; the reservation's estimate is charged at expiry)",
    ["status"],
    registry=REGISTRY,
)
METERING_RECORDS = Counter(
    "sidecar_metering_records_total",
    "Metering records received from Envoy's gRPC access log (one per admitted call through "
    "Envoy; a call whose record Envoy dropped is charged its reservation at expiry)",
    registry=REGISTRY,
)
UNANSWERED_CALLS = Counter(
    "sidecar_unanswered_calls_total",
    "Calls admitted whose answer Envoy never acted on (decided after its deadline, or the "
    "client left while the Check waited): their reservations released at $0",
    registry=REGISTRY,
)
RESERVATIONS_EXPIRED = Counter(
    "sidecar_reservations_expired_total",
    "Reservations the periodic settle pass charged their estimate because no metering "
    "record or report came within admission.reservation_ttl",
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "sidecar_store_seconds",
    "Time of one store round trip on the request path, by operation",
    ["operation"],
    registry=REGISTRY,
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
# Gauges below describe the shared store, so every replica reports the same value, or a
# part of it (the buckets its own traffic touched): aggregate them with max(), not sum().
RESERVATIONS_OPEN = Gauge(
    "sidecar_reservations_open",
    "Reservations held in the store, not yet committed or expired",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
UTILISATION_MAX = Gauge(
    "sidecar_budget_max_utilisation_ratio",
    "Highest (spent + reserved) / limit of any bucket of the rule in its current window",
    ["rule"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
BUCKETS_AT_THRESHOLD = Gauge(
    "sidecar_budget_buckets_at_threshold",
    "Buckets of the rule whose spent + reserved reached the alert threshold (percent of the "
    "limit) in the current window",
    ["rule", "threshold"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)

# Label values known in advance are exported from the start, at 0: a rate or an alert on
# an error counter then works before the first error rather than seeing no series at all.
for _operation in ("reserve", "commit"):
    STORE_ERRORS.labels(_operation)
    STORE_SECONDS.labels(_operation)
for _result in ("ok", "error"):
    RELOADS.labels(_result)
    JWKS_REFRESHES.labels(_result)
for _status in ("committed", "late", "duplicate", "unknown", "unpriced", "spooled", "error"):
    METERING.labels(_status)
for _reason in ("queue_full", "deadline", "loop_lag"):
    SHED.labels(_reason)

# Models seen beyond this many are counted under "other": a client choosing arbitrary model
# names must not be able to blow up the metric's cardinality.
MAX_MODEL_LABELS = 200
_models: set[str] = set()


def model_label(model: str) -> str:
    if model in _models:
        return model
    if len(_models) < MAX_MODEL_LABELS:
        _models.add(model)
        return model
    return "other"


_Child = TypeVar("_Child", Counter, Gauge, Histogram)


class Children(Generic[_Child]):
    """`metric.labels(*values)`, remembered per label values: on the Check path that call
    (a lock, the values rebuilt as strings, a dict lookup) cost more than the increment.
    For metrics whose label values are bounded (as every metric's here must be); past
    `bound` children, each call asks the metric."""

    def __init__(self, metric: _Child, bound: int = 4096) -> None:
        self._metric: _Child = metric
        self._bound = bound
        self._children: dict[tuple[str, ...], _Child] = {}

    def __call__(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._children) < self._bound:
                self._children[values] = child
        return child


def observer(histogram: Histogram) -> Callable[[float], None]:
    """`histogram.observe`, for a histogram without labels (or a labelled child) observed on
    every Check: the bucket found by bisection, no per-call checks for labels or exemplars
    (~1 µs less per call, measured). The same samples as `observe`; a test compares them."""
    try:
        total, buckets = histogram._sum, histogram._buckets
        bounds = list(histogram._upper_bounds)
    except AttributeError:  # another prometheus_client: its own observe
        return histogram.observe
    if len(buckets) != len(bounds) or bounds[-1] != float("inf"):
        return histogram.observe
    fallback = histogram.observe

    def observe(amount: float) -> None:
        if amount != amount:  # NaN: in no bucket, as observe has it
            fallback(amount)
            return
        total.inc(amount)
        buckets[bisect_left(bounds, amount)].inc(1)

    return observe


DECISION_COUNT = Children(DECISIONS)
# By provider and model label (model_label: a bounded set).
REQUEST_COUNT = Children(REQUESTS)
