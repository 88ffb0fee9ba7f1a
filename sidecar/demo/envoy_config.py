"""Render deploy/envoy/envoy.yaml for local runs: other ports, sidecar address, fake upstream.

The deployed file stays the single source of truth for every ext_authz / ext_proc setting;
this module only moves addresses. It walks the parsed config instead of substituting text,
so a reformatted or extended envoy.yaml keeps working and a structural surprise fails loudly.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml"
MTLS_SOURCE = REPO_ROOT / "deploy" / "envoy" / "sidecar-mtls.yaml"

HCM_FILTER = "envoy.filters.network.http_connection_manager"
SIDECAR_FILTERS = ("envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc")
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

EnvoyConfig = dict[str, Any]


def load_envoy_config(source: Path | None = None) -> EnvoyConfig:
    """Parse the deployed Envoy config (or `source`) into a plain dict."""
    path = source if source is not None else DEFAULT_SOURCE
    if not path.is_file():
        where = "" if source is not None else f" (deploy/envoy/envoy.yaml under {REPO_ROOT})"
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
) -> EnvoyConfig:
    """Return the deployed config with local ports and addresses.

    With `sidecar_mtls`, the sidecar cluster gets deploy/envoy/sidecar-mtls.yaml's transport
    socket, with these certificate files.

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
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name in _sidecar_cluster_names(hcm):
        _point_cluster_at(clusters[name], *sidecar_grpc)
        if sidecar_mtls is not None:
            clusters[name]["transport_socket"] = _mtls_socket(sidecar_mtls)

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


def _mtls_socket(files: SidecarMtls) -> dict[str, Any]:
    socket: dict[str, Any] = yaml.safe_load(MTLS_SOURCE.read_text())["transport_socket"]
    tls = socket["typed_config"]
    tls["sni"] = files.sidecar_name
    context = tls["common_tls_context"]
    (cert,) = context["tls_certificates"]
    cert["certificate_chain"]["filename"] = str(files.client_cert)
    cert["private_key"]["filename"] = str(files.client_key)
    context["validation_context"]["trusted_ca"]["filename"] = str(files.sidecar_ca)
    (san,) = context["validation_context"]["match_typed_subject_alt_names"]
    san["matcher"]["exact"] = files.sidecar_name
    return socket


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


def _sidecar_cluster_names(hcm: dict[str, Any]) -> set[str]:
    names = {
        http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        for http_filter in hcm["http_filters"]
        if http_filter["name"] in SIDECAR_FILTERS
    }
    if not names:
        raise ValueError("no ext_authz or ext_proc filter with an envoy_grpc cluster")
    return names


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
