"""Cluster store URLs: every node, the credentials, TLS; bad ones are config errors that
never print the password."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config.loader import ConfigError, parse_config, redact_url
from sidecar.store.factory import store_url
from sidecar.store.redis_cluster_url import ClusterTarget, parse_cluster_url


def test_cluster_url_names_every_node_and_the_credentials() -> None:
    assert parse_cluster_url("redis+cluster://a:7000,b:7001,[::1]:7002/") == ClusterTarget(
        (("a", 7000), ("b", 7001), ("::1", 7002))
    )
    target = parse_cluster_url("rediss+cluster://svc:p%40ss@h:6380/0")
    assert (target.nodes, target.username, target.password, target.tls) == (
        (("h", 6380),),
        "svc",
        "p@ss",
        True,
    )
    assert "p@ss" not in repr(target)


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis+cluster://a:7000/3", "only database 0"),
        ("redis+cluster://a:7000,b/", "'b' is not host:port"),
        ("redis+cluster://a:99999/", "'a:99999' is not host:port"),
        ("redis+cluster:///", "'' is not host:port"),
    ],
)
def test_bad_cluster_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cluster_url(url)


def test_config_accepts_a_cluster_store_and_refuses_a_bad_one_without_its_password() -> None:
    assert parse_config({"store": "redis+cluster://h1:7000,h2:7001/"}).store.url.startswith(
        "redis+cluster://"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": "redis+cluster://:s3cret@h1:7000,h2/"})
    assert "is not host:port" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert redact_url("redis+cluster://u:s3cret@h1:1,h2:2/") == (
        "redis+cluster://u:**********@h1:1,h2:2/"
    )


def test_url_env_may_hold_a_cluster_url(tmp_path: Path) -> None:
    config = parse_config({"store": {"url_env": "STORE_URL"}}).store
    url = "redis+cluster://:pw@h1:7000,h2:7000/"
    assert store_url(tmp_path, config, {"STORE_URL": url}) == url
