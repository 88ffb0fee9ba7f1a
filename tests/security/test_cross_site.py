"""No cross-site writes: a foreign page cannot use an admin's Access cookie to change anything.

The attack: an admin signed in through Access visits a page that posts `text/plain` (no
CORS preflight) to the admin API; the browser attaches the CF_Authorization cookie.
"""

from __future__ import annotations

import re

from starlette.testclient import TestClient

from tests.security.conftest import CSRF, PUBLIC_URL, Site, admin_token

LIMIT = {"name": "attacker-cap", "budget_usd": 0, "window": {"fixed": "daily"}, "action": "block"}
EVIL = "https://evil.example"


def limits(client: TestClient) -> list[str]:
    listing = client.get("/v1/spend-limits", headers=admin_token())
    assert listing.status_code == 200, listing.text
    return [rule["name"] for rule in listing.json()["result"]]


def refused(answer: object, status: int) -> None:
    assert getattr(answer, "status_code", None) == status, getattr(answer, "text", answer)
    body = answer.json()  # type: ignore[attr-defined]
    assert body["success"] is False and body["errors"][0]["message"], body


def test_cross_site_text_plain_post_with_the_admin_cookie_is_refused(site: Site) -> None:
    client = site.client()
    before = limits(client)
    body = '{"name": "attacker-cap", "budget_usd": 0, "window": {"fixed": "daily"}}'
    answer = client.post(
        "/v1/spend-limits",
        content=body,
        headers={
            **site.admin_person(),
            "content-type": "text/plain",
            "origin": EVIL,
            "sec-fetch-site": "cross-site",
        },
    )
    refused(answer, 403)
    assert limits(client) == before
    # Same without any Origin: a cookie alone is no proof of where a write came from.
    refused(client.post("/v1/spend-limits", json=LIMIT, headers=site.admin_person()), 403)
    killed = client.delete(
        "/v1/spend-limits/per-user-daily", headers={**site.admin_person(), "origin": EVIL}
    )
    refused(killed, 403)
    assert limits(client) == before


def test_same_origin_cookie_write_is_accepted(site: Site) -> None:
    client = site.client()
    answer = client.post(
        "/v1/spend-limits", json=LIMIT, headers={**site.admin_person(), "origin": PUBLIC_URL}
    )
    assert answer.status_code == 201, answer.text
    fetched = client.delete(
        "/v1/spend-limits/attacker-cap",
        headers={**site.admin_person(), "sec-fetch-site": "same-origin"},
    )
    assert fetched.status_code == 200, fetched.text


def test_admin_writes_accept_only_json(site: Site) -> None:
    client = site.client()
    before = limits(client)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        answer = client.post(
            "/v1/spend-limits",
            content=b'{"name": "x"}',
            headers={**admin_token(), "content-type": ctype},
        )
        refused(answer, 415)
    refused(
        client.put(
            "/v1/spend-limits/attacker-cap",
            content=b"{}",
            headers={**admin_token(), "content-type": "text/plain"},
        ),
        415,
    )
    refused(client.post("/v1/service-tokens", headers=admin_token()), 415)
    assert limits(client) == before


def test_bearer_clients_are_unaffected_by_the_origin_rule(site: Site) -> None:
    client = site.client()
    made = client.post("/v1/spend-limits", json=LIMIT, headers={**admin_token(), "origin": EVIL})
    assert made.status_code == 201, made.text
    jwt = {"authorization": f"Bearer {site.issuer.mint('root@example.com', ['platform-admins'])}"}
    gone = client.delete("/v1/spend-limits/attacker-cap", headers={**jwt, "origin": EVIL})
    assert gone.status_code == 200, gone.text


def test_cross_origin_device_approval_is_refused_even_with_a_valid_csrf_token(site: Site) -> None:
    client = site.client()
    code = client.post("/device/code", data={"client_id": "x"}).json()
    victim = site.admin_person()
    page = client.get("/device", params={"user_code": code["user_code"]}, headers=victim)
    csrf = CSRF.search(page.text)
    user_code = re.search(r'name="user_code" value="([^"]+)"', page.text)
    assert csrf is not None and user_code is not None
    form = {"user_code": user_code.group(1), "action": "approve", "csrf_token": csrf.group(1)}
    answer = client.post("/device/approve", data=form, headers={**victim, "origin": EVIL})
    assert answer.status_code == 403, answer.text
    assert "did not come from this site" in answer.text
    pending = client.post(
        "/device/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": code["device_code"],
        },
    )
    assert pending.json()["error"] == "authorization_pending", "nothing was approved"
    # The CSRF token is still required from the site's own page.
    forged = client.post(
        "/device/approve",
        headers={**victim, "sec-fetch-site": "same-origin"},
        data={**form, "csrf_token": "forged"},
    )
    assert forged.status_code == 403
    ok = client.post(
        "/device/approve",
        data=form,
        headers={**victim, "sec-fetch-site": "same-origin", "origin": "null"},
    )
    assert ok.status_code == 200, ok.text
