"""Failed-attempt limits that can neither be dodged with a forged X-Forwarded-For nor turned
by one guesser against everyone who shares their proxy."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidecar.metrics import REGISTRY
from tests.security.conftest import GRANT_TYPE, Site, admin_token

PROXY = "10.0.0.2"  # trusted: the ingress in front of the sidecar
STRANGER = "203.0.113.50"  # not trusted: talks to the sidecar directly
LIMIT = 10


@pytest.fixture
def proxied(make_site: Callable[..., Site]) -> Site:
    return make_site(http={"trusted_proxies": ["10.0.0.0/8", "127.0.0.1/32"]})


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("sidecar_admin_auth_failures_total", {"reason": reason}) or 0.0


def test_eleventh_bad_admin_token_in_a_minute_gets_429_and_is_counted(proxied: Site) -> None:
    client = proxied.client(peer=STRANGER)
    bad_before, throttled_before = failures("bad_credential"), failures("throttled")
    for n in range(LIMIT):
        # A different forged X-Forwarded-For each time: from an untrusted peer it is ignored.
        answer = client.get(
            "/v1/service-tokens",
            headers={"authorization": f"Bearer guess-{n}", "x-forwarded-for": f"198.51.100.{n}"},
        )
        assert answer.status_code == 401, (n, answer.text)
    eleventh = client.get(
        "/v1/service-tokens",
        headers={"authorization": "Bearer guess-11", "x-forwarded-for": "198.51.100.99"},
    )
    assert eleventh.status_code == 429, eleventh.text
    assert eleventh.json()["success"] is False
    assert 1 <= int(eleventh.headers["retry-after"]) <= 60
    assert failures("bad_credential") == bad_before + LIMIT
    assert failures("throttled") == throttled_before + 1
    # While throttled even the right token is refused: a right guess looks like a wrong one.
    assert client.get("/v1/service-tokens", headers=admin_token()).status_code == 429
    # Other addresses are not blocked by this one: directly, or through the trusted proxy.
    assert (
        proxied.client(peer="192.0.2.77")
        .get("/v1/service-tokens", headers=admin_token())
        .status_code
        == 200
    )
    assert (
        proxied.client(peer=PROXY)
        .get("/v1/service-tokens", headers={**admin_token(), "x-forwarded-for": "198.51.100.7"})
        .status_code
        == 200
    )
    # An admin's own sign-in is not throttled by the address: a signed JWT cannot be guessed.
    assert client.get("/v1/service-tokens", headers=proxied.admin_person()).status_code == 200


def test_forwarded_for_counts_only_through_a_trusted_proxy(proxied: Site) -> None:
    proxy = proxied.client(peer=PROXY)
    # The client's own X-Forwarded-For entry is left of what the proxy appended: ignored.
    for n in range(LIMIT):
        answer = proxy.get(
            "/v1/usage",
            headers={
                "authorization": f"Bearer guess-{n}",
                "x-forwarded-for": f"192.0.2.{n}, 198.51.100.5",
            },
        )
        assert answer.status_code == 401
    assert (
        proxy.get(
            "/v1/usage",
            headers={
                "authorization": "Bearer again",
                "x-forwarded-for": "192.0.2.200, 198.51.100.5",
            },
        ).status_code
        == 429
    )
    assert (
        proxy.get(
            "/v1/usage", headers={**admin_token(), "x-forwarded-for": "198.51.100.6"}
        ).status_code
        == 200
    )


def test_unknown_device_codes_are_limited_per_address_despite_forged_forwarded_for(
    proxied: Site,
) -> None:
    client = proxied.client(peer=STRANGER)
    for n in range(LIMIT):
        answer = client.post(
            "/device/token",
            headers={"x-forwarded-for": f"192.0.2.{n}"},
            data={"grant_type": GRANT_TYPE, "device_code": f"guess-{n}"},
        )
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
    blocked = client.post(
        "/device/token",
        headers={"x-forwarded-for": "192.0.2.250"},
        data={"grant_type": GRANT_TYPE, "device_code": "guess-x"},
    )
    assert blocked.status_code == 429, blocked.text
    assert int(blocked.headers["retry-after"]) >= 1
    # Someone else's real login is still answered.
    other = proxied.client(peer="192.0.2.99")
    code = other.post("/device/code", data={"client_id": "x"}).json()
    pending = other.post(
        "/device/token", data={"grant_type": GRANT_TYPE, "device_code": code["device_code"]}
    )
    assert pending.json()["error"] == "authorization_pending"


def test_one_guesser_behind_a_shared_proxy_locks_out_only_themselves(proxied: Site) -> None:
    proxy = proxied.client(peer=PROXY)
    shared = {"x-forwarded-for": "198.51.100.23"}
    mallory = {**proxied.person("mallory@example.com"), **shared}
    for _ in range(LIMIT):
        wrong = proxy.get("/device", params={"user_code": "BBBB-BBBB"}, headers=mallory)
        assert wrong.status_code == 404
    real = proxy.post("/device/code", data={"client_id": "x"}).json()["user_code"]
    assert proxy.get("/device", params={"user_code": real}, headers=mallory).status_code == 429
    moved = {**proxied.person("mallory@example.com"), "x-forwarded-for": "198.51.100.24"}
    assert proxy.get("/device", params={"user_code": real}, headers=moved).status_code == 429
    # The approver shares mallory's address and proxy; their own limit is untouched.
    alice = {**proxied.person("alice@example.com"), **shared}
    assert proxy.get("/device", params={"user_code": real}, headers=alice).status_code == 200
    elsewhere = {**proxied.person("nina@example.com"), "x-forwarded-for": "198.51.100.25"}
    assert proxy.get("/device", params={"user_code": real}, headers=elsewhere).status_code == 200


def test_spoofed_forwarded_for_does_not_reset_the_device_guess_limit(proxied: Site) -> None:
    direct = proxied.client(peer=STRANGER)
    mallory = proxied.person("mallory@example.com")
    for n in range(LIMIT):
        wrong = direct.get(
            "/device",
            params={"user_code": "BBBB-BBBB"},
            headers={**mallory, "x-forwarded-for": f"192.0.2.{n}"},
        )
        assert wrong.status_code == 404
    # A new identity from the same untrusted peer with yet another forged address: the
    # address's count holds, and it is the peer's.
    keys = [proxied.person(f"sock{n}@example.com") for n in range(4)]
    for person in keys:
        for n in range(LIMIT):
            direct.get(
                "/device",
                params={"user_code": "BBBB-BBBB"},
                headers={**person, "x-forwarded-for": f"192.0.2.{100 + n}"},
            )
    fresh = {**proxied.person("fresh@example.com"), "x-forwarded-for": "192.0.2.222"}
    assert (
        direct.get("/device", params={"user_code": "BBBB-BBBB"}, headers=fresh).status_code == 429
    )


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.50", "192.0.2.1", "203.0.113.50"),  # untrusted peer: its header is ignored
        ("10.0.0.2", None, "10.0.0.2"),
        ("10.0.0.2", "192.0.2.1", "192.0.2.1"),
        ("10.0.0.2", "6.6.6.6, 192.0.2.1", "192.0.2.1"),  # the client's own entry is left of it
        ("10.0.0.2", "192.0.2.1, 10.0.0.9", "192.0.2.1"),  # two trusted proxies in a row
        ("10.0.0.2", "10.0.0.8, 10.0.0.9", "10.0.0.8"),  # all trusted: the farthest one
        ("10.0.0.2", "not-an-ip, 10.0.0.9", "10.0.0.9"),  # garbage only left of a proxy hop
        ("10.0.0.2", "[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:10.0.0.2", "192.0.2.1", "192.0.2.1"),  # IPv4-mapped peer
    ],
)
def test_client_address_walks_forwarded_for_from_the_right(
    peer: str, forwarded: str | None, expected: str
) -> None:
    from sidecar.client_addr import client_address

    assert client_address(peer, forwarded, ("10.0.0.0/8",)) == expected
