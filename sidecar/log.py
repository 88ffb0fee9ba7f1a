"""structlog set-up: JSON lines, with a redaction processor so no credential reaches a log."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED = "**********"
_SECRET_KEYS = re.compile(
    r"(authorization|cookie|secret|password|token$|jwt|assertion|api[_-]?key|client_secret)",
    re.IGNORECASE,
)
# Anything shaped like a JWT or a bearer credential inside a free-text value.
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s,;\"']+")


@functools.lru_cache(maxsize=4096)
def _secret_key(name: str) -> bool:
    # Key names come from a bounded set of call sites; each line has a dozen of them.
    return _SECRET_KEYS.search(name) is not None


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        # Substring tests first: both patterns need them, and almost no value has either,
        # so the regexes run only on the rare value that might hold a credential.
        if "eyJ" in value:
            value = _JWT.sub(REDACTED, value)
        if "bearer" in value.lower():
            value = _BEARER.sub(r"\1" + REDACTED, value)
        return value
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(str(k)) else _scrub(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if _secret_key(key) and key not in {"token_name"}:
            event[key] = REDACTED
        else:
            event[key] = _scrub(event[key])
    return event


def configure(level: str = "info") -> None:
    logging.basicConfig(stream=sys.stderr, format="%(message)s",
                        level=getattr(logging, level.upper(), logging.INFO))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
