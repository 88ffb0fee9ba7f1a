"""deploy/k8s: the manifests parse and agree with each other, the sidecar config in the
ConfigMap passes `sidecar check-config`, and its Envoy config passes `envoy --mode validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.procs import envoy_binary, free_port

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


def documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_configmap_is_rendered_from_its_sources() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s_configmap.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _key_files(config: dict[str, Any]) -> list[str]:
    return [
        source["file"]
        for p in config["providers"]
        if p.get("credentials")
        for source in [
            p["credentials"].get("default"),
            *p["credentials"].get("by_group", {}).values(),
        ]
        if source
    ]


def test_sidecar_config_passes_check_config_with_its_keys_mounted(tmp_path: Path) -> None:
    data = one("ConfigMap", "llm-sidecar-config")["data"]
    config = yaml.safe_load(data["sidecar.yaml"])
    files = _key_files(config)
    assert files, "the cluster config holds the provider keys"
    # Where the pod mounts the Secret, the keys are there; here, stand-ins in tmp_path.
    text = data["sidecar.yaml"]
    for index, mounted in enumerate(files):
        stand_in = tmp_path / f"key-{index}"
        stand_in.write_text("sk-stand-in\n")
        text = text.replace(mounted, str(stand_in))
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "sk-stand-in" not in result.stdout + result.stderr
    redis = one("Service", "llm-sidecar-redis")
    assert config["store"]["url"] == (
        f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"
    )
    # Without the Secret mounted, the config is refused, naming the missing file.
    raw = tmp_path / "unmounted.yaml"
    raw.write_text(data["sidecar.yaml"])
    refused = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", str(raw)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and f"file {files[0]}" in refused.stderr


def test_provider_keys_come_from_a_secret_mounted_in_the_sidecar_only() -> None:
    config = yaml.safe_load(one("ConfigMap", "llm-sidecar-config")["data"]["sidecar.yaml"])
    pod = one("Deployment", "llm-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    sidecar, envoy = _container("sidecar"), _container("envoy")
    secret_mounts = {
        m["mountPath"]: m for m in sidecar["volumeMounts"] if "secret" in volumes[m["name"]]
    }
    for path in _key_files(config):
        directory, name = path.rsplit("/", 1)
        mount = secret_mounts[directory]
        # A directory mount (never subPath): only that sees a rotated Secret.
        assert "subPath" not in mount and mount.get("readOnly") is True
        assert volumes[mount["name"]]["secret"]["secretName"] == "llm-provider-keys"
        assert name in {"openai", "anthropic", "workers-ai"}
    assert not any("secret" in volumes[m["name"]] for m in envoy["volumeMounts"])


def test_envoy_config_passes_validate(tmp_path: Path) -> None:
    data = one("ConfigMap", "llm-sidecar-config")["data"]
    path = tmp_path / "envoy.yaml"
    path.write_text(data["envoy.yaml"])
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    envoy = yaml.safe_load(data["envoy.yaml"])
    deployed = yaml.safe_load((REPO / "deploy" / "envoy" / "envoy.yaml").read_text())
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0"
    # Apart from binding the pod's address, it is the deployed Envoy config.
    listener["address"] = "127.0.0.1"
    assert envoy == deployed


def _container(name: str) -> dict[str, Any]:
    pod = one("Deployment", "llm-gateway")["spec"]["template"]["spec"]
    (found,) = [c for c in pod["containers"] if c["name"] == name]
    return dict(found)


def _mounted_path(container: dict[str, Any], key: str) -> str:
    pod = one("Deployment", "llm-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        assert source["name"] == "llm-sidecar-config"
        assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
        for item in source.get("items", []):
            if item["key"] == key:
                return f"{mount['mountPath']}/{item['path']}"
    raise AssertionError(f"{key} is not mounted in {container['name']}")


def test_deployment_wires_sidecar_envoy_and_service() -> None:
    config = yaml.safe_load(one("ConfigMap", "llm-sidecar-config")["data"]["sidecar.yaml"])
    envoy_config = yaml.safe_load(one("ConfigMap", "llm-sidecar-config")["data"]["envoy.yaml"])
    sidecar, envoy = _container("sidecar"), _container("envoy")
    args = sidecar["command"] + sidecar["args"]
    assert args[:2] == ["sidecar", "serve"]
    assert args[args.index("--config") + 1] == _mounted_path(sidecar, "sidecar.yaml")
    assert envoy["args"][envoy["args"].index("-c") + 1] == _mounted_path(envoy, "envoy.yaml")
    # Envoy reaches the sidecar's gRPC port on the pod's loopback.
    clusters = {c["name"]: c for c in envoy_config["static_resources"]["clusters"]}
    for name in ("sidecar_grpc", "sidecar_grpc_check"):
        address = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
            "address"
        ]["socket_address"]
        assert config["listen"]["grpc"] == f"{address['address']}:{address['port_value']}"
    # The HTTP API listens on every pod address, on the port the probes and Service use.
    http_port = int(config["listen"]["http"].rsplit(":", 1)[1])
    assert config["listen"]["http"].startswith("0.0.0.0:")
    ports = {p["name"]: p["containerPort"] for c in (sidecar, envoy) for p in c["ports"]}
    assert ports["admin-http"] == http_port
    listener = envoy_config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert ports["llm"] == listener["port_value"]
    assert sidecar["env"][0]["name"] == config["admin"]["token_env"]
    service = one("Service", "llm-gateway")
    labels = one("Deployment", "llm-gateway")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


@pytest.mark.parametrize(
    "name", ["deployment.yaml", "service.yaml", "redis.yaml", "configmap.yaml", "pdb.yaml"]
)
def test_every_manifest_has_kind_and_name(name: str) -> None:
    for doc in yaml.safe_load_all((K8S / name).read_text()):
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def test_redis_password_comes_from_one_secret_for_redis_and_the_sidecar() -> None:
    config = yaml.safe_load(one("ConfigMap", "llm-sidecar-config")["data"]["sidecar.yaml"])
    redis_pod = one("Deployment", "llm-sidecar-redis")["spec"]["template"]["spec"]
    (redis,) = redis_pod["containers"]
    secret = {"secretKeyRef": {"name": "llm-sidecar-redis", "key": "password"}}
    assert _env(redis)["REDIS_PASSWORD"]["valueFrom"] == secret
    assert _env(redis)["REDISCLI_AUTH"]["valueFrom"] == secret  # for the readiness probe
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    sidecar = _env(_container("sidecar"))
    assert sidecar["REDIS_PASSWORD"]["valueFrom"] == secret
    url_env = config["store"]["url_env"]
    assert sidecar[url_env]["value"] == "redis://:$(REDIS_PASSWORD)@" + config["store"][
        "url"
    ].removeprefix("redis://")
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    names = [e["name"] for e in _container("sidecar")["env"]]
    assert names.index("REDIS_PASSWORD") < names.index(url_env)
