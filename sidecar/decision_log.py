"""The decision line: one JSON line per Check (README "Logs"), written on the event loop.

Rendered here in one expression rather than field by field through `Line.info`: the keys,
their order and the values are the ones the chain would write (tests/unit/test_decision_log
holds the two to byte equality), the parts that never change are literals, and a caller's
part (kind, user, groups, token name) is rendered once per identity. The values that come
from a request or a credential's claims (the request id, user, groups, token name, model,
rule names) are scanned for credential shapes as before; codes, numbers, ids the sidecar
minted and the configured provider are not, as nothing a client sends reaches them.
"""

from __future__ import annotations

from typing import Any

import structlog

from sidecar.log import Line, trusted_str, untrusted_str, untrusted_strs
from sidecar.model import Decision, Identity, RequestAttrs
from sidecar.money import micros_to_usd_str

LOGGER = "sidecar.decision"
# The decision line's fields, in order.
KEYS = (
    "request_id",
    "reservation",
    "decision",
    "status",
    "reason",
    "kind",
    "user",
    "groups",
    "token_name",
    "model",
    "provider",
    "rules",
    "estimate_usd",
    "ms",
)
LINE = Line("decision", KEYS)
_NO_IDENTITY = ', "kind": null, "user": null, "groups": null, "token_name": null'
# Rendered callers, by the Identity they were rendered from (the JWT cache hands out one
# per token), and rule lists: these hit on every Check but a caller's first. Bounded:
# cleared when full.
_MAX_CACHED = 4096
# Longer renderings are made each time: the caches stay small whatever the claims hold.
_MAX_RENDERED = 2048
_identities: dict[int, tuple[Identity, str]] = {}
_rule_lists: dict[tuple[str, ...], str] = {}


def decision_word(reason: str) -> str:
    return "allow" if reason == "ok" else ("fallback" if reason == "fallback" else "deny")


def _who(identity: Identity) -> str:
    cached = _identities.get(id(identity))
    if cached is not None and cached[0] is identity:
        return cached[1]
    rendered = (
        ', "kind": '
        + untrusted_str(identity.kind)
        + ', "user": '
        + untrusted_str(identity.user)
        + ', "groups": '
        + untrusted_strs(identity.groups)
        + ', "token_name": '
        + (untrusted_str(identity.token_name) if identity.token_name else "null")
    )
    if len(rendered) <= _MAX_RENDERED:
        if len(_identities) >= _MAX_CACHED:
            _identities.clear()
        _identities[id(identity)] = (identity, rendered)
    return rendered


def _rules(rules: tuple[str, ...]) -> str:
    rendered = _rule_lists.get(rules)
    if rendered is None:
        rendered = untrusted_strs(rules)
        if len(rendered) <= _MAX_RENDERED:
            if len(_rule_lists) >= _MAX_CACHED:
                _rule_lists.clear()
            _rule_lists[rules] = rendered
    return rendered


def render(attrs: RequestAttrs, decision: Decision, seconds: float) -> str:
    """The line's fields as the chain writes them, from `{` to the last value."""
    identity, reason, estimate = decision.identity, decision.reason, decision.estimate
    return (
        '{"request_id": '
        + untrusted_str(attrs.request_id)
        + ', "reservation": '
        + (trusted_str(decision.request_id) if decision.request_id else "null")
        + ', "decision": "'
        + decision_word(reason)
        + '", "status": '
        + int.__repr__(decision.http_status)
        + ', "reason": '
        + trusted_str(reason)
        + (_NO_IDENTITY if identity is None else _who(identity))
        + ', "model": '
        + (untrusted_str(decision.model) if decision.model else "null")
        + ', "provider": '
        + (trusted_str(decision.provider) if decision.provider else "null")
        + ', "rules": '
        + _rules(decision.rules)
        + ', "estimate_usd": '
        + ("null" if estimate is None else trusted_str(micros_to_usd_str(estimate)))
        + ', "ms": '
        + float.__repr__(round(seconds * 1000, 3))
    )


def fields(attrs: RequestAttrs, decision: Decision, seconds: float) -> dict[str, Any]:
    """The line's fields as values, in order: what the chain is given when it logs."""
    identity = decision.identity
    return {
        "request_id": attrs.request_id,
        "reservation": decision.request_id or None,
        "decision": decision_word(decision.reason),
        "status": decision.http_status,
        "reason": decision.reason,
        "kind": identity.kind if identity else None,
        "user": identity.user if identity else None,
        "groups": list(identity.groups) if identity else None,
        "token_name": identity.token_name if identity and identity.token_name else None,
        "model": decision.model or None,
        "provider": decision.provider or None,
        "rules": list(decision.rules),
        "estimate_usd": None if decision.estimate is None else micros_to_usd_str(decision.estimate),
        "ms": round(seconds * 1000, 3),
    }


def log_decision(attrs: RequestAttrs, decision: Decision, seconds: float) -> None:
    """One line per request: who, what, which rules, how much, and the answer."""
    write = LINE.direct()
    if write is not None:
        write(render(attrs, decision, seconds))
    else:
        # Not the configured chain (a test's capture, another set-up): a logger bound now,
        # so it writes where the current configuration says.
        structlog.get_logger(LOGGER).info("decision", **fields(attrs, decision, seconds))
