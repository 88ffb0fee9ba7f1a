"""The Envoy pieces that attach this sidecar: http filters, access log entries and clusters.

This is the single source of every ext_authz / metering setting Envoy needs. `sidecar
envoy-config` prints it for an integrator; deploy/envoy/envoy.yaml, the demo, the k8s
ConfigMap, the benchmark and every Envoy test are built from it (scripts/render_envoy.py
writes it into the deployed file, devtools/envoy_config.py splices it into local runs).

An integrator appends the router to `http_filters`, adds `access_log` to the HTTP
connection manager and `clusters` to theirs (SPEC §2, the attach contract).
"""

from __future__ import annotations

import copy
import ipaddress
from importlib.resources import files
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.config.models import ListenConfig

SIDECAR_CLUSTER = "sidecar_grpc"
# Checks alone go through this cluster (the same sidecar address): its circuit breaker bounds
# the Checks in flight, and Envoy refuses the next one at once, before it queues in front of
# the sidecar. The access log and ext_proc streams stay on SIDECAR_CLUSTER, never refused.
CHECK_CLUSTER = "sidecar_grpc_check"
# Envoy's ext_authz timeout, sent to the sidecar as each Check's gRPC deadline.
CHECK_TIMEOUT_SECONDS = 2
# Checks in flight from one Envoy to one sidecar process: `overload.max_inflight`'s default.
DEFAULT_MAX_CHECKS = 64
EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
METER = "sidecar.meter"
METERING_LOG = "sidecar.metering_log"
# Filters in the order Envoy runs them on a request.
SIDECAR_FILTERS = (EXT_AUTHZ, METER, EXT_PROC)
# Where the Lua filter leaves what it saw, and where ext_proc tells it about the body.
METERING_NAMESPACE = "sidecar.metering"
BODY_NAMESPACE = "sidecar.body"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HEADER_MATCH_INPUT = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput"
_SKIP_FILTER = "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"

Piece = dict[str, Any]


def attach_pieces(
    grpc_host: str,
    grpc_port: int,
    *,
    tls: Piece | None = None,
    max_checks: int = DEFAULT_MAX_CHECKS,
) -> Piece:
    """`http_filters`, `access_log` and `clusters` for a sidecar gRPC listener at host:port.

    `tls`: the `transport_socket` of the sidecar clusters when the listener requires mTLS.
    `max_checks`: Checks Envoy lets be in flight to the sidecar at once; past it Envoy
    answers the request itself with a prompt 503 and Retry-After (`overload.max_inflight`
    times the sidecar processes behind the address).
    """
    return {
        "http_filters": [_ext_authz(), _meter(), _ext_proc()],
        "access_log": [_metering_log()],
        "clusters": [
            _sidecar_cluster(SIDECAR_CLUSTER, grpc_host, grpc_port, tls, None),
            _sidecar_cluster(CHECK_CLUSTER, grpc_host, grpc_port, tls, max_checks),
        ],
    }


