"""The usage APIs over a real SQLite ledger: shapes, sums, defaults and every 400."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from devtools.config import demo_config
from devtools.keys import DevIssuer
from sidecar.http.app import create_app
from sidecar.model import TokenUsage
from sidecar.services import Services, build_services
from sidecar.store.base import StoreUnavailable
from sidecar.store.budget_types import LedgerDims, ReserveRequest

TOKEN = "usage-api-admin-token"
T0 = 1_714_521_600  # 2024-05-01T00:00:00Z
NOW = T0 + 3 * 86400 + 1800  # 2024-05-04T00:30:00Z
HISTORY = "/accounts/acme/ai-gateway/billing/usage-history"
ALICE = LedgerDims("alice@example.com", ("ml", "eng"), "", "user", "gpt-4o-mini", "openai")
BOB = LedgerDims("bob@example.com", (), "", "user", "claude-haiku-4-5", "anthropic")

# (request id, admitted at, who, estimate µUSD, actual µUSD or None = never completed)
CHARGES: list[tuple[str, int, LedgerDims, int, int | None]] = [
    ("r1", T0 + 60, ALICE, 900, 123),
    ("r2", T0 + 3600 + 5, ALICE, 900, 77),
    ("r3", T0 + 86400 + 10, BOB, 5000, 2500),
    ("r4", NOW - 600, BOB, 333, None),  # expired: charged its estimate
]
# Answered by the provider with an error and no usage: $0, counted in `errors`.
ERRORS: list[tuple[str, int, LedgerDims, int]] = [("r5", T0 + 86400 + 20, BOB, 4000)]


async def _seed(services: Services) -> None:
    store = services.store
    for request_id, at, dims, estimate, actual in CHARGES:
        await store.reserve(ReserveRequest(request_id, (), estimate, "reserve", at, at + 60, dims))
        if actual is not None:
            await store.commit(request_id, actual, TokenUsage(10, 4), at + 1)
    for request_id, at, dims, estimate in ERRORS:
        await store.reserve(ReserveRequest(request_id, (), estimate, "reserve", at, at + 60, dims))
        await store.commit(request_id, 0, TokenUsage(), at + 1, error=True)
    await store.settle_expired(NOW)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    workdir = tmp_path_factory.mktemp("usage-api")
    issuer = DevIssuer.generate()
    jwks = issuer.write_jwks(workdir / "jwks.json")
    path = workdir / "sidecar.yaml"
    path.write_text(
        yaml.safe_dump(demo_config(issuer, str(jwks), f"sqlite:///{workdir}/sidecar.db"))
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("SIDECAR_ADMIN_TOKEN", TOKEN)
    services = asyncio.run(build_services(path))
    services.engine.clock = lambda: float(NOW)
    asyncio.run(_seed(services))
    yield services
    asyncio.run(services.close())
    mp.undo()


@pytest.fixture(scope="module")
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services)) as test_client:
        test_client.headers["authorization"] = f"Bearer {TOKEN}"
        yield test_client


def result(response: Any) -> Any:
    assert response.status_code == 200, response.text
    body = json.loads(response.text, parse_float=Decimal)
    assert body["success"] is True and body["errors"] == []
    return body["result"]


def error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["result"] is None
    return str(body["errors"][0]["message"])


def test_usage_grouped_by_user_and_model(client: TestClient) -> None:
    rows = result(client.get("/v1/usage", params={"group_by": "user,model"}))
    assert rows == [
        {
            "user": "bob@example.com",
            "model": "claude-haiku-4-5",
            "cost_usd": Decimal("0.002833"),
            "requests": 3,
            "input_tokens": 10,
            "output_tokens": 4,
            "errors": 1,
        },
        {
            "user": "alice@example.com",
            "model": "gpt-4o-mini",
            "cost_usd": Decimal("0.0002"),
            "requests": 2,
            "input_tokens": 20,
            "output_tokens": 8,
            "errors": 0,
        },
    ]


def test_usage_by_group_explodes_and_windows_by_day(client: TestClient) -> None:
    rows = result(client.get("/v1/usage", params={"group_by": "group", "window": "day"}))
    assert [(r["window_start"], r["group"], r["cost_usd"]) for r in rows] == [
        ("2024-05-01T00:00:00Z", "eng", Decimal("0.0002")),
        ("2024-05-01T00:00:00Z", "ml", Decimal("0.0002")),
        ("2024-05-02T00:00:00Z", "", Decimal("0.0025")),
        ("2024-05-04T00:00:00Z", "", Decimal("0.000333")),
    ]


def test_usage_range_accepts_iso_and_epoch_seconds(client: TestClient) -> None:
    iso = result(
        client.get("/v1/usage", params={"start": "2024-05-01", "end": "2024-05-02T00:00:00Z"})
    )
    epoch = result(client.get("/v1/usage", params={"start": str(T0), "end": str(T0 + 86400)}))
    assert (
        iso
        == epoch
        == [
            {
                "cost_usd": Decimal("0.0002"),
                "requests": 2,
                "input_tokens": 20,
                "output_tokens": 8,
                "errors": 0,
            }
        ]
    )
    offset = result(
        client.get(
            "/v1/usage",
            params={"start": "2024-05-01T03:00:00+02:00", "end": "2024-05-01T01:30:00Z"},
        )
    )
    assert offset[0]["cost_usd"] == Decimal("0.000077")  # only the 01:00 hour


def test_usage_default_range_is_thirty_days(client: TestClient) -> None:
    (total,) = result(client.get("/v1/usage"))
    # The provider error adds a request and an error, and nothing to the cost.
    assert total["cost_usd"] == Decimal("0.003033") and total["requests"] == 5
    assert total["errors"] == 1


def test_history_daily_buckets(client: TestClient) -> None:
    history = result(
        client.get(
            HISTORY,
            params={
                "value_grouping_window": "day",
                "start_time": str(T0 * 1000),
                "end_time": str(NOW * 1000),
            },
        )
    )["history"]
    assert history == [
        {
            "id": "2024-05-01T00:00:00Z",
            "aggregated_value": Decimal("0.0002"),
            "start_time": T0 * 1000,
            "end_time": (T0 + 86400) * 1000,
        },
        {
            "id": "2024-05-02T00:00:00Z",
            "aggregated_value": Decimal("0.0025"),
            "start_time": (T0 + 86400) * 1000,
            "end_time": (T0 + 2 * 86400) * 1000,
        },
        {
            "id": "2024-05-04T00:00:00Z",
            "aggregated_value": Decimal("0.000333"),
            "start_time": (T0 + 3 * 86400) * 1000,
            "end_time": (T0 + 4 * 86400) * 1000,
        },
    ]


def test_history_hourly_default_is_last_48_hours(client: TestClient) -> None:
    history = result(client.get(HISTORY, params={"value_grouping_window": "hour"}))["history"]
    # 48 h before NOW, rounded down to the hour: 2024-05-02T00:00Z.
    assert [(h["id"], h["aggregated_value"]) for h in history] == [
        ("2024-05-02T00:00:00Z", Decimal("0.0025")),
        ("2024-05-04T00:00:00Z", Decimal("0.000333")),
    ]
    fractional = result(
        client.get(
            HISTORY,
            params={
                "value_grouping_window": "hour",
                "start_time": f"{T0 * 1000}.5",
                "end_time": f"{(T0 + 7200) * 1000}",
            },
        )
    )["history"]
    assert [h["aggregated_value"] for h in fractional] == [Decimal("0.000123"), Decimal("0.000077")]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({}, "value_grouping_window is required"),
        ({"value_grouping_window": "week"}, "value_grouping_window must be one of"),
        (
            {"value_grouping_window": "day", "start_time": "yesterday"},
            "start_time must be a number",
        ),
        ({"value_grouping_window": "day", "end_time": "-5"}, "non-negative"),
        ({"value_grouping_window": "day", "end_time": "NaN"}, "non-negative"),
        (
            {"value_grouping_window": "day", "start_time": "2000", "end_time": "1000"},
            "start_time must not be after end_time",
        ),
        (
            {
                "value_grouping_window": "day",
                "start_time": "0",
                "end_time": str(401 * 86400 * 1000),
            },
            "longer than 400 days",
        ),
        ({"value_grouping_window": "day", "end_time": "1e30"}, "year 9999"),
        ({"value_grouping_window": "day", "page": "2"}, "unknown query parameter(s): page"),
    ],
)
def test_history_rejects_bad_queries(
    client: TestClient, params: dict[str, str], needle: str
) -> None:
    assert needle in error(client.get(HISTORY, params=params), 400)


def test_history_repeated_parameter_is_400(client: TestClient) -> None:
    response = client.get(HISTORY + "?value_grouping_window=day&value_grouping_window=hour")
    assert "more than once" in error(response, 400)


def test_history_unknown_account_is_404(client: TestClient) -> None:
    response = client.get(
        "/accounts/other/ai-gateway/billing/usage-history", params={"value_grouping_window": "day"}
    )
    assert "unknown account" in error(response, 404)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"group_by": "user,colour"}, "unknown dimension(s) colour"),
        ({"window": "minute"}, "window must be one of"),
        ({"start": "last tuesday"}, "epoch seconds or an ISO 8601"),
        ({"start": "2024-05-03", "end": "2024-05-01"}, "start must not be after end"),
        ({"start": "2020-01-01", "end": "2024-01-01"}, "longer than 400 days"),
        ({"group_by": "user", "sort": "cost"}, "unknown query parameter(s): sort"),
    ],
)
def test_usage_rejects_bad_queries(client: TestClient, params: dict[str, str], needle: str) -> None:
    assert needle in error(client.get("/v1/usage", params=params), 400)


def test_usage_apis_need_an_admin(client: TestClient) -> None:
    for path in ("/v1/usage", HISTORY + "?value_grouping_window=day"):
        assert error(client.get(path, headers={"authorization": ""}), 401)
        assert error(client.get(path, headers={"authorization": "Bearer wrong"}), 401)


def test_store_gone_mid_request_is_a_retryable_json_503(
    client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def dropped(*args: object, **kwargs: object) -> list[Any]:
        raise StoreUnavailable("Connection closed by server")

    monkeypatch.setattr(services.store, "ledger_rows", dropped)
    response = client.get("/v1/usage")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["success"] is False
    assert "budget store is unavailable" in response.json()["errors"][0]["message"]
