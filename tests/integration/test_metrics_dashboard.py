"""/metrics after real traffic through Envoy: every metric the README lists is exported with
exactly its labels and no other, and every metric the Grafana dashboard queries exists with
the labels the query names."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "sidecar.json"
CHAT = "/openai/v1/chat/completions"
# $0.002 a day per user: one call with max_tokens 2000 of gpt-4o-mini ($0.60 per million
# output tokens) reserves $0.0012, 60% of it, so the second call of a user is refused.
LIMITS = [
    {
        "name": "per-user-daily",
        "budget_usd": 0.002,
        "window": {"fixed": "daily"},
        "split": ["user"],
        "action": "block",
        "alerts": [50, 90],
    },
    {
        "name": "team-monthly",
        "budget_usd": 100,
        "window": {"fixed": "monthly"},
        "split": ["group"],
        "action": "monitor",
    },
]
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("metrics")
    issuer = DevIssuer.generate()
    jwks = issuer.write_jwks(workdir / "jwks.json")
    config = demo_config(issuer, str(jwks), f"sqlite:///{workdir}/sidecar.db", spend_limits=LIMITS)
    with running_stack(workdir, issuer, config) as stack:
        yield stack


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def scrape(stack: Stack) -> dict[str, dict[str, set[str]]]:
    """Exported sample name → label name → values seen."""
    text = httpx.get(stack.admin_url + "/metrics", timeout=10).text
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return samples


@pytest.fixture(scope="module")
def after_traffic(metrics_stack: Stack) -> dict[str, dict[str, set[str]]]:
    stack = metrics_stack
    issuer = stack.issuer
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 2000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with httpx.Client(base_url=stack.envoy_url, timeout=20) as client:
        for user in ("m1@example.com", "m2@example.com"):
            headers = {"authorization": f"Bearer {issuer.mint(user, ['ml'])}"}
            assert client.post(CHAT, json=body, headers=headers).status_code == 200
            assert client.post(CHAT, json=body, headers=headers).status_code == 429
        assert client.post(CHAT, json=body).status_code == 401
        streamed = {**body, "stream": True, "max_tokens": 5}
        headers = {"authorization": f"Bearer {issuer.mint('m3@example.com', ['ml'])}"}
        assert client.post(CHAT, json=streamed, headers=headers).status_code == 200
        # A provider error (no usage, charged $0), for the provider error counter.
        failing = {
            "authorization": f"Bearer {issuer.mint('m4@example.com', ['ml'])}",
            "x-fake-status": "500",
        }
        assert client.post(CHAT, json={**body, "max_tokens": 5}, headers=failing).status_code == 500
    # Wrong admin tokens until this address is throttled, for the admin failure counters.
    bad = {"authorization": "Bearer not-the-admin-token"}
    statuses = [
        httpx.get(stack.admin_url + "/v1/service-tokens", headers=bad, timeout=10).status_code
        for _ in range(12)
    ]
    assert statuses[0] == 401 and statuses[-1] == 429
    # A reload (the file changed), for the reload counter.
    stack.write_config(
        {**yaml.safe_load(stack.config_path.read_text()), "models": {"default": "allow"}}
    )
    wait_for(lambda: 'sidecar_config_reloads_total{result="ok"} 1.0' in metrics_text(stack))
    # The store's count of open reservations is read once a second.
    wait_for(lambda: "sidecar_reservations_open" in scrape(stack))
    wait_for(
        lambda: 'sidecar_alerts_total{rule="per-user-daily",threshold="50"}' in metrics_text(stack)
    )
    return scrape(stack)


def metrics_text(stack: Stack) -> str:
    return httpx.get(stack.admin_url + "/metrics", timeout=10).text


def readme_metrics() -> dict[str, tuple[str, set[str]]]:
    """The README's metrics table: name → (type, label names)."""
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `(sidecar_\w+)` \| (\w+) \|([^|]*)\|", readme, re.MULTILINE)
    assert rows, "README has no metrics table"
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def exported_families(samples: dict[str, dict[str, set[str]]]) -> dict[str, set[str]]:
    """Metric name as documented (counters with _total, histograms bare) → label names."""
    families: dict[str, set[str]] = {}
    for name, labels in samples.items():
        if name.endswith("_created"):
            continue
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] + "_bucket" in samples:
                base = name[: -len(suffix)]
        families.setdefault(base, set()).update(set(labels) - {"le"})
    return families


