"""Secrets at rest: a copy of the store does not hand out device login's signing key or CSRF
secret, and the SQLite files are readable by their owner only."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet

from devtools.config import demo_key_env
from sidecar.budget.spool import Spool
from sidecar.config.loader import ConfigError
from sidecar.identity.device import DeviceLogin
from sidecar.identity.signing_keys import KEYS
from sidecar.services import build_services
from sidecar.store.base import Store
from sidecar.store.factory import open_store
from tests.security.conftest import Site, admin_token, device_token

REPO = Path(__file__).resolve().parents[2]


def raw_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_store_holds_no_pem_and_no_plain_csrf_secret(site: Site, tmp_path: Path) -> None:
    client = site.client()
    device_token(client, site.admin_person())  # makes the signing key and the CSRF secret
    login = site.services.device_login
    assert login is not None
    csrf = asyncio.run(login.csrf_secret())
    docs = asyncio.run(site.services.store.list_docs(KEYS, now=time.time()))
    assert docs and all("private_pem" not in d and "private_sealed" in d for d in docs)
    raw = raw_bytes(tmp_path / "sidecar.db")
    assert b"PRIVATE KEY" not in raw
    assert csrf.hex().encode() not in raw and csrf not in raw
    assert b"-----BEGIN" not in raw


async def test_secrets_are_sealed_in_redis_too(store: Store) -> None:
    from sidecar.identity.secret_box import SecretBox, new_key

    login = DeviceLogin(store, "https://gw.example.com", box=SecretBox(new_key(), "test"))
    await login.keys.jwks()
    secret = await login.csrf_secret()
    now = time.time()
    dumped = json.dumps(
        [*await store.list_docs(KEYS, now=now), *await store.list_docs("device_secrets", now=now)]
    )
    assert "PRIVATE KEY" not in dumped and secret.hex() not in dumped


def test_sqlite_store_and_spool_files_are_0600(site: Site, tmp_path: Path) -> None:
    client = site.client()
    assert client.get("/v1/service-tokens", headers=admin_token()).status_code == 200
    spool = Spool(str(tmp_path / "spool-direct.db"))

    async def use_spool() -> None:
        assert await spool.size() == 0

    asyncio.run(use_spool())
    files = [
        tmp_path / n
        for n in (
            "sidecar.db",
            "sidecar.db-wal",
            "sidecar.db-shm",
            "spool-direct.db",
            "spool-direct.db-wal",
            "spool-direct.db-shm",
        )
    ]
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    asyncio.run(spool.close())
    assert modes == dict.fromkeys(modes, 0o600), modes


def test_an_existing_world_readable_database_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    db.write_bytes(b"")
    db.chmod(0o644)

    async def touch() -> None:
        store = await open_store(f"sqlite:///{db}")
        await store.close()

    asyncio.run(touch())
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_a_wrong_key_is_a_clear_startup_error(
    site: Site, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    device_token(site.client(), site.admin_person())
    config = tmp_path / "sidecar.yaml"
    monkeypatch.setenv("SIDECAR_SECRET_KEY", Fernet.generate_key().decode())
    with pytest.raises(ConfigError) as wrong:
        asyncio.run(build_services(config))
    assert "$SIDECAR_SECRET_KEY does not open the secrets in the store" in str(wrong.value)
    monkeypatch.setenv("SIDECAR_SECRET_KEY", "not-a-key")
    with pytest.raises(ConfigError) as malformed:
        asyncio.run(build_services(config))
    assert "$SIDECAR_SECRET_KEY is not a valid secret key" in str(malformed.value)
    monkeypatch.delenv("SIDECAR_SECRET_KEY")
    with pytest.raises(ConfigError) as missing:
        asyncio.run(build_services(config))
    assert "set $SIDECAR_SECRET_KEY (secrets.key_env) or secrets.key_file" in str(missing.value)


def test_serve_refuses_to_start_without_a_key(tmp_path: Path, site: Site) -> None:
    # Everything it needs but the secret key (the provider keys included).
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **demo_key_env()}
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "serve", "--config", str(tmp_path / "sidecar.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "identity.device_login is enabled" in result.stderr
    assert "Traceback" not in result.stderr


def test_key_file_is_read_and_wins_over_the_environment(
    make_site: Callable[..., Site], tmp_path: Path
) -> None:
    key_file = tmp_path / "secret.key"
    key_file.write_text(Fernet.generate_key().decode() + "\n")
    site = make_site(secrets={"key_file": str(key_file)})
    device_token(site.client(), site.admin_person())
    config = tmp_path / "sidecar.yaml"
    data = yaml.safe_load(config.read_text())
    data["secrets"] = {"key_file": str(tmp_path / "missing.key")}
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as missing:
        asyncio.run(build_services(config))
    assert "cannot read the secret key file" in str(missing.value)


def test_plain_secrets_of_an_earlier_version_are_encrypted_on_start(
    make_site: Callable[..., Site], tmp_path: Path
) -> None:
    from sidecar.identity.secret_box import SecretBox, new_key
    from sidecar.identity.signing_keys import new_key_doc

    async def plant() -> str:
        # The documents an earlier version wrote: the private key as plain PEM.
        store = await open_store(f"sqlite:///{tmp_path}/sidecar.db")
        old_box = SecretBox(new_key(), "x")
        doc = new_key_doc(time.time(), old_box)
        doc["private_pem"] = old_box.open(doc.pop("private_sealed")).decode()
        now = time.time()
        await store.put_doc(KEYS, doc["kid"], doc, now=now)
        await store.put_doc(
            "signing_key_active", "current", {"kid": doc["kid"], "since": 0}, now=now
        )
        await store.put_doc("device_secrets", "csrf", {"key": "ab" * 32}, now=now)
        await store.close()
        return str(doc["kid"])

    kid = asyncio.run(plant())
    site = make_site()
    docs = asyncio.run(site.services.store.list_docs(KEYS, now=time.time()))
    assert all("private_pem" not in d and "private_sealed" in d for d in docs)
    old = [d for d in docs if d["kid"] == kid]
    assert old and old[0]["retired_at"] is not None, "the exposed key no longer signs"
    token = device_token(site.client(), site.admin_person())
    assert (
        site.client()
        .get("/v1/budgets/me", headers={"authorization": f"Bearer {token}"})
        .status_code
        == 200
    )
    login = site.services.device_login
    assert login is not None
    assert asyncio.run(login.csrf_secret()) != bytes.fromhex("ab" * 32), "replaced"
    assert b"PRIVATE KEY" not in raw_bytes(tmp_path / "sidecar.db")


def test_store_url_env_is_required_once_named(tmp_path: Path) -> None:
    from sidecar.config.models import StoreConfig
    from sidecar.store.factory import store_url

    config = StoreConfig(url="redis://redis:6379/0", url_env="SIDECAR_STORE_URL")
    secret = "redis://:s3cret@redis:6379/0"
    assert store_url(tmp_path, config, {"SIDECAR_STORE_URL": secret}) == secret
    with pytest.raises(ConfigError) as unset:
        store_url(tmp_path, config, {})
    assert "$SIDECAR_STORE_URL must hold a store URL" in str(unset.value)
    assert "not set" in str(unset.value)
    with pytest.raises(ConfigError) as wrong:
        store_url(tmp_path, config, {"SIDECAR_STORE_URL": "s3cret"})
    assert "s3cret" not in str(wrong.value)
    assert (
        store_url(tmp_path, StoreConfig(url="redis://redis:6379/0"), {}) == "redis://redis:6379/0"
    )
