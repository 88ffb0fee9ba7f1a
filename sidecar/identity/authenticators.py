"""The authenticator of each rule set: its JWT issuers (with the device-login issuer when
enabled), service tokens and CLI sessions, rebuilt when a reload changes the rule set."""

from __future__ import annotations

from sidecar.config.ruleset import RuleSet
from sidecar.identity.authenticate import Authenticator
from sidecar.identity.cli_sessions import CliSessions
from sidecar.identity.jwks import JwksCache
from sidecar.identity.jwt_verify import IssuerPolicy, JwtVerifier
from sidecar.identity.service_tokens import ServiceTokens


class Identities:
    """Builds the authenticator for a rule set, keeping JWKS caches across reloads."""

    def __init__(self, service_tokens: ServiceTokens, sessions: CliSessions) -> None:
        self._service_tokens = service_tokens
        self._sessions = sessions
        self._jwks: dict[tuple[str | None, str | None], JwksCache] = {}
        self._built: tuple[str, Authenticator] | None = None
        self.extra_issuers: list[IssuerPolicy] = []

    def jwks(self, url: str | None, file: str | None, floor: float, max_age: float) -> JwksCache:
        key = (url, file)
        if key not in self._jwks:
            self._jwks[key] = JwksCache(
                url=url, file=file, refresh_floor_seconds=floor, cache_seconds=max_age
            )
        return self._jwks[key]

    def __call__(self, rs: RuleSet) -> Authenticator:
        if self._built is not None and self._built[0] == rs.version:
            return self._built[1]
        policies = [
            IssuerPolicy(
                issuer=i.issuer,
                audiences=i.audiences,
                algorithms=i.algorithms,
                groups_claim=i.groups_claim,
                leeway_seconds=i.leeway_seconds,
                keys=self.jwks(i.jwks_url, i.jwks_file, i.refresh_floor_seconds, i.cache_seconds),
            )
            for i in rs.config.identity.jwt.issuers
        ]
        verifier = JwtVerifier([*policies, *self.extra_issuers], rs.directory)
        tokens = self._service_tokens if rs.config.identity.service_tokens.enabled else None
        auth = Authenticator(verifier, tokens, self._sessions)
        self._built = (rs.version, auth)
        return auth