def test_every_metric_in_the_readme_is_exported_with_its_labels(
    after_traffic: dict[str, dict[str, set[str]]],
) -> None:
    documented = readme_metrics()
    exported = exported_families(after_traffic)
    assert set(exported) == set(documented)
    for name, (_, labels) in documented.items():
        assert exported[name] == labels, name
    # Names follow the conventions: counters end in _total, durations are in seconds.
    for name, (kind, _) in documented.items():
        assert name.endswith("_total") == (kind == "counter"), name
        assert "_ms" not in name and "milli" not in name


def test_traffic_shows_in_the_values(
    metrics_stack: Stack, after_traffic: dict[str, dict[str, set[str]]]
) -> None:
    families = {f.name: f for f in text_string_to_metric_families(metrics_text(metrics_stack))}

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and labels.items() <= s.labels.items()
        )

    assert value("sidecar_decisions", "sidecar_decisions_total", result="allow") == 4
    assert value("sidecar_decisions", "sidecar_decisions_total", reason="spend_limit_exceeded") == 2
    assert value("sidecar_decisions", "sidecar_decisions_total", reason="missing_credentials") == 1
    assert (
        value("sidecar_requests", "sidecar_requests_total", provider="openai", model="gpt-4o-mini")
        == 4
    )
    assert (
        value("sidecar_metering_commits", "sidecar_metering_commits_total", status="committed") == 4
    )
    assert (
        value(
            "sidecar_provider_errors",
            "sidecar_provider_errors_total",
            provider="openai",
            status_class="5xx",
        )
        == 1
    )
    assert value("sidecar_spend_micro_usd", "sidecar_spend_micro_usd_total") > 0
    assert value("sidecar_store_seconds", "sidecar_store_seconds_count", operation="reserve") == 6
    assert value("sidecar_store_seconds", "sidecar_store_seconds_count", operation="commit") == 4
    # Both users' buckets passed 50% (a reservation of 60%), none 90%.
    assert (
        value(
            "sidecar_budget_buckets_at_threshold",
            "sidecar_budget_buckets_at_threshold",
            rule="per-user-daily",
            threshold="50",
        )
        == 2
    )
    assert (
        value(
            "sidecar_budget_buckets_at_threshold",
            "sidecar_budget_buckets_at_threshold",
            rule="per-user-daily",
            threshold="90",
        )
        == 0
    )
    assert (
        0.5
        <= value(
            "sidecar_budget_max_utilisation_ratio",
            "sidecar_budget_max_utilisation_ratio",
            rule="per-user-daily",
        )
        < 0.9
    )
    assert value("sidecar_reservations_open", "sidecar_reservations_open") == 0


def dashboard_queries() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, child in node.items():
                if key == "expr" and isinstance(child, str):
                    yield child
                else:
                    yield from walk(child)
        elif isinstance(node, list):
            for child in node:
                yield from walk(child)

    return list(walk(json.loads(DASHBOARD.read_text())))


def test_dashboard_covers_what_an_operator_needs() -> None:
    queries = " ".join(dashboard_queries())
    for needed in (
        "sidecar_decisions_total",
        "sidecar_check_seconds_bucket",
        "sidecar_spend_micro_usd_total",
        "sidecar_budget_buckets_at_threshold",
        "sidecar_store_errors_total",
        "sidecar_config_reloads_total",
        "sidecar_alerts_total",
    ):
        assert needed in queries, needed
    assert "histogram_quantile(0.5," in queries and "histogram_quantile(0.99," in queries


def test_every_dashboard_query_names_exported_metrics_and_labels(
    after_traffic: dict[str, dict[str, set[str]]],
) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    for expr in queries:
        names = re.findall(r"\b(sidecar_\w+)", expr)
        assert names, expr
        for name in names:
            assert name in after_traffic, f"{name} (in {expr!r}) is not exported"
        exported_labels = set().union(*(after_traffic[n] for n in names))
        used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            used |= {label.strip() for label in group.split(",")}
        assert used - {"le"} <= exported_labels, (expr, used - exported_labels)
