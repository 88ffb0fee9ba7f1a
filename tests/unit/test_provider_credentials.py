"""Provider keys: where they are read from, which one a caller gets, which header carries it,
what happens when one is missing, and that none of it prints the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sidecar.config.loader import ConfigError, parse_config
from sidecar.config.models import SecretSource
from sidecar.config.ruleset import RuleSetHolder, build_ruleset
from sidecar.engine import Engine
from sidecar.envoy.authz import OVERWRITE, check_response
from sidecar.log import redact
from sidecar.model import Identity, RequestAttrs
from sidecar.providers.credentials import ProviderKeys, Secret, SecretMissing, build_keys
from sidecar.store.sqlite_store import SQLiteStore

KEY = "sk-unit-openai-7d1c0ffee"
RESEARCH = "sk-unit-research-5eed"
ALICE = Identity(kind="user", subject="a", email="alice@example.com", groups=("ml",))
REPO = Path(__file__).resolve().parents[2]


def provider(**extra: Any) -> dict[str, Any]:
    return {"id": "openai", "path_prefix": "/openai/", **extra}


def keys_for(providers: list[dict[str, Any]]) -> tuple[dict[str, ProviderKeys], list[str]]:
    return build_keys(parse_config({"providers": providers}))


@pytest.fixture
def key_files(tmp_path: Path) -> Path:
    (tmp_path / "openai").write_text(KEY + "\n")
    (tmp_path / "research").write_text(RESEARCH)
    return tmp_path


def test_file_key_is_read_trimmed_and_reread_when_replaced(key_files: Path) -> None:
    secret = Secret(SecretSource(file=str(key_files / "openai")), "p")
    assert secret.value() == KEY
    staged = key_files / ".new"
    staged.write_text("sk-rotated\n")
    os.replace(staged, key_files / "openai")
    assert secret.value() == "sk-rotated"


def test_file_gone_mid_rotation_keeps_the_last_good_key(key_files: Path) -> None:
    secret = Secret(SecretSource(file=str(key_files / "openai")), "p")
    assert secret.value() == KEY
    (key_files / "openai").unlink()
    with capture_logs() as logs:
        assert secret.value() == KEY
    assert logs[0]["event"] == "provider_key_unreadable"
    assert KEY not in json.dumps(logs)
    with pytest.raises(SecretMissing):
        secret.load()


def test_env_key_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIT_OPENAI_KEY", f"  {KEY} ")
    assert Secret(SecretSource(env="UNIT_OPENAI_KEY"), "p").value() == KEY


def test_secret_never_prints_its_value(key_files: Path) -> None:
    secret = Secret(SecretSource(file=str(key_files / "openai")), "p")
    secret.value()
    assert KEY not in repr(secret) and KEY not in str(secret)
    assert "**********" in repr(secret)


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ({"env": "UNIT_ABSENT_VARIABLE"}, "environment variable UNIT_ABSENT_VARIABLE is not set"),
        ({"file": "/nonexistent/openai"}, "file /nonexistent/openai cannot be read"),
    ],
)
def test_missing_secret_names_key_path_and_source(source: dict[str, str], where: str) -> None:
    _, errors = keys_for([provider(credentials={"default": source})])
    assert len(errors) == 1
    assert errors[0].startswith(f"providers[0].credentials.default: {where}")


def test_empty_file_is_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    _, errors = keys_for(
        [provider(credentials={"by_group": {"research": {"file": str(tmp_path / "empty")}}})]
    )
    assert errors == [f"providers[0].credentials.by_group.research: file {tmp_path}/empty is empty"]


def test_build_ruleset_refuses_a_missing_key_with_file_and_key_path() -> None:
    config = parse_config(
        {"providers": [provider(credentials={"default": {"file": "/nonexistent/openai"}})]}
    )
    with pytest.raises(ConfigError) as info:
        build_ruleset(config, source="s.yaml")
    assert info.value.errors[0].startswith(
        "s.yaml: providers[0].credentials.default: file /nonexistent/openai"
    )


def test_serve_refuses_to_start_without_its_key(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        json.dumps(
            {
                "store": f"sqlite:///{tmp_path}/s.db",
                "providers": [provider(credentials={"default": {"file": str(tmp_path / "nope")}})],
            }
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "serve",
            "--config",
            str(path),
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 1, done.stderr
    assert f"providers[0].credentials.default: file {tmp_path}/nope" in done.stderr


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        ({}, {"authorization": f"Bearer {KEY}"}),
        ({"id": "anthropic"}, {"x-api-key": KEY, "anthropic-version": "2023-06-01"}),
        ({"id": "azure", "api": "azure_openai"}, {"api-key": KEY}),
        ({"id": "azure-eu"}, {"api-key": KEY}),
        ({"id": "gemini", "pricing_provider": "google"}, {"x-goog-api-key": KEY}),
        (
            {"id": "workers-ai", "pricing_provider": "cloudflare"},
            {"authorization": f"Bearer {KEY}"},
        ),
        (
            {"id": "claude", "api": "anthropic"},
            {"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        ),
    ],
)
def test_each_provider_gets_its_own_header(
    key_files: Path, extra: dict[str, str], want: dict[str, str]
) -> None:
    spec = provider(credentials={"default": {"file": str(key_files / "openai")}}, **extra)
    keys, errors = keys_for([spec])
    assert errors == []
    assert keys[spec["id"]].headers(("ml",), {}) == want


def test_anthropic_version_the_client_sent_is_kept(key_files: Path) -> None:
    keys, _ = keys_for(
        [provider(id="anthropic", credentials={"default": {"file": str(key_files / "openai")}})]
    )
    assert keys["anthropic"].headers((), {"anthropic-version": "2024-01-01"}) == {"x-api-key": KEY}


def test_group_key_wins_and_by_group_only_leaves_others_to_their_own(key_files: Path) -> None:
    both, _ = keys_for(
        [
            provider(
                credentials={
                    "default": {"file": str(key_files / "openai")},
                    "by_group": {"research": {"file": str(key_files / "research")}},
                }
            )
        ]
    )
    assert both["openai"].headers(("ml", "research"), {}) == {"authorization": f"Bearer {RESEARCH}"}
    assert both["openai"].headers(("ml",), {}) == {"authorization": f"Bearer {KEY}"}
    only, _ = keys_for(
        [provider(credentials={"by_group": {"research": {"file": str(key_files / "research")}}})]
    )
    assert only["openai"].headers(("ml",), {}) == {}


async def test_decision_sets_the_key_keeps_it_out_of_logs_and_removals(
    key_files: Path, tmp_path: Path
) -> None:
    rs = build_ruleset(
        parse_config(
            {
                "providers": [
                    provider(credentials={"default": {"file": str(key_files / "openai")}})
                ],
                "pricing": {"unknown_model": {"input_per_mtok": 1, "output_per_mtok": 1}},
            }
        )
    )

    class Auth:
        async def identify(self, headers: Any) -> tuple[Identity, tuple[str, ...]]:
            return ALICE, ("authorization",)

    store = SQLiteStore(f"sqlite:///{tmp_path}/e.db")
    engine = Engine(RuleSetHolder(rs), store, lambda _: Auth())
    body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
    attrs = RequestAttrs(
        "POST", "/openai/v1/chat/completions", {"authorization": "Bearer caller-jwt"}, body, "r1"
    )
    try:
        with capture_logs(processors=[redact]) as logs:
            decision = await engine.check(attrs)
    finally:
        await store.close()
    assert decision.allowed
    assert decision.upstream_secrets == {"authorization": f"Bearer {KEY}"}
    assert KEY not in repr(decision) and KEY not in json.dumps(logs, default=str)
    assert any(line["event"] == "decision" for line in logs)
    ok = check_response(decision).ok_response
    set_headers = {o.header.key: (o.header.value, o.append_action) for o in ok.headers}
    assert set_headers["authorization"] == (f"Bearer {KEY}", OVERWRITE)
    # The caller's credential header is overwritten, not removed: Envoy removes after it
    # sets, which would drop the key.
    assert "authorization" not in ok.headers_to_remove
