"""The CheckResponse in protobuf's wire format, written directly.

Building the message field by field through the protobuf API cost ~10 µs a Check (a
decision sets about a dozen headers and metadata values, each a few attribute writes), and
serializing it again afterwards. These bytes are what that message serializes to, up to
the order of map entries, which protobuf leaves free; tests/unit/test_envoy_authz.py holds
every decision shape to equality with the message the protobuf API builds. The parts that
only depend on the caller (its headers and metadata values) are written once per Identity.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable

from sidecar.model import Identity

# Field tags (field number << 3 | wire type 2, length-delimited, unless noted).
CHECK_STATUS = b"\x0a"  # CheckResponse.status
CHECK_DENIED = b"\x12"  # CheckResponse.denied_response
CHECK_OK = b"\x1a"  # CheckResponse.ok_response
CHECK_METADATA = b"\x22"  # CheckResponse.dynamic_metadata
OK_HEADERS = b"\x12"  # OkHttpResponse.headers
OK_REMOVE = b"\x2a"  # OkHttpResponse.headers_to_remove
OK_RESPONSE_HEADERS = b"\x32"  # OkHttpResponse.response_headers_to_add
DENIED_STATUS = b"\x0a"  # DeniedHttpResponse.status
DENIED_HEADERS = b"\x12"  # DeniedHttpResponse.headers
DENIED_BODY = b"\x1a"  # DeniedHttpResponse.body
_CODE = b"\x08"  # google.rpc.Status.code, envoy.type.v3.HttpStatus.code (varint)
_OPTION_HEADER = b"\x0a"  # HeaderValueOption.header
_OVERWRITE = b"\x18\x02"  # HeaderValueOption.append_action = OVERWRITE_IF_EXISTS_OR_ADD
_KEY = b"\x0a"  # HeaderValue.key, and a map entry's key
_VALUE = b"\x12"  # HeaderValue.value, and a map entry's value
_FIELDS = b"\x0a"  # Struct.fields (map entries)
_NUMBER = b"\x11"  # Value.number_value (64-bit)
_STRING = b"\x1a"  # Value.string_value
_STRUCT = b"\x2a"  # Value.struct_value

_SHORT = [bytes((n,)) for n in range(128)]
# How many written parts each cache below holds before it starts over, and the largest
# part kept: values a client chooses (a model name, the cookies it sent) can be long and
# new on every request, and must not make the caches large.
_MAX_CACHED = 4096
MAX_CACHED_BYTES = 256


def _length(n: int) -> bytes:
    if n < 128:
        return _SHORT[n]
    if n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


varint = _length


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, its length, its bytes."""
    return tag + _length(len(payload)) + payload


def header_option(name: str, value: str) -> bytes:
    """A HeaderValueOption's bytes (without its own tag): `name: value`, overwriting."""
    key, text = name.encode(), value.encode()
    header = _KEY + _length(len(key)) + key + _VALUE + _length(len(text)) + text
    return _OPTION_HEADER + _length(len(header)) + header + _OVERWRITE


class HeaderFields:
    """Repeated HeaderValueOption fields under one tag, one per (name, value), in order,
    each value with control characters made spaces (`clean`).

    A header's field is written once and then taken from a cache: most values repeat from
    Check to Check (the caller's, the model, the provider, a limit). Names in `unique`
    (a value minted per request) and fields longer than `MAX_CACHED_BYTES` are always
    written. The cache holds at most `bound` fields and starts over when full.
    """

    def __init__(
        self,
        tag: bytes,
        clean: Callable[[str], str],
        unique: Iterable[str] = (),
        bound: int = _MAX_CACHED,
    ) -> None:
        self._tag = tag
        self._clean = clean
        self._unique = frozenset(unique)
        self._bound = bound
        self._written: dict[tuple[str, str], bytes] = {}

    def _write(self, name: str, value: str) -> bytes:
        printable = value if value.isprintable() else self._clean(value)
        return field(self._tag, header_option(name, printable))

    def __call__(self, items: Iterable[tuple[str, str]]) -> bytes:
        written, unique, out = self._written, self._unique, []
        for item in items:
            found = written.get(item)
            if found is None:
                found = self._write(*item)
                if item[0] not in unique and len(found) <= MAX_CACHED_BYTES:
                    if len(written) >= self._bound:
                        written.clear()
                    written[item] = found
            out.append(found)
        return b"".join(out)


def string_entry(name: str, value: str) -> bytes:
    """A Struct map entry (Struct.fields) holding a string Value."""
    text = field(_STRING, value.encode())
    return field(_FIELDS, field(_KEY, name.encode()) + field(_VALUE, text))


_entries: dict[tuple[str, str], bytes] = {}


def cached_string_entry(name: str, value: str) -> bytes:
    """`string_entry`, for values that repeat (a decision's reason, a model): written once.
    At most `_MAX_CACHED` short ones are kept; the cache starts over when full."""
    found = _entries.get((name, value))
    if found is None:
        found = string_entry(name, value)
        if len(found) <= MAX_CACHED_BYTES:
            if len(_entries) >= _MAX_CACHED:
                _entries.clear()
            _entries[(name, value)] = found
    return found


_INPUT_TOKENS = field(_FIELDS, field(_KEY, b"input_tokens") + field(_VALUE, _NUMBER + bytes(8)))
_INPUT_TOKENS_HEAD = _INPUT_TOKENS[:-8]


def input_tokens_entry(value: int) -> bytes:
    """A Struct map entry `input_tokens` holding a number Value, its fixed part written
    once."""
    return _INPUT_TOKENS_HEAD + struct.pack("<d", value)


def metadata(namespace: str, entries: bytes) -> bytes:
    """CheckResponse.dynamic_metadata: `{namespace: {entries}}`."""
    inner = field(_VALUE, field(_STRUCT, entries))
    return field(CHECK_METADATA, field(_FIELDS, _namespace_key(namespace) + inner))


@functools.cache
def _namespace_key(namespace: str) -> bytes:
    return field(_KEY, namespace.encode())


def status(code: int) -> bytes:
    """CheckResponse.status with `code` (an empty Status for OK, as protobuf writes it)."""
    return field(CHECK_STATUS, _CODE + varint(code) if code else b"")


def identity_entries(identity: Identity) -> bytes:
    """The caller's metadata values: what Envoy's access log and the Lua filter read."""
    return (
        string_entry("kind", identity.kind)
        + string_entry("subject", identity.subject)
        + string_entry("email", identity.email)
        + string_entry("groups", ",".join(identity.groups))
        + string_entry("token_name", identity.token_name)
    )


# Rendered per Identity object (the JWT cache hands out one per token). Bounded, in count
# and in size (a verified token's claims, so larger than a header, but not unbounded).
MAX_CACHED_IDENTITY_BYTES = 2048
_identities: dict[int, tuple[Identity, bytes]] = {}


def cached_identity_entries(identity: Identity) -> bytes:
    cached = _identities.get(id(identity))
    if cached is not None and cached[0] is identity:
        return cached[1]
    entries = identity_entries(identity)
    if len(entries) <= MAX_CACHED_IDENTITY_BYTES:
        if len(_identities) >= _MAX_CACHED:
            _identities.clear()
        _identities[id(identity)] = (identity, entries)
    return entries
