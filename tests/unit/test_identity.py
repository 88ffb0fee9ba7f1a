"""Identity: claim mapping, JWT verification with JWKS rotation, allowlists (no network)."""

from __future__ import annotations

from typing import Any

import pytest

from devtools.keys import DevIssuer
from sidecar.identity.errors import AuthError
from sidecar.identity.jwks import JwksCache
from sidecar.identity.jwt_verify import IssuerPolicy, JwtVerifier, groups_from_claim
from sidecar.policy.allowlist import Allowlist, AllowRule, compile_globs


class FakeJwksServer:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.fail = False
        self.calls = 0

    async def fetch(self, url: str) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("identity provider down")
        return self.doc


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verifier(
    issuer: DevIssuer,
    server: FakeJwksServer,
    clock: Clock,
    directory: dict[str, tuple[str, ...]] | None = None,
    claim: str = "groups",
) -> JwtVerifier:
    keys = JwksCache(
        url="https://idp/certs", fetch=server.fetch, refresh_floor_seconds=30, clock=clock
    )
    policy = IssuerPolicy(issuer.issuer, (issuer.audience,), ("RS256",), claim, 30, keys)
    return JwtVerifier([policy], directory or {})


@pytest.fixture
def issuer() -> DevIssuer:
    return DevIssuer.generate()


async def test_user_claims_map_to_identity(issuer: DevIssuer) -> None:
    server, clock = FakeJwksServer(issuer.jwks()), Clock()
    v = verifier(issuer, server, clock, {"alice@example.com": ("ml", "eng")})
    identity = await v.verify(issuer.mint("alice@example.com", ["eng", "x"]))
    assert identity.kind == "user" and identity.email == "alice@example.com"
    assert identity.groups == ("eng", "x", "ml")
    assert identity.user == "alice@example.com"


async def test_service_token_jwt_has_common_name_and_empty_sub(issuer: DevIssuer) -> None:
    v = verifier(issuer, FakeJwksServer(issuer.jwks()), Clock())
    identity = await v.verify(issuer.mint_service("abc123.access"))
    assert identity.kind == "service"
    assert identity.token_name == "abc123.access" and identity.user == "abc123.access"


def test_groups_claim_shapes() -> None:
    assert groups_from_claim(["a", {"name": "b"}, {"id": 3}, 4]) == ("a", "b")
    assert groups_from_claim("solo") == ("solo",)
    assert groups_from_claim(None) == ()


async def test_dotted_groups_claim_path(issuer: DevIssuer) -> None:
    v = verifier(issuer, FakeJwksServer(issuer.jwks()), Clock(), claim="custom.teams")
    token = issuer.mint("a@example.com", None, custom={"teams": [{"name": "core"}]})
    assert (await v.verify(token)).groups == ("core",)


async def test_new_key_at_jwks_url_is_picked_up_on_unknown_kid(issuer: DevIssuer) -> None:
    server, clock = FakeJwksServer(issuer.jwks()), Clock()
    v = verifier(issuer, server, clock)
    await v.verify(issuer.mint("a@example.com"))
    rotated = DevIssuer.generate(issuer.issuer, issuer.audience)
    server.doc = rotated.jwks(issuer)
    clock.now += 31  # past the refresh floor
    assert (await v.verify(rotated.mint("b@example.com"))).email == "b@example.com"


async def test_unknown_kid_refresh_has_a_floor(issuer: DevIssuer) -> None:
    server, clock = FakeJwksServer(issuer.jwks()), Clock()
    v = verifier(issuer, server, clock)
    await v.verify(issuer.mint("a@example.com"))
    calls = server.calls
    clock.now += 31
    forged = DevIssuer.generate(issuer.issuer, issuer.audience)
    for _ in range(20):
        with pytest.raises(AuthError) as info:
            await v.verify(forged.mint("x@example.com"))
        assert info.value.code == "unknown_kid"
    assert server.calls == calls + 1


