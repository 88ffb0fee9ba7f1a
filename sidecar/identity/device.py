"""Device-code login (RFC 8628): the grant's state machine and where its state lives.

A grant is one store document keyed by a hash of its device code; every change to it is a
compare-and-set, so any replica can answer any step and two replicas can never both issue a
token for one code. The transitions are pure functions of a grant and the time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from sidecar.identity.attempts import Check, Limit, subject_of
from sidecar.identity.cli_sessions import CliSessions
from sidecar.identity.jwt_verify import IssuerPolicy
from sidecar.identity.secret_box import SecretBox
from sidecar.identity.signing_keys import ALGORITHM, SigningKeys, seal_plain_keys
from sidecar.model import Identity
from sidecar.store.base import Doc, DocumentStore

USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
AUDIENCE = "llm-sidecar"
LEEWAY_SECONDS = 30
EXPIRES_IN = 600
INTERVAL = 5
SLOW_DOWN_STEP = 5
# A poll this much early still counts as on time: the client measures its sleep from when
# it read the previous answer, the server from when it received the previous poll.
POLL_GRACE_SECONDS = 0.5
# Expired and used grants are kept this long, so late polls hear why, then are forgotten.
RETAIN_SECONDS = 600
# Wrong user codes allowed per person and per client address in one window, and unknown
# device codes polled per client address.
GUESS_LIMIT = 10
ADDRESS_GUESS_LIMIT = 50
GUESS_WINDOW_SECONDS = 600
GUESS_PER_PERSON = Limit("device-guess-person", GUESS_LIMIT, GUESS_WINDOW_SECONDS)
GUESS_PER_ADDRESS = Limit("device-guess-address", ADDRESS_GUESS_LIMIT, GUESS_WINDOW_SECONDS)
POLL_UNKNOWN_PER_ADDRESS = Limit("device-poll-unknown", GUESS_LIMIT, GUESS_WINDOW_SECONDS)
# New device codes per client address in one window: each one costs two store documents.
START_LIMIT = 60

GRANTS = "device_grants"
USER_CODES = "device_user_codes"
SECRETS = "device_secrets"
MAX_ATTEMPTS = 8

Status = Literal["pending", "approved", "denied", "issued"]
PollOutcome = Literal[
    "authorization_pending", "slow_down", "access_denied", "expired_token", "invalid_grant", "issue"
]
DecideError = Literal["unknown", "expired", "already_decided", "busy", "not_admin"]
# Admin-scoped tokens never live longer than this, whatever token_ttl says.
ADMIN_TOKEN_TTL = 3600


@dataclass(frozen=True)
class Approver:
    subject: str
    email: str
    groups: tuple[str, ...]
    issuer: str

    @classmethod
    def of(cls, identity: Identity) -> Approver:
        return cls(identity.subject, identity.email, identity.groups, identity.issuer)


@dataclass(frozen=True)
class Grant:
    id: str  # SHA-256 of the device code: the store never holds the code itself
    user_code: str
    status: Status
    created_at: float
    expires_at: float
    interval: int
    client_addr: str
    user_agent: str
    client_id: str
    last_poll_at: float | None = None
    approver: Approver | None = None
    decided_at: float | None = None
    # "admin" for `sidecar login --admin`: only an administrator may approve it.
    scope: str = ""

    def to_doc(self) -> Doc:
        doc = asdict(self)
        if self.approver is not None:
            doc["approver"]["groups"] = list(self.approver.groups)
        return doc

    @classmethod
    def from_doc(cls, doc: Doc) -> Grant:
        approver = doc.get("approver")
        return cls(
            **{
                **doc,
                "approver": None
                if approver is None
                else Approver(
                    approver["subject"],
                    approver["email"],
                    tuple(approver["groups"]),
                    approver["issuer"],
                ),
            }
        )


# -- pure helpers ----------------------------------------------------------------------
def grant_id(device_code: str) -> str:
    return hashlib.sha256(device_code.encode()).hexdigest()


def new_user_code(choice: Callable[[str], str] = secrets.choice) -> str:
    return "".join(choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))


def format_user_code(code: str) -> str:
    half = USER_CODE_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def normalize_user_code(text: str) -> str | None:
    """The canonical code for what a person typed (any case, dashes, spaces), or None."""
    code = "".join(text.split()).replace("-", "").upper()
    if len(code) != USER_CODE_LENGTH or any(c not in USER_CODE_ALPHABET for c in code):
        return None
    return code


def poll(grant: Grant, now: float) -> tuple[Grant, PollOutcome]:
    """One token request: the grant after it and the answer (`issue`: mint the token)."""
    if grant.status == "issued":
        return grant, "invalid_grant"
    if now >= grant.expires_at:
        return grant, "expired_token"
    last = grant.last_poll_at
    if last is not None and now - last + POLL_GRACE_SECONDS < grant.interval:
        return replace(
            grant, interval=grant.interval + SLOW_DOWN_STEP, last_poll_at=now
        ), "slow_down"
    polled = replace(grant, last_poll_at=now)
    if grant.status == "pending":
        return polled, "authorization_pending"
    if grant.status == "denied":
        return polled, "access_denied"
    return replace(polled, status="issued"), "issue"


def decide(
    grant: Grant, approver: Approver, approve: bool, now: float, approver_is_admin: bool = False
) -> Grant | DecideError:
    if now >= grant.expires_at:
        return "expired"
    if grant.status != "pending":
        return "already_decided"
    if approve and grant.scope == "admin" and not approver_is_admin:
        return "not_admin"
    return replace(
        grant, status="approved" if approve else "denied", approver=approver, decided_at=now
    )


def csrf_token(secret: bytes, approver: Approver, grant: Grant) -> str:
    """Binds an approve/deny form to one person and one grant; useless to anyone else."""
    message = "\x00".join((approver.issuer, approver.subject, grant.user_code, grant.id))
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def csrf_ok(secret: bytes, approver: Approver, grant: Grant, presented: str) -> bool:
    return hmac.compare_digest(
        csrf_token(secret, approver, grant).encode(), presented.encode("utf-8", "replace")
    )


def cli_claims(
    issuer: str,
    approver: Approver,
    now: float,
    ttl_seconds: int,
    session: str = "",
    scope: str = "",
) -> dict[str, Any]:
    issued = int(now)
    claims = {
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": approver.subject,
        "email": approver.email,
        "groups": list(approver.groups),
        "kind": "cli",
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    if session:
        claims["sid"] = session
    if scope:
        claims["scope"] = scope
    return claims


def access_ttl(scope: str, token_ttl: int, session_left: float) -> int:
    """An access token never outlives its session, nor an admin one its hour."""
    ttl = min(token_ttl, ADMIN_TOKEN_TTL) if scope == "admin" else token_ttl
    return max(1, min(ttl, int(session_left)))


def issuer_for(public_url: str, listen_http: str) -> str:
    # From config, not from a --http flag, so every replica names the same issuer.
    return public_url.rstrip("/") or f"http://{listen_http}"


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int
    approver: Approver
    scope: str = ""
    session: str = ""
    refresh_token: str | None = None


class DeviceLogin:
    """Device grants, approvals and the tokens they turn into, all kept in the store."""

    def __init__(
        self,
        store: DocumentStore,
        issuer: str,
        *,
        box: SecretBox,
        clock: Callable[[], float] = time.time,
        keys: SigningKeys | None = None,
        sessions: CliSessions | None = None,
    ) -> None:
        self.issuer = issuer
        self.sessions = sessions or CliSessions(store, clock)
        self.keys = keys or SigningKeys(store, box=box, clock=clock, leeway_seconds=LEEWAY_SECONDS)
        self._store = store
        self._box = box
        self._clock = clock
        self._secret: bytes | None = None

    @property
    def issuer_policy(self) -> IssuerPolicy:
        return IssuerPolicy(
            issuer=self.issuer,
            audiences=(AUDIENCE,),
            algorithms=(ALGORITHM,),
            groups_claim="groups",
            leeway_seconds=LEEWAY_SECONDS,
            keys=self.keys,
            own=True,
        )

    def now(self) -> float:
        return self._clock()

    def _ttl(self, grant: Grant, now: float) -> int:
        return max(1, math.ceil(grant.expires_at + RETAIN_SECONDS - now))

    async def start(
        self, client_addr: str, user_agent: str, client_id: str, scope: str = ""
    ) -> tuple[str, Grant]:
        """A new grant and its device code (the only time the code exists in clear)."""
        device_code = secrets.token_urlsafe(32)
        now = self._clock()
        grant = Grant(
            grant_id(device_code),
            "",
            "pending",
            now,
            now + EXPIRES_IN,
            INTERVAL,
            client_addr,
            user_agent,
            client_id,
            scope=scope,
        )
        ttl = self._ttl(grant, now)
        for _ in range(MAX_ATTEMPTS):
            code = new_user_code()
            # Claim the user code atomically: two live grants must never share one.
            if await self._store.swap_doc(
                USER_CODES, code, None, {"grant": grant.id}, ttl, now=now
            ):
                grant = replace(grant, user_code=code)
                await self._store.put_doc(GRANTS, grant.id, grant.to_doc(), ttl, now=now)
                return device_code, grant
        raise RuntimeError("could not find a free user code")

    async def _grant_doc(self, user_code: str, now: float) -> Doc | None:
        index = await self._store.get_doc(USER_CODES, user_code, now=now)
        return None if index is None else await self._store.get_doc(GRANTS, index["grant"], now=now)

    async def find(self, user_code: str) -> Grant | None:
        doc = await self._grant_doc(user_code, self._clock())
        return None if doc is None else Grant.from_doc(doc)

    async def decide(
        self, user_code: str, identity: Identity, approve: bool, approver_is_admin: bool = False
    ) -> Grant | DecideError:
        approver = Approver.of(identity)
        for _ in range(MAX_ATTEMPTS):
            now = self._clock()
            doc = await self._grant_doc(user_code, now)
            if doc is None:
                return "unknown"
            result = decide(Grant.from_doc(doc), approver, approve, now, approver_is_admin)
            if isinstance(result, str):
                return result
            if await self._store.swap_doc(
                GRANTS, result.id, doc, result.to_doc(), self._ttl(result, now), now=now
            ):
                return result
        return "busy"

    async def exchange(
        self, device_code: str, token_ttl: int, client_id: str = "", session_ttl: int = 0
    ) -> IssuedToken | PollOutcome:
        """Answer one poll of /device/token: a token, or the RFC 8628 error code."""
        gid = grant_id(device_code)
        for _ in range(MAX_ATTEMPTS):
            doc = await self._store.get_doc(GRANTS, gid, now=self._clock())
            if doc is None:
                return "invalid_grant"
            grant = Grant.from_doc(doc)
            if client_id and grant.client_id and client_id != grant.client_id:
                return "invalid_grant"
            now = self._clock()
            after, outcome = poll(grant, now)
            issued: IssuedToken | None = None
            if outcome == "issue":
                assert after.approver is not None
                # Made before the swap: if another replica wins, these are just dropped (the
                # session is never used, and expires).
                issued = await self._open_session(after, token_ttl, session_ttl)
            if after == grant or await self._store.swap_doc(
                GRANTS, gid, doc, after.to_doc(), self._ttl(after, now), now=now
            ):
                return issued if issued is not None else outcome
        # Lost every race: someone polls this code in a tight loop.
        return "slow_down"

    async def _open_session(self, grant: Grant, token_ttl: int, session_ttl: int) -> IssuedToken:
        approver = grant.approver
        assert approver is not None
        admin = grant.scope == "admin"
        # An admin session lasts one access token and has no refresh token: after its hour,
        # the admin logs in (and is approved) again.
        lifetime = (
            access_ttl("admin", token_ttl, ADMIN_TOKEN_TTL)
            if admin
            else max(session_ttl, token_ttl)
        )
        session, refresh = await self.sessions.create(
            subject=approver.subject,
            email=approver.email,
            groups=approver.groups,
            issuer=approver.issuer,
            scope="admin" if admin else "",
            ttl_seconds=lifetime,
            client=grant.user_agent,
        )
        ttl = access_ttl(grant.scope, token_ttl, lifetime)
        token = await self.mint(approver, ttl, session["id"], grant.scope)
        return IssuedToken(
            token, ttl, approver, grant.scope, session["id"], None if admin else refresh
        )

    async def refresh(self, refresh_token: str, token_ttl: int) -> IssuedToken | str:
        """A new access token and the next refresh token, or an RFC 6749 error code."""
        result = await self.sessions.refresh(refresh_token)
        if isinstance(result, str):
            return "invalid_grant"
        doc = result.session
        if doc["scope"]:
            return "invalid_grant"  # admin sessions are never refreshed
        approver = Approver(doc["subject"], doc["email"], tuple(doc["groups"]), doc["issuer"])
        ttl = access_ttl("", token_ttl, doc["expires_at"] - self._clock())
        token = await self.mint(approver, ttl, doc["id"])
        return IssuedToken(token, ttl, approver, "", doc["id"], result.refresh_token)

    async def mint(
        self, approver: Approver, ttl_seconds: int, session: str = "", scope: str = ""
    ) -> str:
        return await self.keys.sign(
            cli_claims(self.issuer, approver, self._clock(), ttl_seconds, session, scope)
        )

    # -- CSRF --------------------------------------------------------------------------
    async def csrf_secret(self) -> bytes:
        """One secret for all replicas, made by whichever needs it first; stored sealed."""
        if self._secret is None:
            now = self._clock()
            doc = await self._store.get_doc(SECRETS, "csrf", now=now)
            if doc is None:
                fresh = {"sealed": self._box.seal(secrets.token_bytes(32))}
                doc = (
                    fresh
                    if await self._store.swap_doc(SECRETS, "csrf", None, fresh, now=now)
                    else await self._store.get_doc(SECRETS, "csrf", now=now)
                )
            if doc is None:
                raise RuntimeError("the CSRF secret vanished from the store")
            if "sealed" not in doc:
                raise RuntimeError(
                    "the CSRF secret is stored unencrypted; restart a sidecar "
                    "of this version to encrypt it"
                )
            self._secret = self._box.open(doc["sealed"])
        return self._secret

    async def seal_plain_secrets(self) -> int:
        """Encrypt what an earlier version stored in clear, and stop trusting it: a secret
        that sat on disk in plain text may have been copied. Signing keys are sealed and a
        fresh one made active (the old one verifies only the tokens it already signed); the
        CSRF secret is replaced (an open approval form just needs a reload)."""
        sealed = await seal_plain_keys(self._store, self._box, self._clock(), LEEWAY_SECONDS)
        if sealed:
            await self.keys.rotate()
        now = self._clock()
        doc = await self._store.get_doc(SECRETS, "csrf", now=now)
        if doc is not None and "sealed" not in doc:
            fresh = {"sealed": self._box.seal(secrets.token_bytes(32))}
            sealed += await self._store.swap_doc(SECRETS, "csrf", doc, fresh, now=now)
            self._secret = None
        if sealed:
            await self._store.scrub()
        return sealed

    async def csrf_token(self, identity: Identity, grant: Grant) -> str:
        return csrf_token(await self.csrf_secret(), Approver.of(identity), grant)

    async def csrf_ok(self, identity: Identity, grant: Grant, presented: str) -> bool:
        return csrf_ok(await self.csrf_secret(), Approver.of(identity), grant, presented)

    # -- attempt limits ----------------------------------------------------------------
    @staticmethod
    def guess_checks(identity: Identity, client_addr: str) -> tuple[Check, ...]:
        """Wrong user codes count against the person and, more loosely, their address: a
        guesser exhausts their own allowance long before their address's, so one person
        behind a shared proxy or NAT cannot lock everyone else there out."""
        return (
            (GUESS_PER_PERSON, subject_of(identity.issuer, identity.subject)),
            (GUESS_PER_ADDRESS, client_addr),
        )

    @staticmethod
    def poll_checks(client_addr: str) -> tuple[Check, ...]:
        return ((POLL_UNKNOWN_PER_ADDRESS, client_addr),)

    async def start_allowed(self, client_addr: str) -> bool:
        key = f"device:start:addr:{client_addr}"
        count = await self._store.incr(key, 1, GUESS_WINDOW_SECONDS, now=self._clock())
        return count <= START_LIMIT
