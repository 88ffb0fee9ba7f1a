"""Build Decisions: allow with trusted headers, or a deny with its JSON body. One table of
reasons to HTTP status; the transports map those to their own codes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sidecar.model import Decision, Identity, Reason

STATUS: Mapping[Reason, int] = {
    "ok": 200,
    "fallback": 200,
    "bad_request": 400,
    "missing_credentials": 401,
    "invalid_token": 401,
    "model_not_allowed": 403,
    "unpriced_model": 403,
    "unmetered_call": 403,
    "unpriced_service_tier": 403,
    "unpriced_tool": 403,
    "spend_limit_exceeded": 429,
    "store_unavailable": 503,
    "overloaded": 503,
}

# The sidecar's reservation id on the upstream request, read back by its metering.
RESERVATION_HEADER = "x-sidecar-request-id"

IDENTITY_HEADERS = (
    "x-sidecar-email",
    "x-sidecar-groups",
    "x-sidecar-token-name",
    "x-sidecar-kind",
    "x-sidecar-subject",
)


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def error_body(error_type: str, message: str, **extra: Any) -> bytes:
    return _json({"success": False, "error": {"type": error_type, "message": message, **extra}})


def deny(
    reason: Reason,
    message: str,
    *,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    identity: Identity | None = None,
    model: str = "",
    **extra: Any,
) -> Decision:
    """A refusal; the body's error type is the reason unless a coarser one is given."""
    return Decision(
        allowed=False,
        http_status=STATUS[reason],
        reason=reason,
        headers={"content-type": "application/json", **(headers or {})},
        body=error_body(error_type or reason, message, **extra),
        identity=identity,
        model=model,
    )


# Shed Checks all get this one answer: built once, so refusing costs next to nothing.
OVERLOADED = Decision(
    allowed=False,
    http_status=503,
    reason="overloaded",
    headers={"content-type": "application/json", "retry-after": "1"},
    body=error_body("overloaded", "the authorization service is over capacity; retry shortly"),
)


def unauthenticated(code: str, detail: str) -> Decision:
    reason: Reason = "missing_credentials" if code == "missing_credentials" else "invalid_token"
    challenge = 'Bearer realm="llm-sidecar"'
    if reason == "invalid_token":
        challenge += f', error="invalid_token", error_description="{code}"'
    return deny(
        reason,
        detail,
        error_type="unauthenticated",
        headers={"www-authenticate": challenge},
        code=code,
    )


def identity_headers(identity: Identity) -> dict[str, str]:
    return {
        "x-sidecar-email": identity.email,
        "x-sidecar-groups": ",".join(identity.groups),
        "x-sidecar-token-name": identity.token_name,
        "x-sidecar-kind": identity.kind,
        "x-sidecar-subject": identity.subject,
    }


# Every header that carries an Access credential, whichever one authenticated the caller.
ACCESS_CREDENTIAL_HEADERS = (
    "cf-access-jwt-assertion",
    "cf-access-token",
    "cf-access-client-id",
    "cf-access-client-secret",
)
ACCESS_COOKIE = "cf_authorization"


def _cookie_name(pair: str) -> str:
    return pair.split("=", 1)[0].strip().lower()


def without_access_cookie(cookie: str) -> str | None:
    """The Cookie header without the Access cookie (`CF_Authorization`), other cookies kept;
    None when it had none. Duplicate Cookie headers arrive joined with `,`, so a pair that
    mentions the Access cookie is split on commas too."""
    kept: list[str] = []
    found = False
    for part in cookie.split(";"):
        piece = part.strip()
        if ACCESS_COOKIE in piece.lower():
            pairs = [p.strip() for p in piece.split(",")]
            rest = [p for p in pairs if _cookie_name(p) != ACCESS_COOKIE]
            if len(rest) != len(pairs):
                found = True
                piece = ",".join(p for p in rest if p)
        if piece:
            kept.append(piece)
    return "; ".join(kept) if found else None