async def test_failed_fetch_keeps_last_good_keys(issuer: DevIssuer) -> None:
    server, clock = FakeJwksServer(issuer.jwks()), Clock()
    v = verifier(issuer, server, clock)
    await v.verify(issuer.mint("a@example.com"))
    server.fail = True
    clock.now += 7200  # past the cache age: a refresh is attempted and fails
    assert (await v.verify(issuer.mint("c@example.com"))).email == "c@example.com"


async def test_cache_is_keyed_by_the_whole_token(issuer: DevIssuer) -> None:
    v = verifier(issuer, FakeJwksServer(issuer.jwks()), Clock())
    token = issuer.mint("a@example.com")
    await v.verify(token)
    head, body, sig = token.split(".")
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    with pytest.raises(AuthError):
        await v.verify(f"{head}.{body}.{flipped}")


async def test_expired_cached_token_is_rejected(issuer: DevIssuer) -> None:
    clock = Clock()
    v = verifier(issuer, FakeJwksServer(issuer.jwks()), clock)
    token = issuer.mint("a@example.com", ttl=60)
    await v.verify(token)
    v._clock = lambda: 10**10
    with pytest.raises(AuthError) as info:
        await v.verify(token)
    assert info.value.code == "expired"


def test_allowlist_first_matching_group_rule_wins() -> None:
    allowlist = Allowlist(
        default_allow=True,
        rules=(
            AllowRule(frozenset({"interns"}), compile_globs(("@cf/*",)), None),
            AllowRule(
                frozenset({"ml"}),
                compile_globs(("claude-opus-*", "gpt-4o*")),
                compile_globs(("gpt-4o-audio*",)),
            ),
        ),
    )
    assert allowlist.allows(("interns",), "@cf/meta/llama")
    assert not allowlist.allows(("interns",), "gpt-4o")
    assert not allowlist.allows(("interns", "ml"), "gpt-4o")  # interns rule comes first
    assert allowlist.allows(("ml",), "gpt-4o-mini")
    assert not allowlist.allows(("ml",), "gpt-4o-audio-preview")
    assert not allowlist.allows(("ml",), "o3")
    assert allowlist.allows(("others",), "anything")
    assert not Allowlist(default_allow=False, rules=()).allows(("x",), "gpt-4o")


async def test_identities_with_the_same_groups_share_one_tuple_of_them(issuer: DevIssuer) -> None:
    v = verifier(issuer, FakeJwksServer(issuer.jwks()), Clock())
    alice = await v.verify(issuer.mint("alice@example.com", ["eng", "ml"]))
    bob = await v.verify(issuer.mint("bob@example.com", ["eng", "ml"]))
    carol = await v.verify(issuer.mint("carol@example.com", ["ml", "eng"]))
    assert alice.groups is bob.groups and alice.groups == ("eng", "ml")
    # The order is the token's: another order is another tuple, of the same name objects.
    assert carol.groups == ("ml", "eng") and carol.groups[1] is alice.groups[0]


async def test_token_cache_keeps_at_most_its_bound_least_recent_going_first(
    issuer: DevIssuer,
) -> None:
    keys = JwksCache(url="https://idp/certs", fetch=FakeJwksServer(issuer.jwks()).fetch)
    policy = IssuerPolicy(issuer.issuer, (issuer.audience,), ("RS256",), "groups", 30, keys)
    v = JwtVerifier([policy], {}, cache_size=2)
    a, b, c = (issuer.mint(f"{n}@example.com") for n in "abc")
    first_a = await v.verify(a)
    await v.verify(b)
    assert await v.verify(a) is first_a  # a hit: a is now the most recent
    await v.verify(c)  # b, the least recently seen, goes
    assert len(v._cache) == 2
    assert await v.verify(a) is first_a
    assert (await v.verify(b)).email == "b@example.com"  # verified again, not cached


async def test_cached_tokens_never_answer_for_one_another(issuer: DevIssuer) -> None:
    v = verifier(issuer, FakeJwksServer(issuer.jwks()), Clock())
    tokens = {f"user{n}@example.com": issuer.mint(f"user{n}@example.com") for n in range(20)}
    for token in tokens.values():
        await v.verify(token)
    for email, token in tokens.items():
        assert (await v.verify(token)).email == email
    assert len(v._cache) == len(tokens)
