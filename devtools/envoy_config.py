"""Render deploy/envoy/envoy.yaml for local runs: other ports, sidecar address, fake upstream.

Every sidecar setting comes from `sidecar envoy-config` (sidecar/envoy/attach.py): the
deployed file's copy of those pieces is replaced by a fresh one for the local sidecar
address, at the same place. Everything else only moves addresses. It walks the parsed
config instead of substituting text, so a reformatted or extended envoy.yaml keeps working
and a structural surprise fails loudly.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devtools import ROOT
from sidecar.envoy.attach import DEFAULT_MAX_CHECKS, Piece, attach_pieces, mtls_socket

DEFAULT_SOURCE = ROOT / "deploy" / "envoy" / "envoy.yaml"

HCM_FILTER = "envoy.filters.network.http_connection_manager"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

EnvoyConfig = dict[str, Any]


def load_envoy_config(source: Path | None = None) -> EnvoyConfig:
    """Parse the deployed Envoy config (or `source`) into a plain dict."""
    path = source if source is not None else DEFAULT_SOURCE
    if not path.is_file():
        where = "" if source is not None else f" (deploy/envoy/envoy.yaml under {ROOT})"
        raise FileNotFoundError(f"Envoy config not found at {path}{where}")
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return loaded


def render_envoy_config(
    *,
    listen_port: int,
    admin_port: int,
    sidecar_grpc: tuple[str, int],
    provider_upstream: tuple[str, int] | None,
    source: Path | None = None,
    sidecar_mtls: SidecarMtls | None = None,
    max_checks: int = DEFAULT_MAX_CHECKS,
) -> EnvoyConfig:
    """Return the deployed config with local ports and addresses.

    `max_checks`: the Checks Envoy lets be in flight to the sidecar (`attach_pieces`).

    With `sidecar_mtls`, the sidecar cluster gets the mTLS transport socket of
    deploy/envoy/sidecar-mtls.yaml, with these certificate files.

    With `provider_upstream`, every provider cluster points at that plain-HTTP host:port
    and path prefixes are rewritten to bare provider paths, so `/openai/v1/chat/completions`
    and `/workers-ai/v1/chat/completions` both arrive as `/v1/chat/completions`. Routes keep
    their `host_rewrite_literal`, so the upstream's Host header still names the provider
    whose route was taken.
    """
    config = copy.deepcopy(load_envoy_config(source))

    listener = _single_listener(config)
    _socket_address(listener["address"])["port_value"] = listen_port
    _socket_address(config["admin"]["address"])["port_value"] = admin_port

    hcm = _http_connection_manager(listener)
    tls = _mtls_socket(sidecar_mtls) if sidecar_mtls is not None else None
    splice_attach_pieces(config, hcm, attach_pieces(*sidecar_grpc, tls=tls, max_checks=max_checks))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    if provider_upstream is not None:
        routes = [
            route
            for vhost in hcm["route_config"]["virtual_hosts"]
            for route in vhost["routes"]
            if "route" in route
        ]
        for name in {route["route"]["cluster"] for route in routes}:
            _make_plain_http(clusters[name])
            _point_cluster_at(clusters[name], *provider_upstream)
        _strip_provider_base_paths([route["route"] for route in routes])
    return config


def write_envoy_config(
    path: Path,
    *,
    listen_port: int,
    admin_port: int,
    sidecar_grpc: tuple[str, int],
    provider_upstream: tuple[str, int] | None,
    source: Path | None = None,
) -> Path:
    """Render the config (see `render_envoy_config`) and write it to `path` as YAML."""
    config = render_envoy_config(
        listen_port=listen_port,
        admin_port=admin_port,
        sidecar_grpc=sidecar_grpc,
        provider_upstream=provider_upstream,
        source=source,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@dataclass(frozen=True)
class SidecarMtls:
    """Files for Envoy's side of mTLS to the sidecar."""

    client_cert: Path
    client_key: Path
    sidecar_ca: Path
    sidecar_name: str = "sidecar.internal"


def _mtls_socket(files: SidecarMtls) -> Piece:
    return mtls_socket(
        client_cert=str(files.client_cert),
        client_key=str(files.client_key),
        sidecar_ca=str(files.sidecar_ca),
        sidecar_name=files.sidecar_name,
    )


