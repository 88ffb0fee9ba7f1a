"""Config loading: one bad-config fixture per error, each reported with file and key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config.loader import ConfigError, load_config, parse_config, redact_url
from sidecar.config.ruleset import build_ruleset

FIXTURES = Path(__file__).parents[1] / "fixtures" / "bad_configs"
EXAMPLE = Path(__file__).parents[2] / "examples" / "sidecar.yaml"


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_bad_config_names_file_and_key(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    want = expected(path)
    assert any(line.startswith(f"{path}: ") and want in line for line in info.value.errors), (
        want,
        info.value.errors,
    )


def test_every_error_is_reported_not_just_the_first() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"stores": 1, "listen": {"grpc": "x"}, "admission": {"mode": "no"}}, "c.yaml")
    assert len(info.value.errors) == 3


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    rs = build_ruleset(config)
    assert {r.name for r in rs.rules} >= {"ic-monthly", "opus-daily"}
    assert rs.providers[0].path_prefix.startswith("/")


def test_budget_keeps_the_decimal_written() -> None:
    config = parse_config(
        {"spend_limits": [{"name": "a", "budget_usd": 0.1, "window": {"fixed": "daily"}}]}
    )
    assert build_ruleset(config).rules[0].limit == 100_000


def test_store_password_is_never_printed() -> None:
    assert redact_url("redis://:hunter2@cache:6379/0") == "redis://:**********@cache:6379/0"
    assert redact_url("rediss://user:pw@h:1") == "rediss://user:**********@h:1"
    assert redact_url("sqlite:///./x.db") == "sqlite:///./x.db"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = run_cli("check-config", str(EXAMPLE))
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text("store: 'redis://:s3cret-pass@x:1/0'\nspend_limits: [{name: a}]\n")
    bad = run_cli("check-config", str(bad_path))
    assert bad.returncode == 1
    assert (
        f"{bad_path}: spend_limits[0]: exactly one of budget_usd, tokens or requests is required"
    ) in bad.stderr
    assert f"{bad_path}: spend_limits[0].window: required, but missing" in bad.stderr
    assert "s3cret-pass" not in bad.stderr + bad.stdout
    secret = tmp_path / "secret.yaml"
    secret.write_text("store: 'redis://:s3cret-pass@x:1/0'\n")
    shown = run_cli("check-config", str(secret))
    assert shown.returncode == 0 and "s3cret-pass" not in shown.stdout
    # Readable YAML-like text, not Python reprs.
    assert "{'" not in good.stdout and "['" not in good.stdout
    assert "  listen:\n    grpc: 127.0.0.1:9001\n" in good.stdout
