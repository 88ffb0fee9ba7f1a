"""`sidecar login` / `token` / `logout` against a scripted server: polling, storage, errors."""

from __future__ import annotations

import io
import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.keys import DevIssuer
from sidecar.cli import main
from sidecar.client.login import (
    GRANT_TYPE,
    LoginError,
    credentials_path,
    login,
    logout,
    valid_token,
)

URL = "https://gateway.example.com"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def server(
    answers: list[tuple[int, dict[str, object]]],
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    pending: Iterator[tuple[int, dict[str, object]]] = iter(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/device/code":
            return httpx.Response(
                200,
                json={
                    "device_code": "dc-secret",
                    "user_code": "BCDF-GHJK",
                    "verification_uri": f"{URL}/device",
                    "verification_uri_complete": f"{URL}/device?user_code=BCDF-GHJK",
                    "expires_in": 600,
                    "interval": 5,
                },
            )
        status, body = next(pending)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handle), seen


def pending(code: str) -> tuple[int, dict[str, object]]:
    return 400, {"error": code}


@pytest.fixture
def token() -> str:
    return DevIssuer.generate(URL, "llm-sidecar").mint("alice@example.com", ttl=3600)


def test_login_polls_at_the_interval_honours_slow_down_and_stores_0600(
    tmp_path: Path, token: str
) -> None:
    transport, seen = server(
        [
            pending("authorization_pending"),
            pending("slow_down"),
            pending("authorization_pending"),
            (200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600}),
        ]
    )
    clock, out = FakeClock(), io.StringIO()
    path = tmp_path / "cfg" / "llm-sidecar" / "credentials.json"
    stored = login(
        URL + "/", out=out, path=path, transport=transport, sleep=clock.sleep, clock=clock
    )
    assert clock.sleeps == [5, 5, 10, 10]
    assert "BCDF-GHJK" in out.getvalue() and f"{URL}/device?user_code=BCDF-GHJK" in out.getvalue()
    polls = [httpx.QueryParams(r.content.decode()) for r in seen[1:]]
    assert all(p["grant_type"] == GRANT_TYPE and p["device_code"] == "dc-secret" for p in polls)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    on_disk = json.loads(path.read_text())
    assert on_disk == stored and on_disk["url"] == URL and on_disk["email"] == "alice@example.com"
    assert valid_token(URL, path=path)["access_token"] == token


def test_login_json_prints_the_code_then_the_result(tmp_path: Path, token: str) -> None:
    transport, _ = server([(200, {"access_token": token, "expires_in": 3600})])
    clock, out = FakeClock(), io.StringIO()
    login(
        URL,
        as_json=True,
        out=out,
        path=tmp_path / "c.json",
        transport=transport,
        sleep=clock.sleep,
        clock=clock,
    )
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["user_code"] == "BCDF-GHJK" and first["expires_in"] == 600
    assert second["email"] == "alice@example.com" and second["url"] == URL


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (pending("access_denied"), "denied"),
        (pending("expired_token"), "expired"),
        (pending("invalid_grant"), "invalid_grant"),
    ],
)
def test_login_stops_on_final_errors(
    tmp_path: Path, answer: tuple[int, dict[str, object]], message: str
) -> None:
    transport, _ = server([answer])
    clock = FakeClock()
    with pytest.raises(LoginError, match=message):
        login(
            URL,
            out=io.StringIO(),
            path=tmp_path / "c.json",
            transport=transport,
            sleep=clock.sleep,
            clock=clock,
        )
    assert not (tmp_path / "c.json").exists()


def test_token_refuses_absent_other_url_and_expired(tmp_path: Path, token: str) -> None:
    path = tmp_path / "c.json"
    with pytest.raises(LoginError, match="not logged in"):
        valid_token(None, path=path)
    transport, _ = server([(200, {"access_token": token, "expires_in": 3600})])
    clock = FakeClock()
    stored = login(
        URL, out=io.StringIO(), path=path, transport=transport, sleep=clock.sleep, clock=clock
    )
    with pytest.raises(LoginError, match=re.escape(f"is for {URL}")):
        valid_token("https://other.example.com", path=path)
    with pytest.raises(LoginError, match="expired"):
        valid_token(URL, path=path, clock=lambda: stored["expires_at"])
    assert logout(path=path) and not path.exists() and not logout(path=path)


def test_xdg_config_home_is_used_only_when_absolute(tmp_path: Path) -> None:
    assert (
        credentials_path({"XDG_CONFIG_HOME": str(tmp_path)})
        == tmp_path / "llm-sidecar" / "credentials.json"
    )
    assert (
        credentials_path({"XDG_CONFIG_HOME": "relative"})
        == Path.home() / ".config" / "llm-sidecar" / "credentials.json"
    )


def test_cli_token_and_logout_commands(
    tmp_path: Path, token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert main(["token"]) == 1
    assert "not logged in" in capsys.readouterr().err
    transport, _ = server([(200, {"access_token": token, "expires_in": 3600})])
    clock = FakeClock()
    login(URL, out=io.StringIO(), transport=transport, sleep=clock.sleep, clock=clock)
    assert main(["token", URL]) == 0
    assert capsys.readouterr().out.strip() == token
    assert main(["token", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["access_token"] == token
    assert main(["token", "https://other.example.com"]) == 1
    assert "run `sidecar login https://other.example.com`" in capsys.readouterr().err
    assert main(["logout", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] is True
    assert main(["token"]) == 1


def test_every_cli_option_has_help_text() -> None:
    import argparse

    from sidecar.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        bare = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    bare += walk(child, f"{path} {name}")
            elif action.help is None:
                bare.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return bare

    assert walk(build_parser(), "sidecar") == []