def splice_attach_pieces(config: EnvoyConfig, hcm: dict[str, Any], pieces: Piece) -> None:
    """Replace the config's sidecar filters, access logs and clusters with `pieces`, each at
    the place the old ones held (the filters before the router, the clusters first)."""
    _splice(hcm, "http_filters", pieces["http_filters"])
    _splice(hcm, "access_log", pieces["access_log"])
    _splice(config["static_resources"], "clusters", pieces["clusters"])


def _splice(parent: dict[str, Any], key: str, fresh: list[Piece]) -> None:
    # Names from the default pieces and the fresh ones: whatever the deployed file holds of
    # either is the sidecar's, and goes.
    default = attach_pieces("127.0.0.1", 9001)[key]
    names = {p["name"] for p in default} | {p["name"] for p in fresh}
    items: list[Piece] = parent.get(key) or []
    at = next((i for i, item in enumerate(items) if item["name"] in names), None)
    kept = [item for item in items if item["name"] not in names]
    if at is None:
        at = len(kept) if key != "http_filters" else max(len(kept) - 1, 0)
    parent[key] = kept[:at] + fresh + kept[at:]


def _single_listener(config: EnvoyConfig) -> dict[str, Any]:
    listeners = config["static_resources"]["listeners"]
    if len(listeners) != 1:
        # With several listeners there is no telling which one listen_port is for.
        raise ValueError(f"expected exactly one listener, found {len(listeners)}")
    listener: dict[str, Any] = listeners[0]
    return listener


def _socket_address(address: dict[str, Any]) -> dict[str, Any]:
    socket_address: dict[str, Any] = address["socket_address"]
    return socket_address


def _http_connection_manager(listener: dict[str, Any]) -> dict[str, Any]:
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            if network_filter["name"] == HCM_FILTER:
                typed_config: dict[str, Any] = network_filter["typed_config"]
                return typed_config
    raise ValueError(f"listener {listener.get('name')!r} has no {HCM_FILTER}")


def _point_cluster_at(cluster: dict[str, Any], host: str, port: int) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        cluster["type"] = "STRICT_DNS"
        cluster.setdefault("dns_lookup_family", "V4_PREFERRED")
    else:
        cluster["type"] = "STATIC"
        cluster.pop("dns_lookup_family", None)
    address = {"socket_address": {"address": host, "port_value": port}}
    cluster["load_assignment"] = {
        "cluster_name": cluster["name"],
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }


def _make_plain_http(cluster: dict[str, Any]) -> None:
    cluster.pop("transport_socket", None)
    # auto_config negotiates the protocol through TLS ALPN, which a plain-HTTP upstream
    # cannot do: Envoy rejects auto_config on a cluster without TLS.
    options = cluster.setdefault("typed_extension_protocol_options", {})
    options[HTTP_PROTOCOL_OPTIONS] = {
        "@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
        "explicit_http_config": {"http_protocol_options": {}},
        # Envoy closes an idle connection before the local server does (uvicorn after 5 s):
        # otherwise a request can race the server's close and get a 503 "connection
        # termination" that no provider would have caused.
        "common_http_protocol_options": {"idle_timeout": "2s"},
    }


def _strip_provider_base_paths(actions: list[dict[str, Any]]) -> None:
    # A provider's base path is what its prefix route rewrites to ("/" for OpenAI,
    # "/client/v4/accounts/ACCOUNT_ID/ai/" for Workers AI). The fake upstream serves bare
    # paths, so that base becomes "/" in prefix routes and in fallback substitutions.
    base_paths = {
        action["cluster"]: action["prefix_rewrite"]
        for action in actions
        if "prefix_rewrite" in action
    }
    for action in actions:
        base = base_paths.get(action["cluster"])
        if base is None:
            continue
        if "prefix_rewrite" in action:
            action["prefix_rewrite"] = "/"
        regex_rewrite = action.get("regex_rewrite")
        if regex_rewrite is not None and regex_rewrite["substitution"].startswith(base):
            regex_rewrite["substitution"] = "/" + regex_rewrite["substitution"][len(base) :]
