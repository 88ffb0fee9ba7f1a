"""Which server the CLI talks to, and with which credential.

The server: `--url`, else `$SIDECAR_URL`, else the URL of the last `sidecar login`, else
the local default. Admin commands send `$SIDECAR_ADMIN_TOKEN`, else the token of
`sidecar login --admin`; commands about the caller send `$SIDECAR_TOKEN`, else the token
of `sidecar login` (renewed silently), else the admin login's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sidecar.client.admin_client import AdminClient
from sidecar.client.login import (
    LoginError,
    admin_credentials_path,
    credentials_path,
    load_credentials,
    normalize_url,
    stored_url,
    valid_token,
)

DEFAULT_URL = "http://127.0.0.1:9002"
URL_HELP = (
    "the sidecar's URL (default: $SIDECAR_URL, else the URL of your last "
    f"`sidecar login`, else {DEFAULT_URL})"
)


def server_url(flag: str | None, env: Mapping[str, str] = os.environ) -> str:
    chosen = (
        flag
        or env.get("SIDECAR_URL")
        or stored_url(credentials_path(env))
        or stored_url(admin_credentials_path(env))
        or DEFAULT_URL
    )
    return normalize_url(chosen)


def _stored_token(url: str, admin: bool) -> str | None:
    path = admin_credentials_path() if admin else credentials_path()
    credential = load_credentials(path)
    if credential is None or credential.get("url") != url:
        return None
    return str(valid_token(url, path=path)["access_token"])


def admin_client(flag: str | None) -> AdminClient:
    url = server_url(flag)
    token = os.environ.get("SIDECAR_ADMIN_TOKEN", "") or _stored_token(url, admin=True)
    if not token:
        raise LoginError(
            "admin commands need $SIDECAR_ADMIN_TOKEN or an admin login: run "
            f"`sidecar login --admin {url}`"
        )
    return AdminClient(url, token)


def caller_client(flag: str | None) -> AdminClient:
    url = server_url(flag)
    token = (
        os.environ.get("SIDECAR_TOKEN", "")
        or _stored_token(url, admin=False)
        or _stored_token(url, admin=True)
    )
    if not token:
        raise LoginError(
            f"not logged in to {url}; run `sidecar login {url}` (or set $SIDECAR_TOKEN)"
        )
    return AdminClient(url, token)