def pieces_for_listen(
    listen: ListenConfig, *, grpc: str | None = None, max_checks: int = DEFAULT_MAX_CHECKS
) -> Piece:
    """The pieces for a sidecar config's gRPC listener (or `grpc`, host:port, instead).

    A wildcard bind (0.0.0.0, ::) is reached over loopback: Envoy runs beside the sidecar.
    With `grpc_tls`, the cluster presents Envoy's client certificate from /etc/envoy/tls/
    and expects the sidecar's certificate to name `sidecar.internal`
    (deploy/envoy/sidecar-mtls.yaml explains both sides).
    """
    host, port = split_host_port(grpc or listen.grpc)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    tls = None
    if listen.grpc_tls is not None:
        tls = mtls_socket(
            client_cert="/etc/envoy/tls/envoy-client.crt",
            client_key="/etc/envoy/tls/envoy-client.key",
            sidecar_ca="/etc/envoy/tls/sidecar-ca.crt",
            sidecar_name="sidecar.internal",
        )
    return attach_pieces(host, port, tls=tls, max_checks=max_checks)


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) → (host, port); the config loader validated it."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def mtls_socket(*, client_cert: str, client_key: str, sidecar_ca: str, sidecar_name: str) -> Piece:
    """Envoy's side of mTLS to the sidecar: its client certificate, and the sidecar's checked
    against `sidecar_ca` and `sidecar_name`."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "sni": sidecar_name,
            "common_tls_context": {
                # gRPC needs HTTP/2, negotiated by ALPN over TLS.
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": client_cert},
                        "private_key": {"filename": client_key},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": sidecar_ca},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": sidecar_name}}
                    ],
                },
            },
        },
    }


def _ext_authz() -> Piece:
    return {
        "name": EXT_AUTHZ,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            # A decision is a few store round trips; past 2 s the sidecar is stuck, and a
            # prompt 503 beats a hung client. Its own cluster: see CHECK_CLUSTER.
            "grpc_service": {
                "envoy_grpc": {"cluster_name": CHECK_CLUSTER},
                "timeout": f"{CHECK_TIMEOUT_SECONDS}s",
            },
            # The model (so the price and the allowlist) is in the JSON body. A larger body gets
            # 413 rather than a decision made on a truncated one; bytes, not a UTF-8 string,
            # so the JSON arrives exactly as sent.
            "with_request_body": {
                "max_request_bytes": 1_048_576,
                "allow_partial_message": False,
                "pack_as_bytes": True,
            },
            # A Check may switch the request to a fallback route (or remove client-sent
            # x-sidecar-* headers): the route chosen before it must be forgotten.
            "clear_route_cache": True,
            # Fail closed: an unreachable sidecar must not become unmetered, unlimited spend.
            # 507 is a status nothing else on this path sends; the listener's
            # local_reply_config turns it into a retryable 503 with the JSON envelope. Errors
            # are: no answer within the timeout, no connection, the Checks circuit breaker
            # full, or a gRPC error status.
            "failure_mode_allow": False,
            "status_on_error": {"code": "InsufficientStorage"},
        },
    }


def _meter() -> Piece:
    # Before ext_proc: if ext_proc fails, the call still has its reservation id recorded, and
    # the access log charges it $0 (it never reached the provider) instead of leaving the
    # reservation to expire into its estimate.
    return {
        "name": METER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": lua_source()},
        },
    }


def lua_source() -> str:
    """sidecar/envoy/meter.lua: reads responses as they stream, for the access log."""
    return files("sidecar.envoy").joinpath("meter.lua").read_text(encoding="utf-8")


def _ext_proc() -> Piece:
    # Only for calls whose body must change: the Check marks them with `x-sidecar-body:
    # rewrite` (and ext_proc removes it). Every other call skips this filter, and with it a
    # gRPC stream to the sidecar.
    skip_unless_marked = {
        "matcher_list": {
            "matchers": [
                {
                    "predicate": {
                        "not_matcher": {
                            "single_predicate": {
                                "input": {
                                    "name": "x-sidecar-body",
                                    "typed_config": {
                                        "@type": _HEADER_MATCH_INPUT,
                                        "header_name": "x-sidecar-body",
                                    },
                                },
                                "value_match": {"exact": "rewrite"},
                            }
                        }
                    },
                    "on_match": {
                        "action": {
                            "name": "skip",
                            "typed_config": {"@type": _SKIP_FILTER},
                        }
                    },
                }
            ]
        }
    }
    return {
        "name": EXT_PROC,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "xds_matcher": skip_unless_marked,
            "extension_config": {"name": EXT_PROC, "typed_config": _ext_proc_config()},
        },
    }


def _ext_proc_config() -> Piece:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        # No stream deadline: Envoy may hold the stream open until the response ends, and a
        # deadline would then cut long generations; message_timeout bounds each exchange.
        "grpc_service": {"envoy_grpc": {"cluster_name": SIDECAR_CLUSTER}},
        # Only the request: a fallback rewrites the JSON `model`, and an OpenAI chat stream
        # gets `stream_options.include_usage`; both need the whole body. Responses never
        # come here (the Lua filter reads them), so a stream costs no gRPC message per chunk.
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SKIP",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        # ext_proc tells the Lua filter when the client must not see the usage event it
        # turned on: the only metadata it may write.
        "metadata_options": {"receiving_namespaces": {"untyped": [BODY_NAMESPACE]}},
        # Fail closed, as for ext_authz: a body that should have been rewritten must not
        # reach the provider as sent.
        "failure_mode_allow": False,
        "status_on_error": {"code": "InsufficientStorage"},
        "message_timeout": "2s",
    }


def _metering_log() -> Piece:
    """One record per admitted call, batched to the sidecar, which charges it."""
    return {
        "name": METERING_LOG,
        # Calls with a reservation, to be charged; and calls that ended before the metering
        # filter ran while their Check may have admitted them, which the sidecar then
        # releases at $0 (sidecar/envoy/unanswered.py): the client left (DC, DR), or the
        # Check failed after a while (UAEX past a second: its timeout; quicker refusals,
        # the sidecar's own and the circuit breaker's, are not sent).
        "filter": {
            "or_filter": {
                "filters": [
                    {
                        "metadata_filter": {
                            "matcher": {
                                "filter": METERING_NAMESPACE,
                                "path": [{"key": "rid"}],
                                "value": {"present_match": True},
                            },
                            "match_if_key_not_found": False,
                        }
                    },
                    {"response_flag_filter": {"flags": ["DC", "DR"]}},
                    {
                        "and_filter": {
                            "filters": [
                                {"response_flag_filter": {"flags": ["UAEX"]}},
                                {
                                    "duration_filter": {
                                        "comparison": {
                                            "op": "GE",
                                            "value": {
                                                "default_value": 1000,
                                                "runtime_key": "sidecar.slow_check_ms",
                                            },
                                        }
                                    }
                                },
                            ]
                        }
                    },
                ]
            }
        },
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
            "HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "sidecar-metering",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": SIDECAR_CLUSTER}},
                # Records go out in batches at least every 50 ms (sooner past 64 KiB): a
                # charge lands within that of the response's end. While the stream to the
                # sidecar is backed up (HTTP/2 flow control), Envoy keeps records up to
                # `buffer_size_bytes` and drops the next ones (its stat
                # `access_logs.grpc_access_log.logs_dropped`): 4 MiB is seconds of records
                # at the rates one sidecar serves. A record Envoy did not deliver leaves the
                # reservation to be charged its estimate at `admission.reservation_ttl`
                # (`sidecar_reservations_expired_total`).
                "buffer_flush_interval": "0.05s",
                "buffer_size_bytes": 4 * 1024 * 1024,
            },
            # The trace the call belongs to (Envoy's span when Envoy traces, else the
            # client's): the charge's span joins it.
            "additional_request_headers_to_log": ["traceparent", "tracestate"],
        },
    }


def _sidecar_cluster(
    name: str, host: str, port: int, tls: Piece | None, max_checks: int | None
) -> Piece:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        discovery: Piece = {"type": "STRICT_DNS", "dns_lookup_family": "V4_PREFERRED"}
    else:
        discovery = {"type": "STATIC"}
    if max_checks is None:
        # Request-body streams of every in-flight call and the access log's streams: the
        # default 1024-request circuit breaker would fail (closed) the 1025th, and a
        # refused access log stream would lose charges. No practical limit here.
        limits = {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 100000}
    else:
        # Checks past `max_checks` in flight would only wait in front of the sidecar (in
        # its gRPC queue, where it cannot refuse them early) until Envoy's 2 s timeout,
        # using up the CPU of the ones it can still serve. Refused here instead: an
        # overflow is an ext_authz error, 507, mapped to 503 + Retry-After like a timeout,
        # at once and at no cost to the sidecar. Pending (no connection yet) as well.
        limits = {
            "max_connections": 10000,
            "max_pending_requests": max_checks,
            "max_requests": max_checks,
        }
    cluster: Piece = {
        "name": name,
        **discovery,
        "connect_timeout": "1s",
        "circuit_breakers": {"thresholds": [limits]},
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                # Notice a dead sidecar connection before a Check waits on it.
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                    }
                },
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if tls is not None:
        # A copy each: YAML would print a shared dict as an anchor and an alias.
        cluster["transport_socket"] = copy.deepcopy(tls)
    return cluster
