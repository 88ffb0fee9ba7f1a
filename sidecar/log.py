"""structlog set-up: JSON lines, with a redaction processor so no credential reaches a log;
and the per-request lines (`Line`, `info`) written without the processor chain, the same
bytes."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from sidecar.log_buffer import LoopLines, OrderedPrintLoggerFactory, loop_lines

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
        return {k: REDACTED if _secret_key(str(k)) else _scrub(v) for k, v in value.items()}
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


def _static(fields: Mapping[str, Any]) -> Any:
    """Fields every line of this process carries (a worker's index and pid)."""
    items = tuple(fields.items())

    def add(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in items:
            event.setdefault(key, value)
        return event

    return add


def configure(level: str = "info", static: Mapping[str, Any] | None = None) -> None:
    global _fast
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=numeric)
    processors: list[Any] = [
        *([_static(static)] if static else []),
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
        structlog.processors.JSONRenderer(),
    ]
    lines = loop_lines(sys.stderr)
    factory = OrderedPrintLoggerFactory(lines)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _fast = _FastInfo(processors, factory, numeric <= logging.INFO, lines, static or {})


# -- the per-request lines, without the processor chain ---------------------------------
# A decision and a completion line per request went through structlog's generic chain
# (context merge, level, timestamp, a redaction pass over every key, json.dumps, print):
# ~60 µs of a Check's CPU in the server. `info` writes the very same line (same keys, same
# order, same JSON, same redaction) with the static parts rendered once; a test holds the
# two to byte equality. While the chain is not the one configured here (structlog's
# capture_logs in tests, another configuration), it is the chain that logs.

_encode = json.encoder.encode_basestring_ascii  # what json.dumps uses for str (ASCII-only)


def _json(value: Any) -> str:
    # The common types first: a value the sidecar made itself (a code, a configured name, a
    # number) is rendered here directly, as `_scrub` would leave it as it is.
    kind = type(value)
    if kind is str:
        return _encode(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is float and value == value and value not in (float("inf"), float("-inf")):
        return float.__repr__(value)
    if kind is list or kind is tuple:
        return "[" + ", ".join([_json(v) for v in value]) + "]"
    raise _Unrendered


_REDACTED_JSON = '"' + REDACTED + '"'


def _str(value: str) -> str:
    # `_scrub` only changes a string holding one of these, and almost none does.
    if "eyJ" in value or "bearer" in value.lower():
        value = _scrub(value)
    return _encode(value)


# Made by the sidecar itself (codes, ids it minted, configured names): JSON without a scan.
trusted_str = _encode
# From a request or a credential's claims: scanned for credential shapes first.
untrusted_str = _str


def untrusted_strs(values: Iterable[str]) -> str:
    """A JSON list of strings, each as `untrusted_str` renders it."""
    return "[" + ", ".join([_str(v) for v in values]) + "]"


# The timestamp's date and time to the second, rendered once per second.
_second: list[Any] = [-1, ""]


def _stamp() -> str:
    """`datetime.now(UTC).isoformat()` with `Z` for `+00:00`, as structlog's TimeStamper
    writes it (no fraction when the microseconds are 0); the part before the fraction is
    rendered once a second."""
    now = time.time_ns()
    second, micros = now // 1_000_000_000, now // 1000 % 1_000_000
    cached = _second
    if cached[0] != second:
        cached[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        cached[0] = second
    return f"{cached[1]}.{micros:06d}Z" if micros else f"{cached[1]}Z"


# Keys rendered once: call sites log a bounded set of names.
_KEYS: dict[str, str] = {}


def _key(name: str) -> str:
    rendered = _encode(name) + ": "
    if len(_KEYS) < 4096:
        _KEYS[name] = rendered
    return rendered


class _Unrendered(Exception):
    """A value only json.dumps (with structlog's fallback) knows how to render."""


class _FastInfo:
    def __init__(
        self,
        processors: list[Any],
        factory: Any,
        enabled: bool,
        lines: LoopLines,
        static: Mapping[str, Any],
    ) -> None:
        self._factory = factory
        self._expected = list(processors)
        self._enabled = enabled
        # Written once per turn of the event loop (sidecar/log_buffer.py).
        self._lines = lines
        self.static_keys = frozenset(static)
        static_json = "".join(f", {_encode(k)}: {self._value(k, v)}" for k, v in static.items())
        # After the caller's fields and the event: the static fields, the level, the time.
        self.tail = static_json + ', "level": "info", "timestamp": "'

    def active(self) -> bool:
        # Still the set-up `configure` made: capture_logs() swaps the processors in place,
        # and a test or a benchmark may point the logger factory elsewhere. (The processor
        # list compares in C: functions and objects without __eq__ compare by identity.)
        config = structlog.get_config()
        return (
            self._enabled
            and config["logger_factory"] is self._factory
            and config["processors"] == self._expected
        )

    def line(self, event: str, fields: Mapping[str, Any]) -> str:
        if (
            "event" in fields
            or "level" in fields
            or "timestamp" in fields
            or not self.static_keys.isdisjoint(fields)
        ):
            raise _Unrendered  # keys the chain would place or override: leave it to it
        value, keys = self._value, _KEYS
        parts = [(keys.get(key) or _key(key)) + value(key, v) for key, v in fields.items()]
        parts.append('"event": ' + value("event", event))
        return "{" + ", ".join(parts) + self.tail + _stamp() + '"}'

    @staticmethod
    def _value(key: str, value: Any) -> str:
        # What `redact` does to the pair, then what JSONRenderer writes for it; the common
        # types first, and a string is only scrubbed when it could hold a credential.
        if _secret_key(key) and key != "token_name":
            return _REDACTED_JSON
        return _untrusted(value)

    def write(self, line: str) -> None:
        self._lines.write(line)

    def write_event(self, fields: str, event: str) -> None:
        """A line from its rendered fields (`{"a": 1, "b": 2`) and rendered event part."""
        self._lines.write(fields + event + self.tail + _stamp() + '"}')


_fast: _FastInfo | None = None


def _untrusted(value: Any) -> str:
    # The common types first; a string is only scrubbed when it could hold a credential.
    kind = type(value)
    if kind is str:
        return _str(value)
    if (kind is list or kind is tuple) and all(type(v) is str for v in value):
        return "[" + ", ".join([_str(v) for v in value]) + "]"
    if value is None or kind is int:
        return _json(value)  # nothing in it to scrub
    return _json(_scrub(value))


class Line:
    """A line with fixed keys, written in one pass: the keys (and whether `redact` hides
    them) are settled once; values in `trusted` are made by the sidecar (codes, configured
    names, numbers), so they skip the scan for credentials. Byte for byte what
    `logger.info(event, **fields)` writes through the chain (tests/unit/test_log.py)."""

    def __init__(self, event: str, keys: Sequence[str], trusted: Iterable[str] = ()) -> None:
        self.event = event
        self.keys = tuple(keys)
        trusted = frozenset(trusted)
        self._parts: list[tuple[str, Callable[[Any], str] | None]] = []
        for i, key in enumerate(self.keys):
            prefix = ("{" if i == 0 else ", ") + _encode(key) + ": "
            if _secret_key(key) and key != "token_name":
                self._parts.append((prefix + _REDACTED_JSON, None))
            else:
                self._parts.append((prefix, _json if key in trusted else _untrusted))
        self._event = ', "event": ' + _untrusted(event)
        # Whether the configured static fields leave this line's keys alone (per set-up).
        self._seen: tuple[_FastInfo | None, bool] = (None, False)

    def _usable(self, fast: _FastInfo) -> bool:
        seen, usable = self._seen
        if seen is not fast:
            usable = fast.static_keys.isdisjoint(self.keys) and not {
                "event",
                "level",
                "timestamp",
            }.intersection(self.keys)
            self._seen = (fast, usable)
        return usable and fast.active()

    def info(self, logger: Any, **fields: Any) -> None:
        """`logger.info(event, **fields)`; `fields` in the order of `keys` (else, or when
        the chain is not the configured one, through the chain)."""
        fast = _fast
        if fast is not None and self._usable(fast) and tuple(fields) == self.keys:
            try:
                rendered = [
                    prefix if render is None else prefix + render(value)
                    for (prefix, render), value in zip(self._parts, fields.values(), strict=True)
                ]
            except _Unrendered:
                pass
            else:
                fast.write_event("".join(rendered), self._event)
                return
        logger.info(self.event, **fields)

    def direct(self) -> Callable[[str], None] | None:
        """Where a caller that renders this line's fields itself writes them (`{"a": 1, "b":
        2`, keys in the order of `keys`, each value as the chain would write it), while the
        chain is the configured one; None: log through `info` instead."""
        fast = _fast
        if fast is None or not self._usable(fast):
            return None
        event = self._event
        write = fast.write_event
        return lambda fields: write(fields, event)


def info(logger: Any, event: str, **fields: Any) -> None:
    """`logger.info(event, **fields)`, the same line written without the processor chain
    while the chain is the one `configure` set up."""
    fast = _fast
    if fast is not None and fast.active():
        try:
            line = fast.line(event, fields)
        except _Unrendered:
            pass
        else:
            fast.write(line)
            return
    logger.info(event, **fields)