def strip_credentials(
    client_headers: Mapping[str, str], credentials: tuple[str, ...]
) -> tuple[set[str], dict[str, str]]:
    """(headers to remove, headers to set) so that no credential the sidecar understands
    reaches the upstream: every Access header, the Access cookie (other cookies stay), and
    `credentials`, the headers identity found a sidecar credential in (`authorization`
    holding a token of a configured issuer, whether or not it was the one used). A provider
    key in `authorization` is not a sidecar credential and passes; whoever injects a
    provider key sets `authorization`, which then wins over any removal (see strip_list).
    """
    remove = {
        h
        for h in (*ACCESS_CREDENTIAL_HEADERS, *credentials)
        if h in client_headers and h != "cookie"
    }
    replace: dict[str, str] = {}
    cookie = client_headers.get("cookie")
    rest = without_access_cookie(cookie) if cookie is not None else None
    if rest is not None:
        if rest:
            replace["cookie"] = rest
        else:
            remove.add("cookie")
    return remove, replace


def strip_list(
    client_headers: Mapping[str, str], set_headers: Mapping[str, str], credentials: tuple[str, ...]
) -> tuple[str, ...]:
    """Client headers that must not reach the upstream: spoofable x-sidecar-* headers and
    every credential carrier (strip_credentials). A header the sidecar sets is replaced,
    never removed, so a set value (a provider key, the trimmed cookie) survives."""
    return _kept_out(client_headers, set_headers, strip_credentials(client_headers, credentials)[0])


def _kept_out(
    client_headers: Mapping[str, str], set_headers: Mapping[str, str], credentials: set[str]
) -> tuple[str, ...]:
    """`strip_list`, given the credential headers `strip_credentials` removes."""
    drop = {name for name in client_headers if name.startswith("x-sidecar-")}
    drop |= credentials
    return tuple(sorted(drop - set(set_headers)))


def allow(
    identity: Identity,
    client_headers: Mapping[str, str],
    credentials: tuple[str, ...] = (),
    *,
    model: str = "",
    provider: str = "",
    remaining: str | None = None,
    fallback_from: str | None = None,
    rules: tuple[str, ...] = (),
    estimate: int | None = None,
    request_id: str = "",
    provider_headers: Mapping[str, str] | None = None,
    limits: Mapping[str, str] | None = None,
    input_tokens: int = 0,
) -> Decision:
    """`provider_headers`: the provider key the sidecar holds for this call, if any; it
    replaces whatever the client sent in the same header."""
    headers = identity_headers(identity)
    if request_id:
        # Overwrites any client value: metering charges usage against this id only.
        headers[RESERVATION_HEADER] = request_id
    removed, replaced = strip_credentials(client_headers, credentials)
    headers.update(replaced)
    if model:
        headers["x-sidecar-model"] = model
    if provider:
        headers["x-sidecar-provider"] = provider
    if fallback_from is not None:
        headers["x-sidecar-route"] = "fallback"
        headers["x-sidecar-fallback-from"] = fallback_from
    # Provider-style x-ratelimit-* headers of the request and token rules.
    response_headers: dict[str, str] = dict(limits or {})
    if remaining is not None:
        response_headers["x-sidecar-budget-remaining"] = remaining
    if fallback_from is not None:
        response_headers["x-sidecar-model"] = model
        response_headers["x-sidecar-fallback-from"] = fallback_from
    return Decision(
        allowed=True,
        http_status=200,
        reason="fallback" if fallback_from is not None else "ok",
        headers=headers,
        # A header both stripped (the caller's credential) and set (the provider key) is set:
        # Envoy applies removals after additions, which would drop the key.
        remove_headers=tuple(
            h
            for h in _kept_out(client_headers, headers, removed)
            if h not in (provider_headers or {})
        ),
        response_headers=response_headers,
        identity=identity,
        model=model,
        provider=provider,
        rules=rules,
        estimate=estimate,
        input_tokens=input_tokens,
        request_id=request_id,
        upstream_secrets=dict(provider_headers or {}),
    )
