"""`sidecar login`, `sidecar token`, `sidecar logout`: device-code login from a terminal.

The credential is one JSON file, readable by its owner only, under the user's config dir
(`$XDG_CONFIG_HOME/llm-sidecar/credentials.json`, default `~/.config/...`): the server's
URL (which the other commands then use), the access token and the refresh token that
renews it. `sidecar login --admin` keeps its short-lived admin token in
`admin-credentials.json` beside it.
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
REFRESH_GRANT = "refresh_token"
# `sidecar token` refuses a token this close to expiry: a request started with it could
# be refused midway.
EXPIRY_MARGIN_SECONDS = 10
# ... and renews it silently this long before expiry, when it has a refresh token.
REFRESH_MARGIN_SECONDS = 300


class LoginError(Exception):
    """A failure with a message meant for the person at the terminal."""


def credentials_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says relative paths in these variables are invalid and to be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "llm-sidecar" / "credentials.json"


def admin_credentials_path(env: Mapping[str, str] = os.environ) -> Path:
    return credentials_path(env).with_name("admin-credentials.json")


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


def _client(transport: httpx.BaseTransport | None, *, timeout: float) -> httpx.Client:
    return httpx.Client(timeout=timeout, transport=transport, headers={"user-agent": _user_agent()})


def _post_form(
    url: str,
    data: Mapping[str, Any],
    *,
    transport: httpx.BaseTransport | None,
    timeout: float,
) -> httpx.Response:
    """One form POST on a client of its own (raises httpx.HTTPError when unreachable)."""
    with _client(transport, timeout=timeout) as http:
        return http.post(url, data=data)


def login(
    url: str,
    *,
    admin: bool = False,
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
    path = path or (admin_credentials_path() if admin else credentials_path())
    start_params = {"client_id": CLIENT_ID, **({"scope": "admin"} if admin else {})}
    with _client(transport, timeout=15.0) as http:
        try:
            response = http.post(f"{url}/device/code", data=start_params)
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
        shown = {
            k: start[k]
            for k in ("user_code", "verification_uri", "verification_uri_complete")
            if k in start
        }
        complete = shown.get("verification_uri_complete", shown.get("verification_uri"))
        asks = (
            "This login asks for ADMIN access; an administrator must approve it.\n" if admin else ""
        )
        _emit(
            out,
            {**shown, "expires_in": expires_in} if as_json else None,
            f"{asks}To sign in, open this address in a browser:\n\n    {complete}\n\n"
            f"and check that it shows the code {shown.get('user_code')}.\n"
            f"Waiting for approval (the code expires in {expires_in // 60} minutes)...",
        )
        deadline = clock() + expires_in
        warned = False
        while clock() < deadline:
            sleep(interval)
            try:
                response = http.post(
                    f"{url}/device/token",
                    data={
                        "grant_type": GRANT_TYPE,
                        "device_code": device_code,
                        "client_id": CLIENT_ID,
                    },
                )
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


def _store(
    url: str,
    answer: dict[str, Any],
    path: Path,
    as_json: bool,
    out: TextIO,
    clock: Callable[[], float],
) -> dict[str, Any]:
    credential = _credential(url, answer, clock)
    save_credentials(path, credential)
    expires_at = credential["expires_at"]
    until = datetime.fromtimestamp(expires_at).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    _emit(
        out,
        {
            "url": url,
            "email": credential["email"],
            "expires_at": expires_at,
            "credentials": str(path),
        }
        if as_json
        else None,
        f"Logged in to {url} as {credential['email']} until {until}.\nCredential saved to {path}.",
    )
    return credential


def _credential(url: str, answer: Mapping[str, Any], clock: Callable[[], float]) -> dict[str, Any]:
    token = str(answer["access_token"])
    # Read for display only; the sidecar verifies the token on every request.
    claims = jwt.decode(token, options={"verify_signature": False})
    expires_at = float(claims.get("exp") or clock() + int(answer.get("expires_in", 0)))
    credential = {
        "url": url,
        "access_token": token,
        "token_type": "Bearer",
        "expires_at": expires_at,
        "email": str(claims.get("email", "")),
        "scope": str(claims.get("scope", "")),
    }
    if answer.get("refresh_token"):
        credential["refresh_token"] = str(answer["refresh_token"])
    return credential


def refresh(
    credential: Mapping[str, Any],
    path: Path,
    *,
    transport: httpx.BaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Trade the refresh token for a new access token (and the next refresh token)."""
    url = str(credential["url"])
    try:
        response = _post_form(
            f"{url}/device/token",
            {
                "grant_type": REFRESH_GRANT,
                "refresh_token": credential["refresh_token"],
                "client_id": CLIENT_ID,
            },
            transport=transport,
            timeout=15.0,
        )
    except httpx.HTTPError as exc:
        raise LoginError(f"cannot reach {url} to renew the token: {exc}") from None
    if response.status_code != 200:
        code, _ = _error_of(response)
        if code == "invalid_grant":
            raise LoginError(
                f"your session with {url} has ended (expired, logged out or "
                f"revoked); run `sidecar login {url}`"
            )
        raise LoginError(f"{url} refused to renew the token: HTTP {response.status_code}")
    fresh = _credential(url, response.json(), clock)
    save_credentials(path, fresh)
    return fresh


def stored_url(path: Path | None = None) -> str | None:
    """The server the last `sidecar login` was for, if any."""
    try:
        credential = load_credentials(path or credentials_path())
    except LoginError:
        return None
    return None if credential is None else str(credential.get("url", "")) or None


def valid_token(
    url: str | None,
    *,
    path: Path | None = None,
    clock: Callable[[], float] = time.time,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """The stored credential if it is for `url` (any, when None) and still valid, renewed
    first when it is close to expiry and has a refresh token."""
    path = path or credentials_path()
    credential = load_credentials(path)
    if credential is None:
        raise LoginError("not logged in; run `sidecar login URL` first")
    stored = str(credential.get("url", ""))
    if url is not None and normalize_url(url) != stored:
        raise LoginError(
            f"the stored credential is for {stored}, not {normalize_url(url)}; "
            f"run `sidecar login {normalize_url(url)}`"
        )
    expires_at = float(credential.get("expires_at", 0))
    if credential.get("refresh_token") and expires_at - REFRESH_MARGIN_SECONDS <= clock():
        return refresh(credential, path, transport=transport, clock=clock)
    if expires_at - EXPIRY_MARGIN_SECONDS <= clock():
        admin = " --admin" if credential.get("scope") == "admin" else ""
        raise LoginError(
            f"the token for {stored} has expired; run `sidecar login{admin} {stored}` again"
        )
    return credential


def logout(*, path: Path | None = None, transport: httpx.BaseTransport | None = None) -> bool:
    """Revoke the session on the server (best effort) and forget the credential."""
    path = path or credentials_path()
    try:
        credential = load_credentials(path)
    except LoginError:
        credential = None
    if credential is not None and credential.get("refresh_token"):
        revoke_session(credential, transport)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def revoke_session(
    credential: Mapping[str, Any], transport: httpx.BaseTransport | None = None
) -> bool:
    url = str(credential.get("url", ""))
    try:
        response = _post_form(
            f"{url}/device/revoke",
            {
                "token": credential["refresh_token"],
                "token_type_hint": "refresh_token",
                "client_id": CLIENT_ID,
            },
            transport=transport,
            timeout=10.0,
        )
    except httpx.HTTPError as exc:
        print(
            f"sidecar: could not reach {url} to end the session ({exc}); the stored "
            "credential is removed anyway",
            file=sys.stderr,
        )
        return False
    return response.status_code == 200
