"""Find the caller's credential in the request headers and turn it into an Identity."""

from __future__ import annotations

from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Protocol

from sidecar.identity.cli_sessions import CliSessions
from sidecar.identity.errors import AuthError
from sidecar.identity.jwt_verify import JwtVerifier, unverified_issuer
from sidecar.identity.service_tokens import ServiceTokens
from sidecar.model import Identity

CLIENT_ID = "cf-access-client-id"
CLIENT_SECRET = "cf-access-client-secret"


class Identifier(Protocol):
    """What the engine asks who a request is from (the Authenticator, or a test's own)."""

    async def identify(
        self, headers: Mapping[str, str]
    ) -> tuple[Identity, tuple[str, ...]] | None: ...


def _cookie_token(header: str) -> str | None:
    cookie = SimpleCookie()
    try:
        cookie.load(header)
    except CookieError:
        return None
    morsel = cookie.get("CF_Authorization")
    return morsel.value if morsel is not None and morsel.value else None


def find_jwt(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The first JWT present and the header carrying it, in the order Access prefers them."""
    for name in ("cf-access-jwt-assertion", "cf-access-token"):
        value = headers.get(name, "").strip()
        if value:
            return value, name
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), "authorization"
    cookie = headers.get("cookie")
    token = _cookie_token(cookie) if cookie else None
    return (token, "cookie") if token else None


class Authenticator:
    def __init__(
        self,
        jwt: JwtVerifier,
        service_tokens: ServiceTokens | None,
        sessions: CliSessions | None = None,
    ) -> None:
        self.jwt = jwt
        self.service_tokens = service_tokens
        self.sessions = sessions

    async def _verify(self, token: str) -> Identity:
        identity = await self.jwt.verify(token)
        if (
            identity.session
            and self.sessions is not None
            and not await self.sessions.live(identity.session)
        ):
            raise AuthError(
                "revoked",
                "this CLI session was logged out or revoked; run `sidecar login` to sign in again",
            )
        return identity

    def sidecar_bearer(self, headers: Mapping[str, str]) -> bool:
        """Whether `Authorization` holds a token of an issuer the sidecar accepts (an Access
        or device-login JWT), as opposed to a provider key meant for the upstream."""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return False
        return unverified_issuer(value.strip()) in self.jwt.issuers

    async def identify(self, headers: Mapping[str, str]) -> tuple[Identity, tuple[str, ...]] | None:
        """The identity and the headers that hold a sidecar credential (never to go
        upstream): the one used, and `authorization` when it holds one too.

        None when no credential was presented at all; AuthError when one was bad.
        """
        found = await self._identify(headers)
        if found is None:
            return None
        identity, used = found
        if "authorization" not in used and self.sidecar_bearer(headers):
            used = (*used, "authorization")
        return identity, used

    async def _identify(
        self, headers: Mapping[str, str]
    ) -> tuple[Identity, tuple[str, ...]] | None:
        assertion = headers.get("cf-access-jwt-assertion", "").strip()
        if assertion:
            return await self._verify(assertion), ("cf-access-jwt-assertion",)
        client_id = headers.get(CLIENT_ID, "").strip()
        if client_id:
            if self.service_tokens is None:
                raise AuthError("service_tokens_disabled", "service tokens are not enabled")
            secret = headers.get(CLIENT_SECRET, "").strip()
            if not secret:
                raise AuthError("malformed", "CF-Access-Client-Secret is missing")
            identity = await self.service_tokens.authenticate(client_id, secret)
            return identity, (CLIENT_ID, CLIENT_SECRET)
        found = find_jwt(headers)
        if found is None:
            return None
        return await self._verify(found[0]), (found[1],)
