"""Hot reload of the policy file: SIGHUP and file changes; a bad file keeps the old policy."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack


@pytest.fixture(scope="module")
def reload_stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer
) -> Iterator[tuple[Stack, dict[str, Any]]]:
    workdir = tmp_path_factory.mktemp("reload")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(issuer, jwks, f"sqlite:///{workdir}/s.db")
    with running_stack(workdir, issuer, config) as stack:
        yield stack, config


def intern_status(stack: Stack, issuer: DevIssuer) -> int:
    token = issuer.mint("ivy@example.com", ["interns"])
    return httpx.post(
        stack.envoy_url + "/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json={"model": "gpt-4o-mini", "messages": []},
        timeout=20,
    ).status_code


def wait_for(predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def ready(stack: Stack) -> dict[str, Any]:
    return dict(httpx.get(stack.admin_url + "/readyz", timeout=5).json())


def test_bad_config_keeps_old_policy_good_one_applies(
    reload_stack: tuple[Stack, dict[str, Any]], issuer: DevIssuer
) -> None:
    stack, config = reload_stack
    pid = stack.sidecars[0].pid
    assert intern_status(stack, issuer) == 200
    version = ready(stack)["config_version"]

    stack.config_path.write_text("spend_limits: [{name: broken}]\nunknown_key: 1\n")
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: ready(stack)["config_last_error"] is not None, 5)
    state = ready(stack)
    assert state["config_version"] == version
    assert (
        "spend_limits[0]: exactly one of budget_usd, tokens or requests is required"
        in state["config_last_error"]
    )
    assert intern_status(stack, issuer) == 200  # still the old policy
    metrics = httpx.get(stack.admin_url + "/metrics", timeout=5).text
    # Exported at 0 from the start, so the count is what shows the failed reload.
    assert 'sidecar_config_reloads_total{result="error"} 1.0' in metrics

    stricter = {
        **config,
        "models": {"default": "allow", "rules": [{"groups": ["interns"], "allow": ["@cf/*"]}]},
    }
    stack.write_config(stricter)
    os.kill(pid, signal.SIGHUP)
    took = wait_for(lambda: intern_status(stack, issuer) == 403, 5)
    assert took < 1.5
    assert ready(stack)["config_last_error"] is None
    assert ready(stack)["config_version"] != version


def test_file_change_alone_is_picked_up(
    reload_stack: tuple[Stack, dict[str, Any]], issuer: DevIssuer
) -> None:
    stack, config = reload_stack
    stack.write_config(config)  # the original: interns may use gpt-4o-mini again
    took = wait_for(lambda: intern_status(stack, issuer) == 200, 5)
    assert took < 2.0


def test_configmap_style_symlink_swap(
    reload_stack: tuple[Stack, dict[str, Any]], issuer: DevIssuer
) -> None:
    import yaml

    stack, config = reload_stack
    # The ConfigMap layout: sidecar.yaml → ..data/sidecar.yaml, ..data → a timestamped dir.
    root = stack.config_path.parent
    first, second = root / "..2026_01", root / "..2026_02"
    for directory, cfg in (
        (first, config),
        (
            second,
            {
                **config,
                "models": {
                    "default": "allow",
                    "rules": [{"groups": ["interns"], "deny": ["gpt-*"]}],
                },
            },
        ),
    ):
        directory.mkdir()
        (directory / "sidecar.yaml").write_text(yaml.safe_dump(cfg))
    (root / "..data").symlink_to(first.name)
    link = root / "sidecar.yaml.link"
    link.symlink_to("..data/sidecar.yaml")
    link.replace(stack.config_path)  # the served path is now the symlink
    wait_for(lambda: intern_status(stack, issuer) == 200, 5)
    tmp = root / "..data_tmp"
    tmp.symlink_to(second.name)
    tmp.replace(root / "..data")  # the atomic swap Kubernetes does
    wait_for(lambda: intern_status(stack, issuer) == 403, 5)
