"""Who is an administrator, and how failed admin authentications are throttled: one rule for
the HTTP admin API and the gRPC API.

Admin rights come from the admin token or from a person's own sign-in (a kind `user`
identity, an Access JWT) in an admin group. CLI tokens copy their approver's groups and
service tokens carry whatever groups they were created with, so neither may ever count:
otherwise an admin tricked into approving someone else's device code would hand over the
admin API. The one exception is explicit: an admin-scoped CLI token (`sidecar login
--admin`, claim `scope: admin`), which only an administrator can approve, lives at most an
hour, belongs to a revocable CLI session, and still needs its groups to be admin groups.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from sidecar.config.ruleset import RuleSet, RuleSetHolder
from sidecar.identity.attempts import Attempts, Limit, subject_of
from sidecar.metrics import ADMIN_AUTH_FAILURES, ATTEMPTS_THROTTLED
from sidecar.model import Decision, Identity
from sidecar.settings import SettingsHolder

# Wrong admin credentials per client address, and refused identities per identity. A valid
# Access JWT of an admin is never throttled by its address: it cannot be guessed.
BAD_CREDENTIAL = Limit("admin-bad-credential", 10, 60)
NOT_ADMIN = Limit("admin-not-admin", 10, 60)

Identified = tuple[Identity, tuple[str, ...]]
# Who presented these headers, under this rule set (the engine's identify).
Identify = Callable[[Mapping[str, str], RuleSet], Awaitable[Identified | Decision]]


def is_admin(identity: Identity, admin_groups: Sequence[str]) -> bool:
    in_group = bool(set(identity.groups) & set(admin_groups))
    if identity.kind == "cli":
        return in_group and identity.scope == "admin" and bool(identity.session)
    return identity.kind == "user" and in_group


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of an `authorization: Bearer <token>` header; empty without one."""
    scheme, _, presented = headers.get("authorization", "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else ""


def token_matches(expected: str, presented: str) -> bool:
    return (
        bool(expected)
        and bool(presented)
        and hmac.compare_digest(presented.strip().encode(), expected.encode())
    )


@dataclass(frozen=True)
class Admin:
    name: str  # for audit logs: "admin-token" or the person's email
    carriers: tuple[str, ...]  # the headers that carried the credential ("cookie", ...)


class AdminDenied(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        self.status = status
        self.message = message
        self.retry_after = retry_after
        super().__init__(message)


class AdminGate:
    """The one admin-credential check, for the HTTP admin API and the gRPC API alike."""

    def __init__(
        self,
        attempts: Attempts,
        holder: RuleSetHolder,
        settings: SettingsHolder,
        identify: Identify,
    ) -> None:
        self._attempts = attempts
        self._holder = holder
        self._settings = settings
        self._identify = identify

    async def _throttled(self, limit: Limit, subject: str) -> None:
        wait = await self._attempts.retry_after([(limit, subject)])
        if wait is not None:
            ADMIN_AUTH_FAILURES.labels("throttled").inc()
            ATTEMPTS_THROTTLED.labels(limit.name).inc()
            raise AdminDenied(
                429, f"too many failed admin authentications; retry in {wait} s", wait
            )

    async def authorize(self, headers: Mapping[str, str], address: str) -> Admin:
        """The administrator presenting `headers` from `address`; AdminDenied otherwise."""
        rs = self._holder.current
        if token_matches(self._settings.current.admin_token, bearer_token(headers)):
            # Checked after the comparison but before answering: while throttled, a right
            # guess looks exactly like a wrong one.
            await self._throttled(BAD_CREDENTIAL, address)
            return Admin("admin-token", ("authorization",))
        found = await self._identify(headers, rs)
        if isinstance(found, Decision):
            if found.reason == "missing_credentials":
                raise AdminDenied(401, "admin authentication required")
            await self._throttled(BAD_CREDENTIAL, address)
            await self._attempts.failed([(BAD_CREDENTIAL, address)])
            ADMIN_AUTH_FAILURES.labels("bad_credential").inc()
            raise AdminDenied(401, "admin authentication failed: invalid credentials")
        identity, carriers = found
        if is_admin(identity, rs.config.admin.groups):
            return Admin(identity.user, carriers)
        who = subject_of(identity.issuer, identity.subject)
        await self._throttled(NOT_ADMIN, who)
        await self._attempts.failed([(NOT_ADMIN, who)])
        ADMIN_AUTH_FAILURES.labels("not_admin").inc()
        if identity.kind != "user":
            raise AdminDenied(
                403,
                f"not an administrator: {identity.kind} tokens are never "
                "admins; use the admin token or your own sign-in",
            )
        raise AdminDenied(403, "not an administrator")
