"""`sidecar login`, `sidecar token`, `sidecar logout`: device-code login from a terminal.

The credential is one JSON file, readable by its owner only, under the user's config dir
(`$XDG_CONFIG_HOME/llm-sidecar/credentials.json`, default `~/.config/...`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
import jwt

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_ID = "sidecar-cli"
SLOW_DOWN_STEP = 5
# `sidecar token` refuses a token this close to expiry: a request started with it could
# be refused midway.
EXPIRY_MARGIN_SECONDS = 10


class LoginError(Exception):
    """A failure with a message meant for the person at the terminal."""


def credentials_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says relative paths in these variables are invalid and to be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "llm-sidecar" / "credentials.json"


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("https://", "http://")):
        raise LoginError(f"{url!r} is not an http(s) URL, such as https://gateway.example.com")
    return url


def save_credentials(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Created 0600 from the start: the token must never exist in a world-readable file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_credentials(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LoginError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
        raise LoginError(f"{path} is not a credential file; run `sidecar logout`")
    return data


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        return "http_error", f"HTTP {response.status_code}"
    if not isinstance(body, dict):
        return "http_error", f"HTTP {response.status_code}"
    return str(body.get("error", "http_error")), str(body.get("error_description", ""))


def _emit(out: TextIO, data: Mapping[str, Any] | None, text: str) -> None:
    # Flushed at once: scripts (and people) read the code while the command still waits.
    print(json.dumps(data) if data is not None else text, file=out, flush=True)


def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("llm-spend-sidecar")
    except PackageNotFoundError:
        ours = "dev"
    return f"sidecar-cli/{ours} ({platform.system()}; Python {platform.python_version()})"


def login(
    url: str,
    *,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    path: Path | None = None,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Run the device flow against `url` and store the credential; returns what was stored."""
    url = normalize_url(url)
    path = path or credentials_path()
    with httpx.Client(timeout=15.0, transport=transport,
                      headers={"user-agent": _user_agent()}) as http:
        try:
            response = http.post(f"{url}/device/code", data={"client_id": CLIENT_ID})
        except httpx.HTTPError as exc:
            raise LoginError(f"cannot reach {url}: {exc}") from None
        if response.status_code != 200:
            code, text = _error_of(response)
            raise LoginError(f"{url} refused to start a login: {code} {text}".rstrip())
        try:
            start = response.json()
            device_code = str(start["device_code"])
        except (ValueError, KeyError, TypeError):
            raise LoginError(f"{url} is not a sidecar with device login enabled") from None
        interval = max(1, int(start.get("interval", 5)))
        expires_in = int(start.get("expires_in", 600))
        shown = {k: start[k] for k in ("user_code", "verification_uri",
                                       "verification_uri_complete") if k in start}
        complete = shown.get("verification_uri_complete", shown.get("verification_uri"))
        _emit(out, {**shown, "expires_in": expires_in} if as_json else None,
              f"To sign in, open this address in a browser:\n\n    {complete}\n\n"
              f"and check that it shows the code {shown.get('user_code')}.\n"
              f"Waiting for approval (the code expires in {expires_in // 60} minutes)...")
        deadline = clock() + expires_in
        warned = False
        while clock() < deadline:
            sleep(interval)
            try:
                response = http.post(f"{url}/device/token", data={
                    "grant_type": GRANT_TYPE, "device_code": device_code,
                    "client_id": CLIENT_ID})
            except httpx.HTTPError as exc:
                if not warned:
                    print(f"sidecar: {url} did not answer ({exc}); still trying", file=err)
                    warned = True
                continue
            if response.status_code == 200:
                return _store(url, response.json(), path, as_json, out, clock)
            code, text = _error_of(response)
            if code == "authorization_pending":
                continue
            if code == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if code == "access_denied":
                raise LoginError("the login was denied in the browser")
            if code == "expired_token":
                break
            if response.status_code >= 500:
                continue
            raise LoginError(f"login failed: {code} {text}".rstrip())
    raise LoginError(f"the code expired before it was approved; run `sidecar login {url}` again")


def _store(url: str, answer: dict[str, Any], path: Path, as_json: bool, out: TextIO,
           clock: Callable[[], float]) -> dict[str, Any]:
    token = str(answer["access_token"])
    # Read for display only; the sidecar verifies the token on every request.
    claims = jwt.decode(token, options={"verify_signature": False})
    expires_at = float(claims.get("exp") or clock() + int(answer.get("expires_in", 0)))
    credential = {"url": url, "access_token": token, "token_type": "Bearer",
                  "expires_at": expires_at, "email": str(claims.get("email", ""))}
    save_credentials(path, credential)
    until = datetime.fromtimestamp(expires_at).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    _emit(out, {"url": url, "email": credential["email"], "expires_at": expires_at,
                "credentials": str(path)} if as_json else None,
          f"Logged in to {url} as {credential['email']} until {until}.\n"
          f"Credential saved to {path}.")
    return credential


def valid_token(url: str | None, *, path: Path | None = None,
                clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """The stored credential if it is for `url` (any, when None) and still valid."""
    path = path or credentials_path()
    credential = load_credentials(path)
    if credential is None:
        raise LoginError("not logged in; run `sidecar login URL` first")
    stored = str(credential.get("url", ""))
    if url is not None and normalize_url(url) != stored:
        raise LoginError(f"the stored credential is for {stored}, not {normalize_url(url)}; "
                         f"run `sidecar login {normalize_url(url)}`")
    if float(credential.get("expires_at", 0)) - EXPIRY_MARGIN_SECONDS <= clock():
        raise LoginError(f"the token for {stored} has expired; run `sidecar login {stored}` "
                         "again")
    return credential


def logout(*, path: Path | None = None) -> bool:
    path = path or credentials_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
