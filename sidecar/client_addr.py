"""The client address that rate limits count against: the direct peer, or, behind a trusted
proxy, the right-most X-Forwarded-For entry that no trusted proxy could have written."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=16)
def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[str, ...]) -> str:
    """Walk X-Forwarded-For from the right while each hop is a trusted proxy.

    Every proxy appends the address it received the request from, so entries left of the
    first untrusted one were written by whoever that was and prove nothing; a client that
    sends its own X-Forwarded-For to a trusted proxy only pads the left of the list.
    """
    nets = networks(trusted)

    def is_trusted(address: Address | None) -> bool:
        return address is not None and any(address in net for net in nets)

    current = _address(peer)
    if not forwarded_for or not is_trusted(current):
        return str(current) if current is not None else peer
    for hop in reversed(forwarded_for.split(",")):
        address = _address(hop)
        if address is None:
            # A trusted proxy writes addresses only, so this came from the client of the
            # last trusted hop; that hop is the nearest address anyone vouches for.
            break
        current = address
        if not is_trusted(address):
            break
    return str(current)
