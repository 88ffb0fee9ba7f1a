"""Device login: the grant state machine, CSRF, attempt limits and signing-key rotation.

Store-backed parts run against both backends (a real SQLite file and a real redis-server),
with an injected clock so intervals, expiry and rotation are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import itertools

import jwt
import pytest

from sidecar.admin_access import is_admin
from sidecar.identity.attempts import Attempts
from sidecar.identity.authenticate import Authenticator
from sidecar.identity.device import (
    ADDRESS_GUESS_LIMIT,
    EXPIRES_IN,
    GUESS_LIMIT,
    GUESS_WINDOW_SECONDS,
    INTERVAL,
    SLOW_DOWN_STEP,
    USER_CODE_ALPHABET,
    DeviceLogin,
    Grant,
    IssuedToken,
    format_user_code,
    new_user_code,
    normalize_user_code,
    poll,
)
from sidecar.identity.errors import AuthError
from sidecar.identity.jwt_verify import JwtVerifier
from sidecar.identity.secret_box import SecretBox, new_key
from sidecar.identity.signing_keys import SigningKeys
from sidecar.model import Identity
from sidecar.store.base import Store

ISSUER = "https://gateway.example.com"
ALICE = Identity(
    kind="user",
    subject="u-alice",
    email="alice@example.com",
    groups=("ml", "eng"),
    issuer="https://idp.example.com",
)
BOB = Identity(
    kind="user", subject="u-bob", email="bob@example.com", issuer="https://idp.example.com"
)
DAY = 86_400
BOX = SecretBox(new_key(), "the test key")


class Clock:
    def __init__(self) -> None:
        # Near real time: the stores' own document TTLs run on the wall clock.
        import time

        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def login(store: Store, clock: Clock) -> DeviceLogin:
    return DeviceLogin(store, ISSUER, box=BOX, clock=clock)


def verifier(login: DeviceLogin, clock: Clock) -> JwtVerifier:
    return JwtVerifier([login.issuer_policy], {}, clock=clock)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- user codes (pure) ---------------------------------------------------------------------


def test_user_codes_use_the_alphabet_and_show_as_two_halves() -> None:
    codes = {new_user_code() for _ in range(500)}
    assert len(codes) == 500
    for code in codes:
        assert len(code) == 8 and set(code) <= set(USER_CODE_ALPHABET)
    assert not set("AEIOUY0123456789") & set(USER_CODE_ALPHABET)
    assert format_user_code("BCDFGHJK") == "BCDF-GHJK"


def test_typed_codes_are_normalized_or_refused() -> None:
    assert normalize_user_code("bcdf-ghjk") == "BCDFGHJK"
    assert normalize_user_code("  BCDF GHJK ") == "BCDFGHJK"
    for bad in ("BCDF-GHJ", "BCDF-GHJKL", "BCDF-GHJA", "BCDF-GHJ1", "", "BCDF_GHJK"):
        assert normalize_user_code(bad) is None, bad


def test_poll_transitions_are_pure() -> None:
    grant = Grant("g", "BCDFGHJK", "pending", 0.0, EXPIRES_IN, INTERVAL, "10.0.0.1", "cli", "")
    after, outcome = poll(grant, 1.0)
    assert outcome == "authorization_pending" and after.last_poll_at == 1.0
    fast, outcome = poll(after, 2.0)
    assert outcome == "slow_down" and fast.interval == INTERVAL + SLOW_DOWN_STEP
    assert poll(fast, 2.0 + INTERVAL)[1] == "slow_down"
    assert poll(fast, 2.0 + INTERVAL + SLOW_DOWN_STEP)[1] == "authorization_pending"
    assert poll(grant, EXPIRES_IN)[1] == "expired_token"
    assert (
        poll(grant.__class__(**{**grant.__dict__, "status": "issued"}), 1.0)[1] == "invalid_grant"
    )


# -- the flow against a store --------------------------------------------------------------


async def test_pending_then_approved_then_issued_once(login: DeviceLogin, clock: Clock) -> None:
    device_code, grant = await login.start("10.0.0.7", "sidecar-cli/1", "sidecar-cli")
    assert await login.exchange(device_code, 3600) == "authorization_pending"
    assert (await login.find(grant.user_code)) is not None
    clock.now += 2
    approved = await login.decide(grant.user_code, ALICE, approve=True)
    assert isinstance(approved, Grant) and approved.status == "approved"
    assert approved.approver is not None and approved.approver.email == "alice@example.com"
    clock.now += INTERVAL
    issued = await login.exchange(device_code, 3600)
    assert isinstance(issued, IssuedToken)
    identity = await verifier(login, clock).verify(issued.access_token)
    assert identity.kind == "cli" and identity.email == "alice@example.com"
    assert identity.subject == "u-alice" and identity.groups == ("ml", "eng")
    claims = jwt.decode(issued.access_token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER and claims["aud"] == "llm-sidecar"
    assert claims["exp"] - claims["iat"] == 3600 and claims["jti"]
    clock.now += INTERVAL
    assert await login.exchange(device_code, 3600) == "invalid_grant"
    # An issued code cannot be approved again either.
    assert await login.decide(grant.user_code, BOB, approve=True) == "already_decided"


async def test_polling_faster_than_the_interval_is_slow_down(
    login: DeviceLogin, clock: Clock
) -> None:
    device_code, _ = await login.start("10.0.0.7", "ua", "")
    assert await login.exchange(device_code, 3600) == "authorization_pending"
    clock.now += 1
    assert await login.exchange(device_code, 3600) == "slow_down"
    # The interval grew by 5 s: the old pace is now too fast, the new one is fine.
    clock.now += INTERVAL
    assert await login.exchange(device_code, 3600) == "slow_down"
    clock.now += INTERVAL + 2 * SLOW_DOWN_STEP
    assert await login.exchange(device_code, 3600) == "authorization_pending"


async def test_expired_code_is_expired_token(login: DeviceLogin, clock: Clock) -> None:
    device_code, grant = await login.start("10.0.0.7", "ua", "")
    clock.now += EXPIRES_IN
    assert await login.exchange(device_code, 3600) == "expired_token"
    assert await login.decide(grant.user_code, ALICE, approve=True) == "expired"


async def test_denied_code_is_access_denied(login: DeviceLogin, clock: Clock) -> None:
    device_code, grant = await login.start("10.0.0.7", "ua", "")
    denied = await login.decide(grant.user_code, ALICE, approve=False)
    assert isinstance(denied, Grant) and denied.status == "denied"
    assert await login.exchange(device_code, 3600) == "access_denied"
    assert await login.decide(grant.user_code, ALICE, approve=True) == "already_decided"


async def test_unknown_device_code_and_other_client_are_invalid_grant(login: DeviceLogin) -> None:
    assert await login.exchange("not-a-code", 3600) == "invalid_grant"
    device_code, _ = await login.start("10.0.0.7", "ua", "sidecar-cli")
    assert await login.exchange(device_code, 3600, "someone-else") == "invalid_grant"


async def test_two_replicas_racing_issue_one_token(store: Store, clock: Clock) -> None:
    first, second = (
        DeviceLogin(store, ISSUER, box=BOX, clock=clock),
        DeviceLogin(store, ISSUER, box=BOX, clock=clock),
    )
    device_code, grant = await first.start("10.0.0.7", "ua", "")
    await second.decide(grant.user_code, ALICE, approve=True)
    results = await asyncio.gather(
        first.exchange(device_code, 60), second.exchange(device_code, 60)
    )
    assert sum(isinstance(r, IssuedToken) for r in results) == 1
    assert [r for r in results if not isinstance(r, IssuedToken)] == ["invalid_grant"]


# -- CSRF and attempt limits ---------------------------------------------------------------


async def test_csrf_token_is_bound_to_person_and_code(store: Store, clock: Clock) -> None:
    login, replica = (
        DeviceLogin(store, ISSUER, box=BOX, clock=clock),
        DeviceLogin(store, ISSUER, box=BOX, clock=clock),
    )
    _, grant = await login.start("10.0.0.7", "ua", "")
    _, other = await login.start("10.0.0.7", "ua", "")
    token = await login.csrf_token(ALICE, grant)
    assert await login.csrf_ok(ALICE, grant, token)
    assert await replica.csrf_ok(ALICE, grant, token), "another replica must accept it"
    assert not await login.csrf_ok(BOB, grant, token)
    assert not await login.csrf_ok(ALICE, other, token)
    assert not await login.csrf_ok(ALICE, grant, token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert not await login.csrf_ok(ALICE, grant, "")


async def test_wrong_codes_are_limited_per_person_and_address(
    login: DeviceLogin, store: Store, clock: Clock
) -> None:
    attempts = Attempts(store, clock)
    checks = login.guess_checks(ALICE, "10.0.0.7")
    for _ in range(GUESS_LIMIT):
        assert await attempts.retry_after(checks) is None
        await attempts.failed(checks)
    assert await attempts.retry_after(checks) is not None
    assert await attempts.retry_after(login.guess_checks(ALICE, "10.9.9.9")), "same person"
    # One guesser behind a shared address uses their own allowance, not the address's.
    assert await attempts.retry_after(login.guess_checks(BOB, "10.0.0.7")) is None
    assert await attempts.retry_after(login.guess_checks(BOB, "10.9.9.9")) is None
    for n in range(ADDRESS_GUESS_LIMIT - GUESS_LIMIT):
        person = Identity(kind="user", subject=f"u-{n}", issuer="https://idp.example.com")
        await attempts.failed(login.guess_checks(person, "10.0.0.7"))
    assert await attempts.retry_after(login.guess_checks(BOB, "10.0.0.7")), "address full"
    clock.now += GUESS_WINDOW_SECONDS
    assert await attempts.retry_after(checks) is None, "a new window"


# -- signing keys --------------------------------------------------------------------------


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def test_rotation_keeps_old_tokens_valid_and_jwks_shows_both(
    login: DeviceLogin, clock: Clock
) -> None:
    approver = await login.decide((await login.start("a", "b", ""))[1].user_code, ALICE, True)
    assert isinstance(approver, Grant) and approver.approver is not None
    old = await login.mint(approver.approver, 3600)
    new_kid = await login.keys.rotate()
    new = await login.mint(approver.approver, 3600)
    assert kid_of(old) != kid_of(new) == new_kid
    jwks = await login.keys.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [new_kid, kid_of(old)]
    for key in jwks["keys"]:
        assert key["kty"] == "EC" and key["alg"] == "ES256" and "d" not in key
    check = verifier(login, clock)
    assert (await check.verify(old)).email == (await check.verify(new)).email
    # Once every token the old key signed has expired (plus leeway), it is unpublished.
    clock.now += 3600 + 31
    assert [k["kid"] for k in (await login.keys.jwks())["keys"]] == [new_kid]
    with pytest.raises(AuthError) as err:
        await verifier(login, clock).verify(old)
    assert err.value.code in {"expired", "unknown_kid"}


async def test_keys_rotate_by_themselves_after_30_days(store: Store, clock: Clock) -> None:
    keys = SigningKeys(store, box=BOX, clock=clock)
    claims = {"iss": ISSUER, "aud": "llm-sidecar", "sub": "s", "exp": 0}
    first = await keys.sign({**claims, "exp": clock.now + 60})
    clock.now += 29 * DAY
    assert kid_of(await keys.sign({**claims, "exp": clock.now + 60})) == kid_of(first)
    clock.now += 2 * DAY
    rotated = await keys.sign({**claims, "exp": clock.now + 60})
    assert kid_of(rotated) != kid_of(first)
    assert len((await keys.jwks())["keys"]) == 1, "the old key's tokens have all expired"


async def test_a_key_made_by_another_replica_is_found(store: Store, clock: Clock) -> None:
    here, there = (
        DeviceLogin(store, ISSUER, box=BOX, clock=clock),
        DeviceLogin(store, ISSUER, box=BOX, clock=clock),
    )
    _, grant = await here.start("a", "b", "")
    decided = await here.decide(grant.user_code, ALICE, True)
    assert isinstance(decided, Grant) and decided.approver is not None
    first = await here.mint(decided.approver, 600)
    check = verifier(there, clock)
    assert (await check.verify(first)).kind == "cli"
    reloads = there.keys.reloads
    await here.keys.rotate()
    second = await here.mint(decided.approver, 600)
    clock.now += 1.5
    # The cached key set lacks the new kid: one reload from the store finds it.
    assert (await check.verify(second)).kind == "cli"
    assert there.keys.reloads == reloads + 1
    # Forged kids reload at most once per floor, then are simply unknown.
    for kid in itertools.islice(itertools.count(), 5):
        assert await there.keys.key_for(f"forged-{kid}") is None
    assert there.keys.reloads == reloads + 1
    clock.now += 1.5
    assert await there.keys.key_for("forged-again") is None
    assert there.keys.reloads == reloads + 2


async def test_expired_cli_token_is_refused(login: DeviceLogin, clock: Clock) -> None:
    _, grant = await login.start("a", "b", "")
    decided = await login.decide(grant.user_code, ALICE, True)
    assert isinstance(decided, Grant) and decided.approver is not None
    token = await login.mint(decided.approver, 2)
    clock.now += 2 + 31
    with pytest.raises(AuthError) as err:
        await verifier(login, clock).verify(token)
    assert err.value.code == "expired" and "run `sidecar login`" in err.value.detail


# -- CLI sessions: refresh tokens, revocation, admin scope ----------------------------------


async def issued_for(
    login: DeviceLogin,
    clock: Clock,
    approver: Identity = ALICE,
    scope: str = "",
    admin: bool = False,
    token_ttl: int = 3600,
    session_ttl: int = 7 * DAY,
) -> IssuedToken:
    device_code, grant = await login.start("10.0.0.7", "sidecar-cli/1", "sidecar-cli", scope)
    decided = await login.decide(grant.user_code, approver, True, approver_is_admin=admin)
    assert isinstance(decided, Grant), decided
    clock.now += INTERVAL
    issued = await login.exchange(device_code, token_ttl, "sidecar-cli", session_ttl)
    assert isinstance(issued, IssuedToken), issued
    return issued


async def test_refresh_token_rotates_once_and_a_replay_revokes_the_session(
    login: DeviceLogin, clock: Clock
) -> None:
    first = await issued_for(login, clock)
    assert first.refresh_token and first.session
    auth = Authenticator(verifier(login, clock), None, login.sessions)
    identified = await auth.identify(bearer(first.access_token))
    assert identified is not None and identified[0].session == first.session
    clock.now += 600
    second = await login.refresh(first.refresh_token, 3600)
    assert isinstance(second, IssuedToken) and second.refresh_token != first.refresh_token
    claims = jwt.decode(second.access_token, options={"verify_signature": False})
    assert claims["sid"] == first.session and claims["exp"] - claims["iat"] == 3600
    # The replaced refresh token, presented again, is a copy: the whole session ends.
    assert await login.refresh(first.refresh_token, 3600) == "invalid_grant"
    assert await login.refresh(str(second.refresh_token), 3600) == "invalid_grant"
    clock.now += 1  # past the revocation cache
    with pytest.raises(AuthError) as err:
        await auth.identify(bearer(second.access_token))
    assert err.value.code == "revoked" and "sidecar login" in err.value.detail


async def test_session_ends_at_its_lifetime_and_tokens_never_outlive_it(
    login: DeviceLogin, clock: Clock
) -> None:
    issued = await issued_for(login, clock, token_ttl=3600, session_ttl=2 * 3600)
    clock.now += 2 * 3600 - 600
    last = await login.refresh(str(issued.refresh_token), 3600)
    assert isinstance(last, IssuedToken) and last.expires_in <= 600
    clock.now += 600
    assert await login.refresh(str(last.refresh_token), 3600) == "invalid_grant"


async def test_logout_revokes_with_the_current_refresh_token_only(
    login: DeviceLogin, clock: Clock
) -> None:
    issued = await issued_for(login, clock)
    sid, _, _ = str(issued.refresh_token).partition(".")
    assert await login.sessions.revoke_by_refresh(f"{sid}.wrong", "logout") is None
    assert await login.sessions.live(sid)
    done = await login.sessions.revoke_by_refresh(str(issued.refresh_token), "logout")
    assert done is not None and done[1]["revoked_by"] == "logout"
    clock.now += 1
    assert not await login.sessions.live(sid)


async def test_admin_scoped_grant_needs_an_admin_and_lasts_at_most_an_hour(
    login: DeviceLogin, clock: Clock
) -> None:
    _, grant = await login.start("10.0.0.7", "ua", "sidecar-cli", "admin")
    assert await login.decide(grant.user_code, BOB, True, approver_is_admin=False) == "not_admin"
    # Anyone may still deny it.
    denied = await login.decide(grant.user_code, BOB, False, approver_is_admin=False)
    assert isinstance(denied, Grant) and denied.status == "denied"
    issued = await issued_for(login, clock, scope="admin", admin=True, token_ttl=12 * 3600)
    assert issued.refresh_token is None and issued.expires_in == 3600
    identity = await verifier(login, clock).verify(issued.access_token)
    assert identity.kind == "cli" and identity.scope == "admin" and identity.session
    assert is_admin(identity, ["eng"]) and not is_admin(identity, ["ops"])
    plain = await verifier(login, clock).verify((await issued_for(login, clock)).access_token)
    assert plain.scope == "" and not is_admin(plain, ["eng"])
