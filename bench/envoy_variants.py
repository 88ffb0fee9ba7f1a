"""Envoy configs for the benchmark rows, all derived from deploy/envoy/envoy.yaml.

Every row answers from Envoy itself (a `direct_response` on each route) instead of a real
upstream: a Python fake provider would cap throughput at a few thousand requests per second
and the table would measure it rather than the authorization path. The canned answer is an
OpenAI chat completion with usage, so the metering row parses and commits a real response.

What differs between rows is only which sidecar filters stay and where they point:

- `envoy`:  no ext_authz, no ext_proc (Envoy alone)
- `authz`:  ext_authz to the given gRPC port (the no-op floor or the sidecar), no ext_proc
- `full`:   every piece of `sidecar envoy-config` to the given port: ext_authz, the
            metering Lua filter, ext_proc and the metering access log (metering on)

Envoy alone buffers the request body (the buffer filter, 1 MiB, as ext_authz does): a
direct response sent before the body is read makes Envoy close the connection, and that
row would then measure TCP handshakes instead of requests.

Envoy's own stdout access log is removed in every row: it is the same cost for all of them
and would only add disk writes (hundreds of MB at the Envoy-alone rate) to a noisy shared
machine. The sidecar's metering access log stays in the `full` rows: it is how they meter.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from devtools.envoy_config import render_envoy_config
from devtools.procs import LOOPBACK
from sidecar.envoy.attach import CHECK_CLUSTER, METERING_LOG, SIDECAR_CLUSTER, SIDECAR_FILTERS

Variant = Literal["envoy", "authz", "full"]

# An answer shaped like OpenAI's, with usage, so ext_proc's meter finds something to charge.
CANNED_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_900_000_000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hello."},
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    },
    separators=(",", ":"),
)


def bench_envoy_config(
    variant: Variant,
    *,
    listen_port: int,
    admin_port: int,
    grpc_port: int = 1,
    h2_max_streams: int | None = None,
) -> dict[str, Any]:
    """The deployed config with local ports, canned answers and the row's filters.

    `h2_max_streams` caps concurrent streams per connection to the sidecar, which makes
    Envoy open several connections; with `sidecar serve --workers N` sharing one port, the
    kernel spreads connections (not requests) over the workers, so two connections (one per
    Envoy worker thread) would often land on the same process.
    """
    # provider_upstream keeps every provider cluster on loopback: nothing resolves or
    # connects outside the machine, even though the canned routes never use them.
    config = render_envoy_config(
        listen_port=listen_port,
        admin_port=admin_port,
        sidecar_grpc=(LOOPBACK, grpc_port),
        provider_upstream=(LOOPBACK, 9),
    )
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [
        entry
        for entry in hcm.get("access_log", [])
        if variant == "full" and entry["name"] == METERING_LOG
    ]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            route.pop("route", None)
            route["direct_response"] = {"status": 200, "body": {"inline_string": CANNED_COMPLETION}}
            route["response_headers_to_add"] = [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        # Requests outside the provider prefixes (none in the benchmark) get the same answer.
        vhost["routes"].append({"match": {"prefix": "/"}, "direct_response": {"status": 200}})
    keep: tuple[str, ...] = {"envoy": (), "authz": (SIDECAR_FILTERS[0],), "full": SIDECAR_FILTERS}[
        variant
    ]
    hcm["http_filters"] = [
        f for f in hcm["http_filters"] if f["name"] not in SIDECAR_FILTERS or f["name"] in keep
    ]
    if variant == "envoy":
        hcm["http_filters"].insert(
            0,
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1_048_576,
                },
            },
        )
    if h2_max_streams is not None:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] in (SIDECAR_CLUSTER, CHECK_CLUSTER):
                options = cluster["typed_extension_protocol_options"][
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                ]
                h2 = options["explicit_http_config"]["http2_protocol_options"]
                h2["max_concurrent_streams"] = h2_max_streams
    return config
