"""Verifies Access-style JWTs and maps their claims to an Identity. The only pyjwt user."""

from __future__ import annotations

import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from sidecar.identity.directory import Directory
from sidecar.identity.errors import AuthError
from sidecar.model import Identity, IdentityKind
from sidecar.shared_values import SharedValues

# Tokens beyond this size are refused before any parsing: nobody needs a 16 KiB JWT.
MAX_TOKEN_BYTES = 16_384
# Verified tokens kept, the least recently seen going first: about 470 bytes each (the
# digest, the Identity and its strings), so some 5 MB full. Past this many callers at once
# a token is verified again (one signature check) when it comes back.
TOKEN_CACHE_SIZE = 10_000


class KeySource(Protocol):
    """Where an issuer's verification keys come from: a JWKS cache, or the sidecar's store."""

    async def key_for(self, kid: str) -> Any | None: ...


@dataclass(frozen=True)
class IssuerPolicy:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    groups_claim: str
    leeway_seconds: int
    keys: KeySource
    # Tokens minted by the sidecar's own device login carry kind "cli".
    own: bool = False


def unverified_issuer(token: str) -> str | None:
    """The `iss` a JWT claims, unchecked: enough to tell a token meant for the sidecar from a
    provider's own bearer token, never to trust it."""
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        return None
    try:
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return None
    return iss if isinstance(iss, str) else None


def claim_path(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def groups_from_claim(value: Any) -> tuple[str, ...]:
    """Groups as Access sends them: a list of names, or a list of {name: ...} objects."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        return ()
    groups: list[str] = []
    for item in value:
        if isinstance(item, str):
            groups.append(item)
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            groups.append(item["name"])
    return tuple(groups)


# Group lists seen, each kept once: the same few lists recur in every cached identity (a
# tuple each was about 60 bytes of every entry of a full token cache).
_group_lists: SharedValues[tuple[str, ...]] = SharedValues(4096)


def _interned_groups(groups: list[str]) -> tuple[str, ...]:
    # Interned names too: lists that differ share the names they have in common.
    return _group_lists(tuple(groups), lambda key: tuple(sys.intern(g) for g in key))


def identity_from_claims(
    claims: Mapping[str, Any], policy: IssuerPolicy, directory: Directory
) -> Identity:
    sub = claims.get("sub") or ""
    email = claims.get("email") or ""
    common_name = claims.get("common_name") or ""
    if not isinstance(sub, str) or not isinstance(email, str) or not isinstance(common_name, str):
        raise AuthError("malformed_claims", "sub, email and common_name must be strings")
    kind: IdentityKind
    if policy.own and claims.get("kind") == "cli":
        kind = "cli"
    elif common_name and not sub:
        kind = "service"
    elif sub or email:
        kind = "user"
    else:
        raise AuthError("malformed_claims", "token names no subject, email or common_name")
    groups = list(groups_from_claim(claim_path(claims, policy.groups_claim)))
    granted = (
        directory.groups_for(policy.issuer, email) if kind == "user" and not policy.own else ()
    )
    for extra in granted:
        if extra not in groups:
            groups.append(extra)
    exp = claims.get("exp")
    session = claims.get("sid") if kind == "cli" else ""
    scope = claims.get("scope") if kind == "cli" else ""
    return Identity(
        kind=kind,
        subject=sub or common_name,
        email=email,
        groups=_interned_groups(groups),
        token_name=common_name,
        issuer=policy.issuer,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
        session=session if isinstance(session, str) else "",
        # Only the one value means anything; any other is an ordinary CLI token.
        scope="admin" if scope == "admin" else "",
    )


_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "unknown_issuer"),
    (jwt.InvalidIssuedAtError, "bad_iat"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidAlgorithmError, "bad_algorithm"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.DecodeError, "malformed"),
)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("malformed_claims", f"{name} must be a number")
    return float(value)


def check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    exp, nbf, iat = (_number(claims, n) for n in ("exp", "nbf", "iat"))
    if exp is None:
        raise AuthError("missing_claim", "exp is required")
    if exp <= now - leeway:
        raise AuthError("expired")
    if nbf is not None and nbf > now + leeway:
        raise AuthError("not_yet_valid")
    if iat is not None and iat > now + leeway:
        raise AuthError("bad_iat", "issued in the future")


class JwtVerifier:
    def __init__(
        self,
        issuers: Sequence[IssuerPolicy],
        directory: Directory | Mapping[str, tuple[str, ...]],
        *,
        cache_size: int = TOKEN_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuers = {p.issuer: p for p in issuers}
        # A plain {email: groups} mapping grants to people of every external issuer given.
        self._directory = (
            directory
            if isinstance(directory, Directory)
            else Directory.for_issuers(directory, (p.issuer for p in issuers if not p.own))
        )
        self._clock = clock
        # Keyed by a SHA-256 of the whole token: a token that differs by one byte never hits,
        # and 32 bytes per entry instead of the token (about 800) keep a full cache small.
        self._cache: OrderedDict[bytes, Identity] = OrderedDict()
        self._cache_size = cache_size

    @property
    def issuers(self) -> Mapping[str, IssuerPolicy]:
        return self._issuers

    async def verify(self, token: str) -> Identity:
        now = self._clock()
        if len(token) > MAX_TOKEN_BYTES:
            return await self._verify_uncached(token, now)  # refused before any hashing
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(key)
        if cached is not None:
            if cached.expires_at is not None and cached.expires_at > now:
                self._cache.move_to_end(key)
                return cached
            del self._cache[key]
        identity = await self._verify_uncached(token, now)
        self._cache[key] = identity
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return identity

    async def _verify_uncached(self, token: str, now: float) -> Identity:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("malformed", "token too large")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed", "not a JWT") from None
        iss = unverified.get("iss")
        policy = self._issuers.get(iss) if isinstance(iss, str) else None
        if policy is None:
            raise AuthError("unknown_issuer", "issuer is not configured")
        alg = header.get("alg")
        # The algorithm comes from config; the token's header only has to agree with it.
        if not isinstance(alg, str) or alg not in policy.algorithms:
            raise AuthError("bad_algorithm", f"algorithm {alg!r} is not accepted")
        kid = header.get("kid", "")
        key = await policy.keys.key_for(kid if isinstance(kid, str) else "")
        if key is None:
            raise AuthError("unknown_kid", "no signing key with this kid")
        try:
            # Time claims are checked below against the injected clock, not pyjwt's own.
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(policy.algorithms),
                audience=list(policy.audiences),
                issuer=policy.issuer,
                options={
                    "require": ["exp", "iss", "aud"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            for cls, code in _ERRORS:
                if isinstance(exc, cls):
                    raise AuthError(code) from None
            raise AuthError("invalid_token") from None
        try:
            check_times(claims, now, policy.leeway_seconds)
        except AuthError as err:
            if policy.own and err.code == "expired":
                raise AuthError(
                    "expired", "the CLI token expired; run `sidecar login` to sign in again"
                ) from None
            raise
        return identity_from_claims(claims, policy, self._directory)
