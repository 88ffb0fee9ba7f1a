"""Process settings read once per loaded rule set, never per request; the settle pass run
on an injected clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.budget.settle import Settler
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import RuleSetHolder, build_ruleset
from sidecar.metrics import REGISTRY
from sidecar.settings import SettingsHolder
from sidecar.store.budget_types import BucketView, LedgerDims, ReserveRequest
from sidecar.store.sqlite_store import SQLiteStore

T0 = 1_900_000_000.0


def test_settings_are_read_when_a_rule_set_is_loaded_not_on_each_use() -> None:
    env = {"SIDECAR_ADMIN_TOKEN": "first", "HOOK": "h1"}
    config = {"alerts": {"webhooks": [{"url": "https://hooks.example/x", "secret_env": "HOOK"}]}}
    holder = RuleSetHolder(build_ruleset(parse_config(config)))
    settings = SettingsHolder(holder, env)
    assert settings.current.admin_token == "first"
    assert settings.current.webhook_secrets == {"HOOK": "h1"}
    env["SIDECAR_ADMIN_TOKEN"] = "second"
    assert settings.current.admin_token == "first"
    holder.swap(build_ruleset(parse_config({**config, "admin": {"token_env": "OTHER"}})))
    env["OTHER"] = "third"
    assert settings.current.admin_token == "third"
    assert "third" not in repr(settings.current) and "h1" not in repr(settings.current)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/settle.db")
    yield st
    await st.close()


def expired() -> float:
    return REGISTRY.get_sample_value("sidecar_reservations_expired_total") or 0.0


async def test_settle_pass_charges_reservations_expired_by_the_injected_clock(
    store: SQLiteStore,
) -> None:
    now = [T0]
    refreshed: list[bool] = []
    settler = Settler(store, None, lambda: refreshed.append(True), clock=lambda: now[0])
    expired_before = expired()
    bucket = BucketView("b", int(T0), int(T0), 3_600, 1_000)
    assert (
        await store.reserve(
            ReserveRequest("r", (bucket,), 300, "reserve", T0, T0 + 60, LedgerDims(user="u"))
        )
    ).admitted
    assert await settler.settle_once()
    assert (await store.bucket_states([bucket], T0))[0].reserved == 300
    assert expired() == expired_before
    now[0] = T0 + 61
    assert await settler.settle_once()
    # The lost record is visible: counted (and logged once for the pass).
    assert expired() == expired_before + 1
    state = (await store.bucket_states([bucket], now[0]))[0]
    assert (state.spent, state.reserved) == (300, 0)
    assert await store.open_reservations() == 0
    assert refreshed == []  # the gauges are the loop's business, every tenth pass
