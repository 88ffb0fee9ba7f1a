"""Read a Redis Cluster store URL: `redis+cluster://[user:password@]host:port,host:port/`.

The hosts are starting points only: the client asks any of them for the cluster's layout
and follows MOVED/ASK redirections and failovers from there. `rediss+cluster://` is the
same over TLS. No database number: a cluster has only database 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def as_cluster_url(url: str) -> str:
    """The cluster form of a Redis URL (`store.cluster: true`): `redis://h:p[,h:p]/` names
    the same nodes as `redis+cluster://h:p[,h:p]/`; ValueError for any other store URL."""
    if is_cluster_url(url):
        return url
    for plain, cluster in (("redis://", "redis+cluster://"), ("rediss://", "rediss+cluster://")):
        if url.startswith(plain):
            converted = cluster + url[len(plain) :]
            parse_cluster_url(converted)
            return converted
    raise ValueError(
        "cluster: true needs a redis://, rediss:// or redis+cluster:// URL, not "
        f"{url.split(':', 1)[0]!r}"
    )


def parse_cluster_url(url: str) -> ClusterTarget:
    """The nodes and credentials of a cluster URL; ValueError names what is wrong (never
    the password)."""
    scheme = next((s for s in CLUSTER_SCHEMES if url.startswith(s)), None)
    if scheme is None:
        raise ValueError("a cluster store URL starts with redis+cluster:// or rediss+cluster://")
    rest = url[len(scheme) :]
    hosts, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0; end the URL with / or /0")
    username = password = None
    if "@" in hosts:
        auth, hosts = hosts.rsplit("@", 1)
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"cluster store URL: {item.strip()!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return ClusterTarget(tuple(nodes), username, password, tls=scheme.startswith("rediss"))
