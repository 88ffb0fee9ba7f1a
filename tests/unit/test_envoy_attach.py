"""`sidecar envoy-config`: the attach contract's three keys, and the Envoy configs built on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.envoy_config import render_envoy_config
from sidecar.cli import main
from sidecar.config.models import ListenConfig, OverloadConfig
from sidecar.envoy.attach import (
    CHECK_CLUSTER,
    DEFAULT_MAX_CHECKS,
    EXT_AUTHZ,
    SIDECAR_CLUSTER,
    pieces_for_listen,
)

REPO = Path(__file__).resolve().parents[2]
HCM = "envoy.filters.network.http_connection_manager"


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (found,) = [f["typed_config"] for f in chain["filters"] if f["name"] == HCM]
    return dict(found)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_json_has_exactly_the_three_keys_with_ext_authz_first_and_no_router(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("listen: {grpc: '10.1.2.3:7001', http: '127.0.0.1:7002'}\n")
    pieces = json.loads(_run(["envoy-config", str(config), "--format", "json"], capsys))
    assert list(pieces) == ["http_filters", "access_log", "clusters"]
    names = [f["name"] for f in pieces["http_filters"]]
    assert names[0] == EXT_AUTHZ
    assert "envoy.filters.http.router" not in names
    authz = pieces["http_filters"][0]["typed_config"]
    assert authz["transport_api_version"] == "V3"
    assert authz["with_request_body"]["max_request_bytes"] == 1_048_576
    assert authz["clear_route_cache"] is True and authz["failure_mode_allow"] is False
    assert [c["name"] for c in pieces["clusters"]] == [SIDECAR_CLUSTER, CHECK_CLUSTER]
    for cluster in pieces["clusters"]:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"] == {"address": "10.1.2.3", "port_value": 7001}
    # Every cluster a filter or access log names is among the clusters printed.
    referenced = {
        f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        for f in pieces["http_filters"]
        if "grpc_service" in f["typed_config"]
    }
    assert referenced <= {c["name"] for c in pieces["clusters"]}


def test_yaml_format_prints_the_same_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("listen: {grpc: '0.0.0.0:9101'}\n")
    as_json = json.loads(_run(["envoy-config", str(config), "--format", "json"], capsys))
    as_yaml = yaml.safe_load(_run(["envoy-config", str(config)], capsys))
    assert as_yaml == as_json
    # A wildcard bind is reached over loopback from the Envoy beside it.
    address = as_json["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert address["endpoint"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_bad_config_is_an_error_and_prints_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("listen: {grpc: 'no-port'}\n")
    assert main(["envoy-config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "listen.grpc" in captured.err


def test_grpc_tls_config_prints_the_deployed_mtls_socket(tmp_path: Path) -> None:
    listen = ListenConfig.model_validate(
        {
            "grpc": "127.0.0.1:9001",
            "grpc_tls": {"cert_file": "s.crt", "key_file": "s.key", "client_ca_file": "ca.crt"},
        }
    )
    clusters = pieces_for_listen(listen)["clusters"]
    documented = yaml.safe_load((REPO / "deploy/envoy/sidecar-mtls.yaml").read_text())
    assert len(clusters) == 2
    for cluster in clusters:
        assert cluster["transport_socket"] == documented["transport_socket"]


def _limits(pieces: dict[str, Any], name: str) -> dict[str, int]:
    (cluster,) = [c for c in pieces["clusters"] if c["name"] == name]
    (limits,) = cluster["circuit_breakers"]["thresholds"]
    return dict(limits)


def test_checks_alone_are_bounded_by_max_inflight_times_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("overload: {max_inflight: 40}\n")
    pieces = json.loads(
        _run(["envoy-config", str(config), "--format", "json", "--workers", "3"], capsys)
    )
    authz = pieces["http_filters"][0]["typed_config"]
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == CHECK_CLUSTER
    assert _limits(pieces, CHECK_CLUSTER)["max_requests"] == 120
    assert _limits(pieces, CHECK_CLUSTER)["max_pending_requests"] == 120
    # The access log and ext_proc streams share no bound with Checks and are never refused.
    assert (
        pieces["access_log"][0]["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"][
            "cluster_name"
        ]
        == SIDECAR_CLUSTER
    )
    ext_proc = pieces["http_filters"][2]["typed_config"]["extension_config"]["typed_config"]
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] == SIDECAR_CLUSTER
    assert _limits(pieces, SIDECAR_CLUSTER)["max_requests"] >= 100_000
    # Without a config: the default max_inflight, one process.
    default = pieces_for_listen(ListenConfig())
    assert _limits(default, CHECK_CLUSTER)["max_requests"] == DEFAULT_MAX_CHECKS
    assert OverloadConfig().max_inflight == DEFAULT_MAX_CHECKS
    assert main(["envoy-config", str(config), "--workers", "0"]) == 2


def test_deployed_envoy_yaml_holds_exactly_the_printed_pieces() -> None:
    fresh = subprocess.run(
        [sys.executable, "scripts/render_envoy.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert fresh.returncode == 0, fresh.stderr
    deployed = yaml.safe_load((REPO / "deploy/envoy/envoy.yaml").read_text())
    pieces = pieces_for_listen(ListenConfig())
    hcm = _hcm(deployed)
    assert hcm["http_filters"][:-1] == pieces["http_filters"]
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    assert [e for e in hcm["access_log"] if e in pieces["access_log"]] == pieces["access_log"]
    clusters = deployed["static_resources"]["clusters"]
    assert clusters[: len(pieces["clusters"])] == pieces["clusters"]


def test_k8s_envoy_is_built_for_the_k8s_sidecar_listen_address() -> None:
    configmap = yaml.safe_load((REPO / "deploy/k8s/configmap.yaml").read_text())
    sidecar = yaml.safe_load(configmap["data"]["sidecar.yaml"])
    envoy = yaml.safe_load(configmap["data"]["envoy.yaml"])
    # One sidecar process in the pod: Envoy's Checks bound is its max_inflight.
    max_inflight = OverloadConfig.model_validate(sidecar.get("overload", {})).max_inflight
    pieces = pieces_for_listen(
        ListenConfig.model_validate(sidecar["listen"]), max_checks=max_inflight
    )
    assert _hcm(envoy)["http_filters"][:-1] == pieces["http_filters"]
    clusters = [
        c
        for c in envoy["static_resources"]["clusters"]
        if c["name"] in (SIDECAR_CLUSTER, CHECK_CLUSTER)
    ]
    assert clusters == pieces["clusters"]


def test_local_runs_splice_fresh_pieces_for_their_sidecar_address() -> None:
    config = render_envoy_config(
        listen_port=1,
        admin_port=2,
        sidecar_grpc=("127.0.0.1", 4567),
        provider_upstream=("127.0.0.1", 9),
    )
    pieces = pieces_for_listen(ListenConfig(), grpc="127.0.0.1:4567")
    hcm = _hcm(config)
    assert hcm["http_filters"][:-1] == pieces["http_filters"]
    clusters = [
        c
        for c in config["static_resources"]["clusters"]
        if c["name"] in (SIDECAR_CLUSTER, CHECK_CLUSTER)
    ]
    assert clusters == pieces["clusters"]
    # Listener-level settings an integrator sets for themself stay as deployed.
    assert (
        hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    )
    assert hcm["local_reply_config"]["mappers"][0]["status_code"] == 503
