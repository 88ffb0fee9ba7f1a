"""deploy/k8s as the cluster would get it: `kubectl kustomize` renders it (offline), and the
render is what is checked. Its Deployment has requests and limits, readiness on /readyz and
liveness on /healthz, a PodDisruptionBudget covers its pods, every credential the sidecar's
config reads comes from a Secret, the pod runs the image as the Dockerfile builds it, and the
sidecar and Envoy configs taken from the render pass `sidecar check-config` and
`envoy --mode validate`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.procs import envoy_binary, free_port

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: scripts/setup.sh --for-tests installs Debian's"
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(one(docs, "Deployment", "llm-gateway")["spec"]["template"]["spec"])


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod(docs)["containers"] if c["name"] == name]
    return dict(found)


def config_data(docs: list[dict[str, Any]], key: str) -> str:
    return str(one(docs, "ConfigMap", "llm-sidecar-config")["data"][key])


def test_render_has_every_resource_of_the_kustomization(rendered: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {
        (d["kind"], d["metadata"]["name"])
        for name in kustomization["resources"]
        for d in yaml.safe_load_all((K8S / name).read_text())
        if d
    }
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == expected
    assert ("PodDisruptionBudget", "llm-gateway") in expected


def test_every_container_has_requests_limits_and_probes(rendered: list[dict[str, Any]]) -> None:
    for spec in pod(rendered)["containers"]:
        resources = spec["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), spec["name"]
        assert "memory" in resources["limits"], spec["name"]
        assert spec["readinessProbe"], spec["name"]
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["runAsNonRoot"] is True
    sidecar = container(rendered, "sidecar")
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ports


def test_a_disruption_budget_keeps_a_gateway_pod_serving(rendered: list[dict[str, Any]]) -> None:
    budget = one(rendered, "PodDisruptionBudget", "llm-gateway")
    assert budget["apiVersion"] == "policy/v1"
    deployment = one(rendered, "Deployment", "llm-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")
    else:
        yield path, node


def test_every_credential_the_config_reads_comes_from_a_secret(
    rendered: list[dict[str, Any]],
) -> None:
    config = yaml.safe_load(config_data(rendered, "sidecar.yaml"))
    sidecar = container(rendered, "sidecar")
    env = {e["name"]: e for e in sidecar.get("env", [])}

    def from_secret(name: str) -> bool:
        entry = env.get(name)
        if entry is None:
            return False
        if "secretKeyRef" in entry.get("valueFrom", {}):
            return True
        # A value built from other variables ($(NAME)) is secret when what it names is.
        refs = re.findall(r"\$\((\w+)\)", entry.get("value", ""))
        return bool(refs) and all(from_secret(ref) for ref in refs)

    volumes = {v["name"]: v for v in pod(rendered)["volumes"]}
    secret_mounts = [
        m["mountPath"] for m in sidecar.get("volumeMounts", []) if "secret" in volumes[m["name"]]
    ]
    env_keys = [
        (path, value)
        for path, value in _walk(config)
        if path.rsplit(".", 1)[-1].endswith("_env") and value
    ]
    assert ("admin.token_env", "SIDECAR_ADMIN_TOKEN") in env_keys
    # The store's password reaches the sidecar only inside the URL it reads from the env.
    assert "store.url_env" in dict(env_keys)
    for path, name in env_keys:
        assert from_secret(name), f"{path}: ${name} is not set from a Secret"
    key_files = [
        (path, str(value))
        for path, value in _walk(config)
        if ".credentials." in f".{path}" and path.endswith(".file")
    ]
    # The provider keys the sidecar holds are files of a Secret's volume.
    assert key_files and {p.split("[", 1)[0] for p, _ in key_files} == {"providers"}
    for path, value in key_files:
        assert any(value.startswith(m.rstrip("/") + "/") for m in secret_mounts), (
            f"{path}: {value} is not on a Secret's volume"
        )
    # No credential is written into the config itself.
    assert "@" not in str(config["store"]["url"]).split("//", 1)[-1]


def test_pod_runs_the_image_as_the_dockerfile_builds_it(rendered: list[dict[str, Any]]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    sidecar = container(rendered, "sidecar")
    user = re.search(r"^USER (\d+)", dockerfile, re.MULTILINE)
    assert user and sidecar["securityContext"]["runAsUser"] == int(user.group(1))
    assert sidecar["command"] == ["sidecar", "serve"]
    assert '["sidecar", "serve"]' in dockerfile  # the ENTRYPOINT
    # The image keeps its state in one directory: the pod mounts a writable volume there.
    state = re.search(r'^VOLUME \["([^"]+)"\]', dockerfile, re.MULTILINE)
    assert state
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert state.group(1) in mounts and not mounts[state.group(1)].get("readOnly")
    config = yaml.safe_load(config_data(rendered, "sidecar.yaml"))
    assert config["store"]["spool"].startswith(state.group(1) + "/")


def test_rendered_configs_pass_check_config_and_envoy_validate(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    text = config_data(rendered, "sidecar.yaml")
    values = list(_walk(yaml.safe_load(text)))
    # What the Secrets would provide (variables and key files), so check-config sees what
    # the pod has.
    env_names = [v for p, v in values if p.rsplit(".", 1)[-1].endswith("_env") and v]
    env = {"PATH": "/usr/bin:/bin", **{name: "from-a-secret" for name in env_names}}
    key_files = [str(v) for p, v in values if ".credentials." in p and p.endswith(".file")]
    for index, key_file in enumerate(key_files):
        stand_in = tmp_path / f"key-{index}"
        stand_in.write_text("sk-stand-in\n")
        text = text.replace(key_file, str(stand_in))
    sidecar_config = tmp_path / "sidecar.yaml"
    sidecar_config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", str(sidecar_config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    envoy_config = tmp_path / "envoy.yaml"
    envoy_config.write_text(config_data(rendered, "envoy.yaml"))
    result = subprocess.run(
        [
            envoy_binary(),
            "--mode",
            "validate",
            "-c",
            str(envoy_config),
            "--base-id",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
