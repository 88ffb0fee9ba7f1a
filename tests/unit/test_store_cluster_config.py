"""`store: {url: redis://..., cluster: true}`: the Redis URL names Redis Cluster nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config.loader import ConfigError, parse_config
from sidecar.store.factory import store_url

CONFIG = Path("sidecar.yaml")


def test_cluster_true_reads_a_redis_url_as_cluster_nodes() -> None:
    config = parse_config({"store": {"url": "redis://:s3cret@h1:7000,h2:7001/", "cluster": True}})
    assert store_url(CONFIG, config.store) == "redis+cluster://:s3cret@h1:7000,h2:7001/"
    tls = parse_config({"store": {"url": "rediss://h1:7000/0", "cluster": True}})
    assert store_url(CONFIG, tls.store) == "rediss+cluster://h1:7000/0"
    # Without the option a redis:// URL is one Redis, as before.
    plain = parse_config({"store": {"url": "redis://h1:7000/0"}})
    assert store_url(CONFIG, plain.store) == "redis://h1:7000/0"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite:///./s.db", "cluster: true needs a redis://"),
        ("redis://h1:7000/3", "only database 0"),
        ("redis://h1,h2:7001/", "'h1' is not host:port"),
    ],
)
def test_cluster_true_with_a_url_that_names_no_cluster_is_a_config_error(
    url: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": {"url": url, "cluster": True}})
    assert says in str(caught.value)
    assert "store" in str(caught.value)


def test_cluster_true_applies_to_the_url_from_the_environment() -> None:
    config = parse_config({"store": {"url_env": "STORE_URL", "cluster": True}})
    env = {"STORE_URL": "redis://:pw@h1:7000/"}
    assert store_url(CONFIG, config.store, env) == "redis+cluster://:pw@h1:7000/"
    with pytest.raises(ConfigError) as caught:
        store_url(CONFIG, config.store, {"STORE_URL": "sqlite:///./s.db"})
    assert "cluster: true needs a redis://" in str(caught.value)
    bad = {"STORE_URL": "redis://:topsecret@h1:7000/5"}
    with pytest.raises(ConfigError) as caught:
        store_url(CONFIG, config.store, bad)
    assert "topsecret" not in str(caught.value)
