"""A small client for the admin HTTP API, used by the admin-side CLI commands."""

from __future__ import annotations

from typing import Any

import httpx


class AdminError(Exception):
    """The admin API refused or could not be reached; the message says which and why."""


class AdminClient:
    def __init__(self, url: str, token: str) -> None:
        self._url = url.rstrip("/")
        self._token = token

    @property
    def url(self) -> str:
        return self._url

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        headers = {"authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            response = httpx.request(
                method, self._url + path, json=body, params=params, headers=headers, timeout=10.0
            )
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach {self._url}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            raise AdminError(f"{method} {path}: HTTP {response.status_code}, not JSON") from None
        if not response.is_success or not data.get("success", False):
            errors = "; ".join(e.get("message", "") for e in data.get("errors", [])) or str(data)
            hint = ""
            if response.status_code == 401 and "sidecar login" not in errors:
                hint = " (run `sidecar login`, or set SIDECAR_ADMIN_TOKEN for admin commands)"
            raise AdminError(f"{method} {path}: HTTP {response.status_code}: {errors}{hint}")
        return data.get("result")
